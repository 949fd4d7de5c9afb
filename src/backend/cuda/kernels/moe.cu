// The router and the routed experts, grouped by expert so that each expert's weights are read
// once for all the tokens routed to it.

// Biased scores a lane holds in the one-warp selection (up to 256 experts: V4's).
#define ROUTE_PER 8

// The warp's largest v and its index vi (the lowest index among ties), in every lane.
__device__ __forceinline__ void warp_argmax(float& v, int& vi) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, vi, o);
        if (v2 > v || (v2 == v && i2 < vi)) {
            v = v2;
            vi = i2;
        }
    }
}

// One round of the one-warp selection: the warp's largest of the lanes' ROUTE_PER biased
// scores `r` (lane l holds experts l, l + 32, ...), the lowest index among ties, in every
// lane; the pick is then set to -inf so the next round passes it over.
__device__ __forceinline__ int warp_pick(float (&r)[ROUTE_PER], int lane) {
    float v = NEG_INF;
    int vi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < ROUTE_PER; i++)
        if (r[i] > v) { v = r[i]; vi = lane + 32 * i; }
    warp_argmax(v, vi);
#pragma unroll
    for (int i = 0; i < ROUTE_PER; i++)
        if (lane + 32 * i == vi) r[i] = NEG_INF;
    return vi;
}

// Groups the `pairs` (token, expert) pairs of `ids` by expert, by one block (`cnt`: 2 E words
// of shared memory): the non-empty experts in ascending order with their slices of `order`.
__device__ void sort_pairs(const volatile u32* ids, int pairs, int E, u32* cnt, u32* seg_expert,
                           u32* seg_off, u32* seg_cnt, u32* nseg, u32* order) {
    u32* cur = cnt + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&cnt[ids[p]], 1u);
    __syncthreads();
    // Each thread's run of experts, its pairs and non-empty experts counted, then offsets by a
    // scan over the block (blockDim.x a multiple of 32, at most 1024).
    __shared__ u32 wsum[32][2];
    int per = (E + blockDim.x - 1) / blockDim.x, e0 = threadIdx.x * per;
    int e1 = e0 + per < E ? e0 + per : E;
    u32 mine = 0, used = 0;
    for (int e = e0; e < e1; e++) {
        mine += cnt[e];
        used += cnt[e] > 0;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 a = mine, b = used;
    for (int o = 1; o < 32; o <<= 1) {
        u32 x = __shfl_up_sync(0xffffffffu, a, o), y = __shfl_up_sync(0xffffffffu, b, o);
        if (lane >= o) {
            a += x;
            b += y;
        }
    }
    if (lane == 31) {
        wsum[warp][0] = a;
        wsum[warp][1] = b;
    }
    __syncthreads();
    u32 off = a - mine, n = b - used;
    for (int w = 0; w < warp; w++) {
        off += wsum[w][0];
        n += wsum[w][1];
    }
    for (int e = e0; e < e1; e++) {
        cur[e] = off;
        if (cnt[e] > 0) {
            seg_expert[n] = e;
            seg_off[n] = off;
            seg_cnt[n] = cnt[e];
            n++;
        }
        off += cnt[e];
    }
    if (threadIdx.x == blockDim.x - 1) *nseg = n;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) order[atomicAdd(&cur[ids[p]], 1u)] = p;
}

struct RouteArgs {
    const float* logits;  // [T, E]
    const float* bias;    // [E] selection bias, or null
    const u32* tid2eid;   // [V, k] hash routing, or null
    const u32* tokens;    // [T]
    u32* ids;             // [T, k] out
    float* weights;       // [T, k] out
    u32* done;            // one counter, zero (left zero)
    // The pairs grouped by expert (sort_pairs).
    u32* seg_expert;
    u32* seg_off;
    u32* seg_cnt;
    u32* nseg;
    u32* order;
    int T, E, k;
    int func;  // 0 sqrt(softplus), 1 sigmoid, 2 softmax
    float scale;
};

// One token (decode's batch 1, scores by sigmoid or sqrt(softplus), up to 32 ROUTE_PER
// experts): a thread an expert's score (its bias loaded before the wait), one barrier, then
// warp 0 alone picks from registers and finds the weights and the pairs' grouping by warp
// shuffles. The general path below took one block's latency chain of a dozen barriers and
// three rounds of dependent loads (5 us alone, 7-8 in a step). The same scores, picks (the
// lowest index among ties), weights (summed in pick order) and groups, so the same bits.
__device__ void route_one(const RouteArgs& a, float* sc, float* biased) {
    const int E = a.E, k = a.k, tid = threadIdx.x, lane = tid & 31;
    float bias = a.bias && tid < E ? a.bias[tid] : 0.0f;
    pdl_wait();
    if (tid < E) {
        float x = a.logits[tid];
        float v = a.func == 0 ? sqrtf(softplusf(x)) : sigmoidf(x);
        sc[tid] = v;
        biased[tid] = v + bias;
    }
    __syncthreads();
    if (tid >= 32) return;
    float r[ROUTE_PER];
#pragma unroll
    for (int i = 0; i < ROUTE_PER; i++) r[i] = lane + 32 * i < E ? biased[lane + 32 * i] : NEG_INF;
    // Round j's pick and its score end in lane j.
    int mine = 0;
    float w = 0.0f, sum = 0.0f;
    for (int j = 0; j < k; j++) {
        int vi = warp_pick(r, lane);
        float s = sc[vi < E ? vi : 0];  // (no pick: scores all NaN)
        sum += s;
        if (lane == j) {
            mine = vi;
            w = s;
        }
    }
    if (lane >= k) return;
    a.ids[lane] = mine;
    a.weights[lane] = w / sum * a.scale;
    // The experts in ascending order, each with its one pair (sort_pairs' groups).
    int rank = 0;
    for (int j = 0; j < k; j++) rank += __shfl_sync((1u << k) - 1, mine, j) < mine;
    a.seg_expert[rank] = mine;
    a.seg_off[rank] = rank;
    a.seg_cnt[rank] = 1;
    a.order[rank] = lane;
    if (lane == 0) *a.nseg = k;
}

// Scores, selection and weights of each token's experts (one block a token); the last block
// to finish then groups all the pairs by expert for the experts' kernels (one launch fewer on
// the MoE's longest chain). A token's picks stay in shared memory: no round trip to global
// memory follows a pick.
extern "C" __global__ void route(RouteArgs a) {
    extern __shared__ float sc[];
    if (a.T == 1 && !a.tid2eid && a.func != 2 && a.E <= (int)blockDim.x && a.E <= 32 * ROUTE_PER) {
        route_one(a, sc, sc + a.E);
        return;
    }
    pdl_wait();
    const int E = a.E, k = a.k, func = a.func;
    float* biased = sc + E;
    __shared__ float sh[32];
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ int sel[16];
    __shared__ int last;
    int t = blockIdx.x;
    const float* l = a.logits + (long)t * E;
    float mx = NEG_INF;
    for (int e = threadIdx.x; e < E; e += blockDim.x) mx = fmaxf(mx, l[e]);
    if (func == 2) mx = block_max(mx, sh);
    float part = 0.0f;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float x = l[e];
        float s = func == 0 ? sqrtf(softplusf(x)) : func == 1 ? sigmoidf(x) : expf(x - mx);
        sc[e] = s;
        part += s;
    }
    if (func == 2) {
        float tot = block_sum(part, sh);
        for (int e = threadIdx.x; e < E; e += blockDim.x) sc[e] /= tot;
    }
    __syncthreads();
    if (a.tid2eid) {
        if (threadIdx.x < k) sel[threadIdx.x] = a.tid2eid[(long)a.tokens[t] * k + threadIdx.x];
    } else {
        for (int e = threadIdx.x; e < E; e += blockDim.x) biased[e] = sc[e] + (a.bias ? a.bias[e] : 0.0f);
        __syncthreads();
        if (E <= 32 * ROUTE_PER) {
            // One warp, its lanes' biased scores in registers: k rounds of a warp's argmax
            // (the lowest index among ties), with no block barrier between them.
            if (threadIdx.x < 32) {
                int lane = threadIdx.x;
                float r[ROUTE_PER];
#pragma unroll
                for (int i = 0; i < ROUTE_PER; i++) r[i] = lane + 32 * i < E ? biased[lane + 32 * i] : NEG_INF;
                for (int j = 0; j < k; j++) {
                    int vi = warp_pick(r, lane);
                    if (lane == 0) sel[j] = vi;
                }
            }
        } else {
            for (int j = 0; j < k; j++) {
                float v = NEG_INF;
                int vi = 0x7fffffff;
                for (int e = threadIdx.x; e < E; e += blockDim.x)
                    if (biased[e] > v) { v = biased[e]; vi = e; }
                warp_argmax(v, vi);
                int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
                if (lane == 0) { bv[w] = v; bi[w] = vi; }
                __syncthreads();
                if (threadIdx.x == 0) {
                    for (int i = 1; i < nw; i++)
                        if (bv[i] > bv[0] || (bv[i] == bv[0] && bi[i] < bi[0])) { bv[0] = bv[i]; bi[0] = bi[i]; }
                    sel[j] = bi[0];
                    biased[bi[0]] = NEG_INF;
                }
                __syncthreads();
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // The weights: the picks' scores over their sum, added in pick order.
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += sc[sel[j]];
        for (int j = 0; j < k; j++) {
            float w = sc[sel[j]];
            a.ids[(long)t * k + j] = sel[j];
            a.weights[(long)t * k + j] = (func == 2 ? w : w / sum) * a.scale;
        }
    }
    __syncthreads();
    // One token (decode): its picks are all the pairs, sorted from shared memory. Each round
    // trip to global memory costs most here, beside a kernel that streams weights.
    if (a.T == 1) {
        sort_pairs((const volatile u32*)sel, k, E, (u32*)sc, a.seg_expert, a.seg_off, a.seg_cnt, a.nseg, a.order);
        return;
    }
    __threadfence();
    if (threadIdx.x == 0) {
        last = atomicAdd(a.done, 1u) == (u32)a.T - 1;
        if (last) *a.done = 0;  // zero again for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    sort_pairs((const volatile u32*)a.ids, a.T * k, E, (u32*)sc, a.seg_expert, a.seg_off, a.seg_cnt, a.nseg,
               a.order);
}

struct ExpertArgs {
    const u64* w1; const u64* s1;  // per expert: weight and scale addresses
    const u64* w3; const u64* s3;
    const u64* w2; const u64* s2;
    const u32* seg_expert; const u32* seg_off; const u32* seg_cnt; const u32* nseg;
    const u32* order;
    const float* x;        // [T, D] activations (FP8-rounded)
    const float* h;        // [P, F] SwiGLU outputs (FP8-rounded), for the down projection
    const float* weights;  // [P] routing weights
    float* out;            // [P, F] (up) or [P, D] (down)
    int D, F, k;
    float limit;
};

// Rows r0.. of `out` for up to 8 pairs of one expert: one warp an output row (8 a block).
template <int FMT, bool UP>
__device__ void expert_rows(const ExpertArgs& a) {
    pdl_wait();
    const int CH = Chunk<FMT>::N;
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = E2M1[threadIdx.x];
    __syncthreads();
    u32 sg = blockIdx.x;
    if (sg >= *a.nseg) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 e = a.seg_expert[sg], off = a.seg_off[sg], cnt = a.seg_cnt[sg];
    int N = UP ? a.F : a.D, K = UP ? a.D : a.F;
    long n = (long)blockIdx.y * 8 + warp;
    if (n >= N) return;
    const u8* Wa = (const u8*)(UP ? a.w1[e] : a.w2[e]);
    const u8* Sa = (const u8*)(UP ? a.s1[e] : a.s2[e]);
    const u8* Wb = (const u8*)(UP ? a.w3[e] : 0);
    const u8* Sb = (const u8*)(UP ? a.s3[e] : 0);
    for (u32 c0 = 0; c0 < cnt; c0 += 8) {
        int rows = cnt - c0 < 8 ? cnt - c0 : 8;
        u32 pr[8];
        const float* xr[8];
#pragma unroll
        for (int r = 0; r < 8; r++) {
            pr[r] = r < rows ? a.order[off + c0 + r] : 0;
            xr[r] = UP ? a.x + (long)(pr[r] / a.k) * a.D : a.h + (long)pr[r] * a.F;
        }
        float ga[8], ua[8];
#pragma unroll
        for (int r = 0; r < 8; r++) { ga[r] = 0.0f; ua[r] = 0.0f; }
        for (long k0 = (long)lane * CH; k0 < K; k0 += 32L * CH) {
            float wa[CH], wb[CH];
            decode_chunk<FMT>(Wa, Sa, n, k0, K, lut, wa);
            if (UP) decode_chunk<FMT>(Wb, Sb, n, k0, K, lut, wb);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (r < rows) {
                    const float4* xv = (const float4*)(xr[r] + k0);
                    float g = 0.0f, u = 0.0f;
#pragma unroll
                    for (int i = 0; i < CH / 4; i++) {
                        float4 v = xv[i];
                        g = fmaf(wa[4 * i], v.x, g); g = fmaf(wa[4 * i + 1], v.y, g);
                        g = fmaf(wa[4 * i + 2], v.z, g); g = fmaf(wa[4 * i + 3], v.w, g);
                        if (UP) {
                            u = fmaf(wb[4 * i], v.x, u); u = fmaf(wb[4 * i + 1], v.y, u);
                            u = fmaf(wb[4 * i + 2], v.z, u); u = fmaf(wb[4 * i + 3], v.w, u);
                        }
                    }
                    ga[r] += g;
                    ua[r] += u;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 8; r++) {
            float g = warp_sum(ga[r]);
            float u = UP ? warp_sum(ua[r]) : 0.0f;
            if (lane == 0 && r < rows) {
                if (UP) a.out[(long)pr[r] * a.F + n] = swiglu1(g, u, a.limit) * a.weights[pr[r]];
                else a.out[(long)pr[r] * a.D + n] = g;
            }
        }
    }
}

#define EXPERT_KERNELS(NAME, FMT)                                                          \
    extern "C" __global__ void __launch_bounds__(256) experts_up_##NAME(ExpertArgs a) {    \
        expert_rows<FMT, true>(a);                                                         \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) experts_down_##NAME(ExpertArgs a) {  \
        expert_rows<FMT, false>(a);                                                        \
    }

EXPERT_KERNELS(f4, FMT_F4)
EXPERT_KERNELS(f8, FMT_F8)
EXPERT_KERNELS(bf16, FMT_BF16)
EXPERT_KERNELS(f32, FMT_F32)

// out[t] = the sum of its k pairs' rows, in order.
extern "C" __global__ void moe_combine(const float* pairs, float* out, int T, int k, int D) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * D) return;
    long t = i / D;
    float s = 0.0f;
    for (int j = 0; j < k; j++) s += pairs[(t * k + j) * D + i % D];
    out[i] = s;
}

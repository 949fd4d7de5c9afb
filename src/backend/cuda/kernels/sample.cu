// Sampling on the GPU: one block (1024 threads) a row of logits, after blocks that split its
// first pass; only the token, its log-probability and the requested alternatives go back to the
// host. The random draws come from the host's seeded generator, so a seed reproduces a
// completion.

struct SampleParams {
    float temperature, top_p, min_p;
    u32 top_k;
    float u1, u2;     // uniform draws in [0, 1)
    int draft;        // a speculative draft to decide, or -1
    u32 nlogprobs;    // alternatives to report (<= 20)
};

struct SampleOut {
    u32 token, accepted;
    float logprob;
    u32 ntop;
    u32 top_ids[20];
    float top_lp[20];
};

// The block's best (value, lowest index) among its threads' candidates.
__device__ void block_argmax(float v, int i, float* bv, int* bi, float* ov, int* oi) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { bv[w] = v; bi[w] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int j = 1; j < nw; j++)
            if (bv[j] > bv[0] || (bv[j] == bv[0] && bi[j] < bi[0])) { bv[0] = bv[j]; bi[0] = bi[j]; }
    }
    __syncthreads();
    *ov = bv[0];
    *oi = bi[0];
    __syncthreads();
}

__device__ float block_sumf(float v, float* sh) { return block_sum(v, sh); }

// Calls f(i, l[i]) for i in [i0, i1) in order, loading 16 values before using them: a pass
// whose loads came one memory latency after another took some 60 us over a row of 129,280.
template <class F>
__device__ __forceinline__ void each(const float* l, long i0, long i1, F f) {
    for (long b = i0; b < i1; b += 16) {
        float x[16];
#pragma unroll
        for (int j = 0; j < 16; j++) x[j] = b + j < i1 ? l[b + j] : 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (b + j < i1) f(b + j, x[j]);
    }
}

// A block's share of a row's first pass: its best logit (the lowest index among equals) and
// the sum of exponentials below it.
struct RowPart {
    float best, sum;
    int at, pad;
};

// Blocks (grid y) split each row's first pass, the best logit and the log-sum-exp; the last of
// a row's blocks to finish (`done`, launch counters: zero, left zero) joins their parts in
// block order and samples the row alone.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* logits, int V,
                                                               const SampleParams* params,
                                                               SampleOut* outs, RowPart* parts,
                                                               u32* done) {
    pdl_wait();
    __shared__ float sh[32];
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ u32 hist[256];
    __shared__ u32 scan[64];
    __shared__ float fscan[1024];
    __shared__ u32 sel[2];
    __shared__ int found;
    __shared__ int last;
    __shared__ RowPart joined;
    const float* l = logits + (long)blockIdx.x * V;
    int tid = threadIdx.x;
    long chunk = (V + blockDim.x - 1) / blockDim.x;
    long i0 = tid * chunk, i1 = i0 + chunk < V ? i0 + chunk : V;

    // The best logit and the log-sum-exp in one pass over the block's part of the row, threads
    // reading it strided (coalesced): each keeps its own maximum and the sum of exponentials
    // below it (rescaled when the maximum moves), the block then joins them.
    {
        int S = gridDim.y, per = (V + S - 1) / S, b0 = blockIdx.y * per, b1 = min(b0 + per, V);
        float v = NEG_INF, part = 0.0f;
        int vi = 0x7fffffff;
        for (int j0 = b0 + tid; j0 < b1; j0 += 8 * blockDim.x) {
            float xs[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int i = j0 + j * blockDim.x;
                xs[j] = i < b1 ? l[i] : NEG_INF;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int i = j0 + j * blockDim.x;
                float x = xs[j];
                if (i >= b1) break;
                if (x > v) {
                    part = part * expf(v - x) + 1.0f;
                    v = x;
                    vi = i;
                } else if (v > NEG_INF) {
                    part += expf(x - v);
                }
            }
        }
        float m;
        int at;
        block_argmax(v, vi, bv, bi, &m, &at);
        part = v == NEG_INF ? 0.0f : part * expf(v - m);
        float sum = block_sumf(part, sh);
        if (tid == 0) {
            parts[(long)blockIdx.x * S + blockIdx.y] = RowPart{m, sum, at, 0};
            __threadfence();
            last = atomicAdd(&done[blockIdx.x], 1u) == (u32)S - 1;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        if (tid == 0) {
            const volatile RowPart* p = parts + (long)blockIdx.x * S;
            float bm = NEG_INF;
            int ba = 0x7fffffff;
            for (int y = 0; y < S; y++)
                if (p[y].best > bm || (p[y].best == bm && p[y].at < ba)) {
                    bm = p[y].best;
                    ba = p[y].at;
                }
            float z = 0.0f;
            for (int y = 0; y < S; y++)
                if (p[y].best > NEG_INF) z += p[y].sum * expf(p[y].best - bm);
            joined = RowPart{bm, z, ba, 0};
            done[blockIdx.x] = 0;
        }
        __syncthreads();
    }
    SampleParams P = params[blockIdx.x];
    SampleOut* out = outs + blockIdx.x;
    float m = joined.best;
    int best = joined.at;
    float lse = m + logf(joined.sum);

    int token = best;
    u32 accepted = 0;
    if (P.temperature > 0.0f) {
        float inv_t = 1.0f / P.temperature;
        // Top-k: the k-th largest logit's key and how many of its ties are kept (lowest first).
        u32 tau = 0, take_eq = 0xffffffffu;
        if (P.top_k > 0 && P.top_k < (u32)V) {
            u32 prefix = 0, mask = 0, need = P.top_k;
            for (int shift = 24; shift >= 0; shift -= 8) {
                for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
                __syncthreads();
                each(l, i0, i1, [&](long, float x) {
                    u32 u = fkey(x);
                    if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1u);
                });
                __syncthreads();
                pick_bin(hist, need, sel);
                __syncthreads();
                prefix |= sel[0] << shift;
                mask |= 255u << shift;
                need = sel[1];
                __syncthreads();
            }
            tau = prefix;
            take_eq = need;
        }
        // This thread's share of the ties kept.
        u32 eq = 0;
        each(l, i0, i1, [&](long, float x) { eq += fkey(x) == tau; });
        u32 total;
        u32 eq_before = block_scan(eq, scan, &total);
        u32 my_eq = take_eq == 0xffffffffu ? eq
                    : (eq_before >= take_eq ? 0 : (take_eq - eq_before < eq ? take_eq - eq_before : eq));
#define KEPT_K(x, seen) (fkey(x) > tau || (fkey(x) == tau && (seen) < my_eq))
        // Mass of the top-k set, then the nucleus threshold by bisection over keys.
        float zk = 0.0f;
        {
            u32 seen = 0;
            each(l, i0, i1, [&](long, float x) {
                if (KEPT_K(x, seen)) zk += expf((x - m) * inv_t);
                seen += fkey(x) == tau;
            });
        }
        zk = block_sumf(zk, sh);
        u32 tp = 0;
        if (P.top_p < 1.0f) {
            u32 lo = 0, hi = fkey(m);
            float target = P.top_p * zk;
            while (lo < hi) {
                u32 mid = lo + (hi - lo + 1) / 2;
                float mass = 0.0f;
                u32 seen = 0;
                each(l, i0, i1, [&](long, float x) {
                    if (KEPT_K(x, seen) && fkey(x) >= mid) mass += expf((x - m) * inv_t);
                    seen += fkey(x) == tau;
                });
                mass = block_sumf(mass, sh);
                if (mass >= target) lo = mid; else hi = mid - 1;
            }
            tp = lo;
        }
        // The kept set: top-k, nucleus, and min-p (z >= min_p, the top token's z being 1).
#define KEPT(x, seen) (KEPT_K(x, seen) && fkey(x) >= tp && expf((x - m) * inv_t) >= P.min_p)
        float z = 0.0f, zd = 0.0f;
        {
            u32 seen = 0;
            each(l, i0, i1, [&](long i, float x) {
                if (KEPT(x, seen)) {
                    float zi = expf((x - m) * inv_t);
                    z += zi;
                    if (i == P.draft) zd = zi;
                }
                seen += fkey(x) == tau;
            });
        }
        z = block_sumf(z, sh);
        zd = block_sumf(zd, sh);
        float draw = P.u1 * z;
        int exclude = -1;
        if (P.draft >= 0) {
            float pd = zd / z;
            if (pd >= 1.0f || (pd > 0.0f && P.u1 < pd)) {
                accepted = 1;
            } else {
                exclude = P.draft;
                draw = P.u2 * (z - zd);
            }
        }
        if (accepted) {
            token = P.draft;
        } else {
            // The token where the running mass of the kept set (in index order) passes `draw`.
            float mine = 0.0f;
            {
                u32 seen = 0;
                each(l, i0, i1, [&](long i, float x) {
                    if (KEPT(x, seen) && i != exclude) mine += expf((x - m) * inv_t);
                    seen += fkey(x) == tau;
                });
            }
            fscan[tid] = mine;
            __syncthreads();
            for (int o = 1; o < (int)blockDim.x; o *= 2) {
                float x = tid >= o ? fscan[tid - o] : 0.0f;
                __syncthreads();
                fscan[tid] += x;
                __syncthreads();
            }
            if (tid == 0) found = -1;
            __syncthreads();
            float before = fscan[tid] - mine;
            if (mine > 0.0f && draw >= before && draw < before + mine) {
                float run = before;
                u32 seen = 0;
                int last = -1;
                for (long i = i0; i < i1; i++) {
                    float x = l[i];
                    bool e = fkey(x) == tau;
                    if (KEPT(x, seen) && i != exclude) {
                        last = (int)i;
                        run += expf((x - m) * inv_t);
                        if (draw < run) break;
                    }
                    seen += e;
                }
                found = last;
            }
            __syncthreads();
            // Rounding can leave the draw past the total: take the last kept token.
            if (found < 0) {
                int lastk = -1;
                u32 seen = 0;
                each(l, i0, i1, [&](long i, float x) {
                    if (KEPT(x, seen) && i != exclude) lastk = (int)i;
                    seen += fkey(x) == tau;
                });
                float v;
                int vi;
                block_argmax(lastk >= 0 ? (float)lastk : NEG_INF, lastk, bv, bi, &v, &vi);
                found = vi >= 0 ? vi : best;
            }
            token = found;
        }
    } else if (P.draft >= 0) {
        accepted = P.draft == best;
    }
    // Log-probabilities: the token's and the best alternatives', from the raw logits.
    u32 nt = P.nlogprobs < 20 ? P.nlogprobs : 20;
    for (u32 j = 0; j < nt; j++) {
        float v = NEG_INF;
        int vi = 0x7fffffff;
        each(l, i0, i1, [&](long i, float x) {
            if (x > v) {
                bool taken = false;
                for (u32 q = 0; q < j; q++) taken |= out->top_ids[q] == (u32)i;
                if (!taken) { v = x; vi = (int)i; }
            }
        });
        float bvv;
        int bii;
        block_argmax(v, vi, bv, bi, &bvv, &bii);
        if (tid == 0) {
            out->top_ids[j] = bii;
            out->top_lp[j] = bvv - lse;
        }
        __syncthreads();
    }
    if (tid == 0) {
        out->token = token;
        out->accepted = accepted;
        out->logprob = l[token] - lse;
        out->ntop = nt;
    }
}

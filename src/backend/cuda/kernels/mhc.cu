// Manifold-constrained hyper-connections. The mixes `fn @ x` come from the linear kernels; these
// kernels apply the stream's RMS, the sigmoids, Sinkhorn and the reductions.

#define HC_MAX 8

// The sum of squares of a token's M*D stream values, over the block (loads issued four at a
// time, so a thread waits for memory once per four; float4 loads where n % 4 == 0).
__device__ float stream_ss(const float* xs, int n, float* sh) {
    float ss = 0.0f;
    if (n % 4 == 0) {
#pragma unroll 4
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = ((const float4*)xs)[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xs[i] * xs[i];
    }
    return block_sum(ss, sh);
}

// The M values of a row (`col` false: lanes j*M .. j*M + M-1) or a column (lanes i*M + k)
// through lane j*M + k, added in index order: all M shuffles first, then the sums.
template <int M>
__device__ __forceinline__ float line_sum(float c, int j, int k, bool col) {
    float v[M];
#pragma unroll
    for (int i = 0; i < M; i++) v[i] = __shfl_sync(0xffffffffu, c, (col ? i * M + k : j * M + i) & 31);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < M; i++) s += v[i];
    return s;
}

// The mix's Sinkhorn-normalized comb (M x M) by the first M*M lanes of a warp, lane j*M + k
// holding entry (j, k); row and column sums taken in index order, as the CPU does. M is a
// template constant: with a run-time M each sum was a chain of shuffles one after another, and
// the twenty rounds took 8-11 us.
template <int M>
__device__ void sinkhorn_lanes(const float* m, float r, const float* scale, const float* base,
                               float* comb, int iters, float hc_eps) {
    int lane = threadIdx.x & 31, j = lane / M, k = lane % M;
    bool live = lane < M * M;
    float c = live ? m[2 * M + lane] * r * scale[2] + base[2 * M + lane] : 0.0f;
    float v[M];
#pragma unroll
    for (int i = 0; i < M; i++) v[i] = __shfl_sync(0xffffffffu, c, (j * M + i) & 31);
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < M; i++) mx = fmaxf(mx, v[i]);
    c = expf(c - mx);
    c = c / line_sum<M>(c, j, k, false) + hc_eps;
    for (int it = 0; it < iters; it++) {
        if (it > 0) c /= line_sum<M>(c, j, k, false) + hc_eps;
        c /= line_sum<M>(c, j, k, true) + hc_eps;
    }
    if (live) comb[lane] = c;
}

// The same by one thread, for other M.
__device__ void sinkhorn_serial(const float* m, float r, const float* scale, const float* base,
                                float* comb, int M, int iters, float hc_eps) {
    float c[HC_MAX * HC_MAX];
    for (int k = 0; k < M * M; k++) c[k] = m[2 * M + k] * r * scale[2] + base[2 * M + k];
    for (int j = 0; j < M; j++) {
        float mx = c[j * M];
        for (int k = 1; k < M; k++) mx = fmaxf(mx, c[j * M + k]);
        float s = 0.0f;
        for (int k = 0; k < M; k++) {
            c[j * M + k] = expf(c[j * M + k] - mx);
            s += c[j * M + k];
        }
        for (int k = 0; k < M; k++) c[j * M + k] = c[j * M + k] / s + hc_eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            for (int j = 0; j < M; j++) {
                float s = 0.0f;
                for (int k = 0; k < M; k++) s += c[j * M + k];
                for (int k = 0; k < M; k++) c[j * M + k] /= s + hc_eps;
            }
        }
        for (int k = 0; k < M; k++) {
            float s = 0.0f;
            for (int j = 0; j < M; j++) s += c[j * M + k];
            for (int j = 0; j < M; j++) c[j * M + k] /= s + hc_eps;
        }
    }
    for (int k = 0; k < M * M; k++) comb[k] = c[k];
}

// y = sum_j pre_j X_j over a token's M streams of D values, by threads `i` of `nt`. Four
// values a thread and stream, every load of a round issued before the sums (y aliases nothing,
// but the compiler cannot know it); other widths and copies value by value.
template <int M>
__device__ void reduce_streams_m(const float* xs, const float* pre, float* y, int D, int i, int nt) {
    const int U = 4;
    int D4 = D >> 2;
    const float4* x4 = (const float4*)xs;
    float4* y4 = (float4*)y;
    for (int d0 = i; d0 < D4; d0 += U * nt) {
        float4 v[U][M];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int j = 0; j < M; j++)
                v[u][j] = d0 + u * nt < D4 ? x4[j * D4 + d0 + u * nt] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (d0 + u * nt >= D4) break;
            float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int j = 0; j < M; j++) {
                o.x += pre[j] * v[u][j].x;
                o.y += pre[j] * v[u][j].y;
                o.z += pre[j] * v[u][j].z;
                o.w += pre[j] * v[u][j].w;
            }
            y4[d0 + u * nt] = o;
        }
    }
}

__device__ void reduce_streams(const float* xs, const float* pre, float* y, int M, int D, int i, int nt) {
    if (M == 4 && D % 4 == 0) return reduce_streams_m<4>(xs, pre, y, D, i, nt);
    for (int d = i; d < D; d += nt) {
        float v = 0.0f;
        for (int j = 0; j < M; j++) v += pre[j] * xs[j * D + d];
        y[d] = v;
    }
}

// One block a token: y = sum_j pre_j X_j; post and comb for hc_post.
extern "C" __global__ void hc_mix(const float* mix, const float* x, const float* base,
                                  const float* scale, float* y, float* post, float* comb, int M,
                                  int D, int iters, float hc_eps, float norm_eps) {
    pdl_wait();
    __shared__ float sh[32];
    __shared__ float pre[HC_MAX];
    int t = blockIdx.x, n = (2 + M) * M;
    const float* xs = x + (long)t * M * D;
    float r = 1.0f / sqrtf(stream_ss(xs, M * D, sh) / (float)(M * D) + norm_eps);
    const float* m = mix + (long)t * n;
    if ((int)threadIdx.x < M) {
        int j = threadIdx.x;
        pre[j] = sigmoidf(m[j] * r * scale[0] + base[j]) + hc_eps;
        post[t * M + j] = 2.0f * sigmoidf(m[M + j] * r * scale[1] + base[M + j]);
    }
    if (M == 4) {
        if (threadIdx.x < 32) sinkhorn_lanes<4>(m, r, scale, base, comb + (long)t * M * M, iters, hc_eps);
    } else if (threadIdx.x == 0) {
        sinkhorn_serial(m, r, scale, base, comb + (long)t * M * M, M, iters, hc_eps);
    }
    __syncthreads();
    reduce_streams(xs, pre, y + (long)t * D, M, D, threadIdx.x, blockDim.x);
}

// The sublayer's output a (float4 i of it), or with `a2` the sum a + a2 (added as `add_k`
// would).
__device__ __forceinline__ float4 hc_post_in(const float* a, const float* a2, long i) {
    float4 av = ((const float4*)a)[i];
    if (a2) {
        float4 bv = ((const float4*)a2)[i];
        av = make_float4(av.x + bv.x, av.y + bv.y, av.z + bv.z, av.w + bv.w);
    }
    return av;
}

// Copy k's float4 of X'_k = post_k a + sum_j comb[j][k] X_j (token's comb `c`, post `p`) from
// the copies' float4s `v`: hc_post and the pre step that mixes the residual in (hc_pre_m4)
// compute it so, for the same bits.
template <int M>
__device__ __forceinline__ float4 hc_post_val(const float4 (&v)[M], float4 av, const float* c, float p, int k) {
    float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int j = 0; j < M; j++) {
        float cj = c[j * M + k];
        s.x += cj * v[j].x;
        s.y += cj * v[j].y;
        s.z += cj * v[j].z;
        s.w += cj * v[j].w;
    }
    return make_float4(p * av.x + s.x, p * av.y + s.y, p * av.z + s.z, p * av.w + s.w);
}

// X'_k = post_k a + sum_j comb[j][k] X_j, in place: one thread a token and dim, or, for four
// copies and D % 4 == 0 (the host launches a quarter of the threads then), four dims.
template <int M>
__device__ void hc_post_m(float* x, const float* a, const float* a2, const float* post, const float* comb,
                          long i, int D) {
    int D4 = D >> 2;
    long t = i / D4;
    int d = i % D4;
    float4* xs = (float4*)(x + t * M * D);
    float4 v[M];
#pragma unroll
    for (int j = 0; j < M; j++) v[j] = xs[j * D4 + d];
    float4 av = hc_post_in(a, a2, i);
#pragma unroll
    for (int k = 0; k < M; k++) xs[k * D4 + d] = hc_post_val<M>(v, av, comb + t * M * M, post[t * M + k], k);
}

extern "C" __global__ void hc_post(float* x, const float* a, const float* a2, const float* post,
                                   const float* comb, int T, int M, int D) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (M == 4 && D % 4 == 0) {
        if (i < (long)T * (D >> 2)) hc_post_m<4>(x, a, a2, post, comb, i, D);
        return;
    }
    if (i >= (long)T * D) return;
    long t = i / D;
    int d = i % D;
    float* xs = x + t * M * D;
    float v[HC_MAX];
    for (int j = 0; j < M; j++) v[j] = xs[j * D + d];
    const float* c = comb + t * M * M;
    float av = a2 ? a[i] + a2[i] : a[i];
    for (int k = 0; k < M; k++) {
        float s = 0.0f;
        for (int j = 0; j < M; j++) s += c[j * M + k] * v[j];
        xs[k * D + d] = post[t * M + k] * av + s;
    }
}

// The head's reduction: y = sum_j (sigmoid(mix_j r s + base_j) + eps) X_j (one block a token).
extern "C" __global__ void hc_head(const float* mix, const float* x, const float* base, float scale,
                                   float* y, int M, int D, float hc_eps, float norm_eps) {
    pdl_wait();
    __shared__ float sh[32];
    __shared__ float pre[HC_MAX];
    int t = blockIdx.x;
    const float* xs = x + (long)t * M * D;
    float r = 1.0f / sqrtf(stream_ss(xs, M * D, sh) / (float)(M * D) + norm_eps);
    if ((int)threadIdx.x < M)
        pre[threadIdx.x] = sigmoidf(mix[(long)t * M + threadIdx.x] * r * scale + base[threadIdx.x]) + hc_eps;
    __syncthreads();
    reduce_streams(xs, pre, y + (long)t * D, M, D, threadIdx.x, blockDim.x);
}

struct HcPreArgs {
    const float* fn;    // [(2 + M) M, M D] mix weights
    const float* x;     // [T, M, D] streams (mixed in place by hc_pre_m4 with `pa`)
    const float* base;
    const float* scale;
    float* y;           // [T, D]
    float* post;        // [T, M]
    float* comb;        // [T, M, M]
    float* part;        // [T, C, NP] partials (hc_pre_rows)
    u32* done;          // [T] blocks finished, zero (left zero; hc_pre_rows)
    int D, iters;
    float hc_eps, norm_eps;
    // The sublayer's RMS norm of y, or null: its weights, eps and quant_act's output (rms_norm).
    const float* rms_w;
    u16* q;
    u16* qp;
    float* s;
    float rms_eps;
    int T;  // tokens (hc_pre_rows: HC_ROWS_TOKENS a block)
    // hc_pre_m4: the sublayer before's output (a, or a + a2) and mix, to mix into the stream x
    // first, as hc_post would (in place); a null: x is mixed already.
    const float* pa;
    const float* pa2;
    const float* ppost;
    const float* pcomb;
};

// The whole mHC pre step in one launch: the mixes fn @ x, the stream's RMS, the gates, Sinkhorn
// and the reduction, by C blocks a token (grid C x T; block dim M * D / 4C, one float4 of the
// stream a thread). Block s holds dims [s D/C, (s+1) D/C) of every copy and sums its slice of
// each mix and of the sum of squares; the C partials are added in block order. Two ways to
// meet, with the same sums (so a token gets the same bits either way, and the host picks by
// the number of tokens):
// - `hc_pre_m4`, a cluster a token (few tokens: decode): each block writes its partials into
//   every block of the cluster (distributed shared memory), adds them itself, reduces its dims
//   of y from the copies it holds, and block 0's last warp runs Sinkhorn; with `rms_w` the
//   blocks send each other their dims of y and each norms its own. No block waits for a last
//   one through global memory (about 11 -> 8.6 us a launch at batch 1).
// - `hc_pre_rows_m4` (many tokens: prefill): partials through global memory, and the token's
//   last block to finish does the rest for the whole row. Its blocks do not wait for each
//   other, which in a wide launch would hold SMs idle (with clusters the 8K prefill's window
//   and HCA layers took 5-6% longer); each takes HC_ROWS_TOKENS tokens (grid C x T / 8).
// The norm is rms_norm's with 256 threads: each of its threads' four float4, its warp's
// butterfly, the eight warps' sums in order, computed from the whole row of y by warps that
// stand in for those threads; quantized rows included. M copies (a template: the mixes stay
// in registers).
template <int M>
struct HcPre {
    static const int n = (2 + M) * M;
    static const int NP = (n + 4) & ~3;  // partials padded to whole float4
    float red[16][n + 1];
    float mix[n + 1];
    float pre[M];
    __align__(16) float part[NP];
    float shv[8];
};

// A pre-step thread's place among block s's C: copy j = tid / per, float4 c4 of the block's
// slice of D / 4.
struct HcSlot {
    int j, c4;
};
__device__ __forceinline__ HcSlot hc_slot(int D, int s, int C) {
    const int per = (D >> 2) / C;
    return {(int)(threadIdx.x / per), (int)(s * per + threadIdx.x % per)};
}

// The thread's float4 of each mix weight (before the kernel waits for its input: no kernel
// writes them).
template <int M>
__device__ __forceinline__ void hc_weights(const HcPreArgs& a, int s, int C, float4 (&w)[HcPre<M>::n]) {
    const int D = a.D;
    const auto [j, c4] = hc_slot(D, s, C);
#pragma unroll
    for (int r = 0; r < HcPre<M>::n; r++) {
        const float* p = a.fn + (long)r * M * D + (long)j * D + 4 * c4;
        asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];"
                     : "=f"(w[r].x), "=f"(w[r].y), "=f"(w[r].z), "=f"(w[r].w)
                     : "l"(p));
    }
}

// The thread's float4 of token t's copies.
template <int M>
__device__ __forceinline__ float4 hc_stream(const HcPreArgs& a, int s, int C, long t) {
    const int D = a.D;
    const auto [j, c4] = hc_slot(D, s, C);
    return ((const float4*)(a.x + t * M * D + (long)j * D))[c4];
}

// The thread's terms of each mix and of the sum of squares, summed over its warp into
// `red[warp]` (both pre-step kernels sum them so: a token's bits do not depend on which).
template <int M>
__device__ __forceinline__ void hc_warp_sums(const float4 (&w)[HcPre<M>::n], float4 xv, float (*red)[HcPre<M>::n + 1]) {
    const int n = HcPre<M>::n, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[n + 1];
#pragma unroll
    for (int r = 0; r < n; r++) acc[r] = w[r].x * xv.x + w[r].y * xv.y + w[r].z * xv.z + w[r].w * xv.w;
    acc[n] = xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
#pragma unroll
    for (int r = 0; r <= n; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0) red[warp][r] = v;
    }
}

// Partial r of a block: its warps' sums in order (0 past the mixes and the sum of squares).
template <int M>
__device__ __forceinline__ float hc_block_part(const float (*red)[HcPre<M>::n + 1], int r) {
    float v = 0.0f;
    if (r <= HcPre<M>::n)
        for (int u = 0; u < (int)(blockDim.x >> 5); u++) v += red[u][r];
    return v;
}

// Block s's partials of token t into `sh.part`, from the thread's float4 `xv` of the copies
// (also into `xs`).
template <int M>
__device__ void hc_partials(HcPre<M>& sh, const float4 (&w)[HcPre<M>::n], float4 xv, float4* xs) {
    xs[threadIdx.x] = xv;
    hc_warp_sums<M>(w, xv, sh.red);
    __syncthreads();
    if (threadIdx.x < HcPre<M>::NP) sh.part[threadIdx.x] = hc_block_part<M>(sh.red, threadIdx.x);
    __syncthreads();
}

// The mixes from the C partials (`parts`, rows of NP, in block order), the gates (`post` by
// block 0), and Sinkhorn by block 0's last warp, which then leaves: the other warps go on.
template <int M>
__device__ bool hc_gates(const HcPreArgs& a, HcPre<M>& sh, const float* parts, int s, int t, int C) {
    const int n = HcPre<M>::n, tid = threadIdx.x, nw = blockDim.x >> 5;
    if (tid <= n) {
        float v = 0.0f;
        for (int b = 0; b < C; b++) v += parts[b * HcPre<M>::NP + tid];
        sh.mix[tid] = v;
    }
    __syncthreads();
    float r = 1.0f / sqrtf(sh.mix[n] / (float)(M * a.D) + a.norm_eps);
    if (tid < M) {
        sh.pre[tid] = sigmoidf(sh.mix[tid] * r * a.scale[0] + a.base[tid]) + a.hc_eps;
        if (s == 0) a.post[t * M + tid] = 2.0f * sigmoidf(sh.mix[M + tid] * r * a.scale[1] + a.base[M + tid]);
    }
    __syncthreads();
    if ((int)(tid >> 5) != nw - 1) return true;
    if (s == 0) sinkhorn_lanes<M>(sh.mix, r, a.scale, a.base, a.comb + (long)t * M * M, a.iters, a.hc_eps);
    return false;
}

// y's float4 i from the copies' (stream j's float4 i at xs + j * stride).
template <int M>
__device__ __forceinline__ float4 hc_reduce(const float4* xs, long stride, const float* pre) {
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < M; i++) {
        float4 v = xs[i * stride];
        o.x += pre[i] * v.x;
        o.y += pre[i] * v.y;
        o.z += pre[i] * v.z;
        o.w += pre[i] * v.w;
    }
    return o;
}

// rms_norm's reciprocal RMS of the row `ys` (D4 float4) with 256 threads, by the block's
// warps but its last (threads below `work`).
__device__ float hc_norm_inv(const float4* ys, int D4, int D, float eps, float* shv, int work) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int vw = warp; vw < 8; vw += work >> 5) {
        int v = vw * 32 + lane;
        float ss = 0.0f;
#pragma unroll
        for (int u = 0; u < NORM_VEC; u++) {
            int i = v + 256 * u;
            ss += sq4(i < D4 ? ys[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
        }
        ss = warp_sum(ss);
        if (lane == 0) shv[vw] = ss;
    }
    bar_first(work);
    float ss = warp_sum(lane < 8 ? shv[lane] : 0.0f);
    return 1.0f / sqrtf(ss / (float)D + eps);
}

// Normed float4 i of token t's y (weights g), stored with its quantized block by the warp
// whose 32 lanes hold that block of 128.
__device__ __forceinline__ void hc_store_normed(const HcPreArgs& a, int t, int i, float4 o, float4 g, float inv) {
    float4 v = make_float4(g.x * (o.x * inv), g.y * (o.y * inv), g.z * (o.z * inv), g.w * (o.w * inv));
    ((float4*)(a.y + (long)t * a.D))[i] = v;
    if (!a.q) return;
    long b = ((long)t * a.D >> 7) + (i >> 5);
    float sc = quant_block(v, a.q + 128 * b, false, a.qp + 128 * b);
    if ((threadIdx.x & 31) == 0) a.s[b] = sc;
}

template <int M>
__device__ void hc_pre_m(const HcPreArgs& a) {
    const int NP = HcPre<M>::NP;
    __shared__ __align__(8) unsigned long long bars[2];
    __shared__ HcPre<M> sh;
    extern __shared__ float4 dyn[];
    const int C = gridDim.x, s = blockIdx.x, t = blockIdx.y, D = a.D, D4 = D >> 2;
    const int per = D4 / C, tid = threadIdx.x, nw = blockDim.x >> 5;
    // dyn: this block's float4 of the copies, the gathered row of y (with the norm), the C
    // blocks' partials.
    float4* xs = dyn;
    float4* ys = xs + blockDim.x;
    float* parts = (float*)(ys + (a.rms_w ? D4 : 0));
    // The barriers exist in every block before any block writes to it; before the weights'
    // loads, so that the cluster's barrier waits for none of them.
    u32 bar_mix = smem_addr(&bars[0]), bar_y = smem_addr(&bars[1]);
    if (tid == 0) {
        mbar_expect(bar_mix, 4 * C * NP);
        if (a.rms_w) mbar_expect(bar_y, 16 * D4);
    }
    cluster_sync_relaxed();
    float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (a.rms_w && tid < per) g = ((const float4*)a.rms_w)[s * per + tid];
    float4 w[HcPre<M>::n];
    hc_weights<M>(a, s, C, w);
    pdl_wait();
    float4 xv;
    if (a.pa) {
        // The residual first: the thread's float4 of each copy (its block holds these dims of
        // every copy, so one barrier orders the loads before the stores).
        const auto [j, c4] = hc_slot(D, s, C);
        float4* x4 = (float4*)(a.x + (long)t * M * D);
        float4 v[M];
#pragma unroll
        for (int i = 0; i < M; i++) v[i] = x4[i * D4 + c4];
        xv = hc_post_val<M>(v, hc_post_in(a.pa, a.pa2, (long)t * D4 + c4), a.pcomb + (long)t * M * M,
                            a.ppost[t * M + j], j);
        __syncthreads();
        x4[j * D4 + c4] = xv;
    } else {
        xv = hc_stream<M>(a, s, C, t);
    }
    hc_partials<M>(sh, w, xv, xs);
    if (tid < C) {
        u32 dst = cluster_addr(smem_addr(parts + s * NP), tid), bar = cluster_addr(bar_mix, tid);
        for (int r = 0; r < NP; r += 4) st_async4(dst + 4 * r, *(const float4*)&sh.part[r], bar);
    }
    mbar_wait0(bar_mix);
    if (!hc_gates<M>(a, sh, parts, s, t, C)) return;
    float4 o = tid < per ? hc_reduce<M>(xs + tid, per, sh.pre) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (!a.rms_w) {
        if (tid < per) ((float4*)(a.y + (long)t * D))[s * per + tid] = o;
        return;
    }
    // Each of the slice's threads sends its float4 to every block (this one included).
    if (tid < per) {
        u32 dst = smem_addr(ys + s * per + tid);
        for (int b = 0; b < C; b++) st_async4(cluster_addr(dst, b), o, cluster_addr(bar_y, b));
    }
    mbar_wait0(bar_y);
    float inv = hc_norm_inv(ys, D4, D, a.rms_eps, sh.shv, (nw - 1) * 32);
    if (tid < per) hc_store_normed(a, t, s * per + tid, o, g, inv);
}

// Token t's row by the block that finished its partials last (the C blocks' partials in
// `parts`' space): the gates, Sinkhorn (the last warp), the reduction and the norm. Every
// thread reaches its final barrier.
template <int M>
__device__ void hc_row(const HcPreArgs& a, HcPre<M>& sh, float* parts, float4* ys, int t, int C) {
    const int NP = HcPre<M>::NP, D = a.D, D4 = D >> 2, tid = threadIdx.x, work = ((blockDim.x >> 5) - 1) * 32;
    __threadfence();
    for (int k = tid; k < C * NP; k += blockDim.x) parts[k] = ((volatile float*)a.part)[(long)t * C * NP + k];
    __syncthreads();
    if (hc_gates<M>(a, sh, parts, 0, t, C)) {
        const float4* x4 = (const float4*)(a.x + (long)t * M * D);
        float4* y4 = (float4*)(a.y + (long)t * D);
        for (int i = tid; i < D4; i += work) {
            float4 o = hc_reduce<M>(x4 + i, D4, sh.pre);
            if (a.rms_w) ys[i] = o;
            else y4[i] = o;
        }
        if (a.rms_w) {
            bar_first(work);
            float inv = hc_norm_inv(ys, D4, D, a.rms_eps, sh.shv, work);
            for (int i = tid; i < D4; i += work) hc_store_normed(a, t, i, ys[i], ((const float4*)a.rms_w)[i], inv);
        }
    }
    __syncthreads();
}

// Tokens a block of `hc_pre_rows_m4` takes: its mix weights, loaded once, serve them all (a
// block a token read the step's 1.5 MB of weights once a token: 8.4 ms of a four-layer 4K
// prefill, 2026-12-02 sixth session).
#define HC_ROWS_TOKENS 8

template <int M>
__device__ void hc_pre_rows_m(const HcPreArgs& a) {
    const int n = HcPre<M>::n, NP = HcPre<M>::NP, TT = HC_ROWS_TOKENS;
    __shared__ HcPre<M> sh;
    __shared__ float red[TT][16][n + 1];
    __shared__ int last[TT];
    extern __shared__ float4 dyn[];
    const int C = gridDim.x, s = blockIdx.x, D4 = a.D >> 2, tid = threadIdx.x;
    const int t0 = blockIdx.y * TT, nt = a.T - t0 < TT ? a.T - t0 : TT;
    float4* ys = dyn + blockDim.x;
    float* parts = (float*)(ys + D4);
    float4 w[n];
    hc_weights<M>(a, s, C, w);
    pdl_wait();
    float4 xv = hc_stream<M>(a, s, C, t0);
    for (int u = 0; u < nt; u++) {
        float4 xn = u + 1 < nt ? hc_stream<M>(a, s, C, t0 + u + 1) : xv;  // the next token's, in flight
        hc_warp_sums<M>(w, xv, red[u]);
        xv = xn;
    }
    __syncthreads();
    for (int q = tid; q < nt * NP; q += blockDim.x)
        a.part[((long)(t0 + q / NP) * C + s) * NP + q % NP] = hc_block_part<M>(red[q / NP], q % NP);
    __threadfence();
    __syncthreads();
    if (tid < nt) {
        last[tid] = atomicAdd(&a.done[t0 + tid], 1u) == (u32)C - 1;
        if (last[tid]) a.done[t0 + tid] = 0;  // zero again for the next launch
    }
    __syncthreads();
    for (int u = 0; u < nt; u++)
        if (last[u]) hc_row<M>(a, sh, parts, ys, t0 + u, C);
}

extern "C" __global__ void __launch_bounds__(512) hc_pre_m4(HcPreArgs a) { hc_pre_m<4>(a); }
extern "C" __global__ void __launch_bounds__(512) hc_pre_rows_m4(HcPreArgs a) { hc_pre_rows_m<4>(a); }

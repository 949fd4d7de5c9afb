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

// X'_k = post_k a + sum_j comb[j][k] X_j, in place: one thread a token and dim, or, for four
// copies and D % 4 == 0 (the host launches a quarter of the threads then), four dims. With `a2`,
// a is the sum a + a2 (added as `add_k` would).
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
    const float* c = comb + t * M * M;
    float4 av = ((const float4*)a)[i];
    if (a2) {
        float4 bv = ((const float4*)a2)[i];
        av = make_float4(av.x + bv.x, av.y + bv.y, av.z + bv.z, av.w + bv.w);
    }
#pragma unroll
    for (int k = 0; k < M; k++) {
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int j = 0; j < M; j++) {
            float cj = c[j * M + k];
            s.x += cj * v[j].x;
            s.y += cj * v[j].y;
            s.z += cj * v[j].z;
            s.w += cj * v[j].w;
        }
        float p = post[t * M + k];
        xs[k * D4 + d] = make_float4(p * av.x + s.x, p * av.y + s.y, p * av.z + s.z, p * av.w + s.w);
    }
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
    const float* x;     // [T, M, D] streams
    const float* base;
    const float* scale;
    float* y;           // [T, D]
    float* post;        // [T, M]
    float* comb;        // [T, M, M]
    int D, iters;
    float hc_eps, norm_eps;
    // The sublayer's RMS norm of y, or null: its weights, eps and quant_act's output (rms_norm).
    const float* rms_w;
    u16* q;
    u16* qp;
    float* s;
    float rms_eps;
};

// The whole mHC pre step in one launch: the mixes fn @ x, the stream's RMS, the gates, Sinkhorn
// and the reduction, by a cluster of C blocks a token (grid C x T; block dim M * D / 4C, one
// float4 of the stream a thread). Block s of a cluster holds dims [s D/C, (s+1) D/C) of every
// copy: it sums its slice of each mix and of the sum of squares and writes the partials into
// every block of the cluster (distributed shared memory, one thread a receiving block), so that
// each block adds the C partials, in block order, itself: no block waits for a last one
// through global memory. Then every block reduces its dims of y from the copies it holds, and
// block 0's last warp runs Sinkhorn. With `rms_w` the blocks also send each other their dims
// of y, and each norms its own as `rms_norm` with 256 threads would (the same sums: each of
// rms_norm's threads' four float4, its warp's butterfly, the eight warps' in order, computed
// from the gathered row by warps that stand in for those threads), quantized rows included.
// The sums' order depends on the shape alone. M copies (a template: the mixes stay in
// registers).
template <int M>
__device__ void hc_pre_m(const HcPreArgs& a) {
    const int n = (2 + M) * M;
    __shared__ __align__(8) unsigned long long bars[2];
    __shared__ float red[16][n + 1];
    // The partials padded to whole float4 (sent 16 bytes at a time).
    const int NP = (n + 4) & ~3;
    __shared__ float mix[n + 1];
    __shared__ float pre[M];
    __shared__ __align__(16) float part[NP];
    __shared__ float shv[8];
    extern __shared__ float4 dyn[];
    const int C = gridDim.x, s = blockIdx.x, t = blockIdx.y, D = a.D, D4 = D >> 2, K = M * D;
    const int per = D4 / C, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    // dyn: this block's float4 of the copies (stream j's at j * per), the gathered row of y
    // (with the norm), the C blocks' partials.
    float4* xs = dyn;
    float4* ys = xs + blockDim.x;
    float* parts = (float*)(ys + (a.rms_w ? D4 : 0));
    const int j = tid / per, c4 = s * per + tid % per;
    // The barriers exist in every block before any block writes to it; before the weights'
    // loads, so that the cluster's barrier waits for none of them.
    u32 bar_mix = smem_addr(&bars[0]), bar_y = smem_addr(&bars[1]);
    if (tid == 0) {
        mbar_expect(bar_mix, 4 * C * NP);
        if (a.rms_w) mbar_expect(bar_y, 16 * D4);
    }
    cluster_sync_relaxed();
    float4 w[n];
#pragma unroll
    for (int r = 0; r < n; r++) {
        const float* p = a.fn + (long)r * K + (long)j * D + 4 * c4;
        asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];"
                     : "=f"(w[r].x), "=f"(w[r].y), "=f"(w[r].z), "=f"(w[r].w)
                     : "l"(p));
    }
    float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (a.rms_w && tid < per) g = ((const float4*)a.rms_w)[s * per + tid];
    pdl_wait();
    float4 xv = ((const float4*)(a.x + (long)t * K + (long)j * D))[c4];
    xs[tid] = xv;
    float acc[n + 1];
#pragma unroll
    for (int r = 0; r < n; r++) acc[r] = w[r].x * xv.x + w[r].y * xv.y + w[r].z * xv.z + w[r].w * xv.w;
    acc[n] = xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
#pragma unroll
    for (int r = 0; r <= n; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0) red[warp][r] = v;
    }
    __syncthreads();
    if (tid < NP) {
        float v = 0.0f;
        if (tid <= n)
            for (int u = 0; u < nw; u++) v += red[u][tid];
        part[tid] = v;
    }
    __syncthreads();
    if (tid < C) {
        u32 dst = cluster_addr(smem_addr(parts + s * NP), tid), bar = cluster_addr(bar_mix, tid);
        for (int r = 0; r < NP; r += 4) st_async4(dst + 4 * r, *(const float4*)&part[r], bar);
    }
    mbar_wait0(bar_mix);
    if (tid <= n) {
        float v = 0.0f;
        for (int b = 0; b < C; b++) v += parts[b * NP + tid];
        mix[tid] = v;
    }
    __syncthreads();
    float r = 1.0f / sqrtf(mix[n] / (float)K + a.norm_eps);
    if (tid < M) {
        pre[tid] = sigmoidf(mix[tid] * r * a.scale[0] + a.base[tid]) + a.hc_eps;
        if (s == 0) a.post[t * M + tid] = 2.0f * sigmoidf(mix[M + tid] * r * a.scale[1] + a.base[M + tid]);
    }
    __syncthreads();
    // The last warp: Sinkhorn in block 0, nothing elsewhere (the y and norm work below is the
    // other warps', so that no barrier waits for Sinkhorn).
    if (warp == nw - 1) {
        if (s == 0) sinkhorn_lanes<M>(mix, r, a.scale, a.base, a.comb + (long)t * M * M, a.iters, a.hc_eps);
        return;
    }
    const int work = (nw - 1) * 32;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (tid < per) {
#pragma unroll
        for (int i = 0; i < M; i++) {
            float4 v = xs[i * per + tid];
            o.x += pre[i] * v.x;
            o.y += pre[i] * v.y;
            o.z += pre[i] * v.z;
            o.w += pre[i] * v.w;
        }
    }
    float* yt = a.y + (long)t * D;
    if (!a.rms_w) {
        if (tid < per) ((float4*)yt)[s * per + tid] = o;
        return;
    }
    // Each of the slice's threads sends its float4 to every block (this one included).
    if (tid < per) {
        u32 dst = smem_addr(ys + s * per + tid);
        for (int b = 0; b < C; b++) st_async4(cluster_addr(dst, b), o, cluster_addr(bar_y, b));
    }
    mbar_wait0(bar_y);
    // rms_norm's 256 threads: thread v's float4 v + 256 u (u < 4, zero past the row), warp w
    // of them by the working warps in turn.
    for (int vw = warp; vw < 8; vw += nw - 1) {
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
    float inv = 1.0f / sqrtf(ss / (float)D + a.rms_eps);
    if (tid >= per) return;
    int i = s * per + tid;
    float4 v = make_float4(g.x * (o.x * inv), g.y * (o.y * inv), g.z * (o.z * inv), g.w * (o.w * inv));
    ((float4*)yt)[i] = v;
    if (!a.q) return;
    long b = ((long)t * D >> 7) + (i >> 5);
    float sc = quant_block(v, a.q + 128 * b, false, a.qp + 128 * b);
    if (lane == 0) a.s[b] = sc;
}

extern "C" __global__ void __launch_bounds__(512) hc_pre_m4(HcPreArgs a) { hc_pre_m<4>(a); }

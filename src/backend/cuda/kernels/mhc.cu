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

// The mix's Sinkhorn-normalized comb (M x M) by the first M*M lanes of warp 0, lane j*M + k
// holding entry (j, k); row and column sums taken in index order, as the CPU does.
__device__ void sinkhorn_lanes(const float* m, float r, const float* scale, const float* base,
                               float* comb, int M, int iters, float hc_eps) {
    int lane = threadIdx.x, j = lane / M, k = lane % M;
    bool live = lane < M * M;
    float c = live ? m[2 * M + lane] * r * scale[2] + base[2 * M + lane] : 0.0f;
    float mx = NEG_INF;
    for (int i = 0; i < M; i++) mx = fmaxf(mx, __shfl_sync(0xffffffffu, c, (j * M + i) & 31));
    c = expf(c - mx);
    float s = 0.0f;
    for (int i = 0; i < M; i++) s += __shfl_sync(0xffffffffu, c, (j * M + i) & 31);
    c = c / s + hc_eps;
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            s = 0.0f;
            for (int i = 0; i < M; i++) s += __shfl_sync(0xffffffffu, c, (j * M + i) & 31);
            c /= s + hc_eps;
        }
        s = 0.0f;
        for (int i = 0; i < M; i++) s += __shfl_sync(0xffffffffu, c, (i * M + k) & 31);
        c /= s + hc_eps;
    }
    if (live) comb[lane] = c;
}

// The same by one thread, for M*M > 32.
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
    if (M * M <= 32) {
        if (threadIdx.x < 32) sinkhorn_lanes(m, r, scale, base, comb + (long)t * M * M, M, iters, hc_eps);
    } else if (threadIdx.x == 0) {
        sinkhorn_serial(m, r, scale, base, comb + (long)t * M * M, M, iters, hc_eps);
    }
    __syncthreads();
    reduce_streams(xs, pre, y + (long)t * D, M, D, threadIdx.x, blockDim.x);
}

// X'_k = post_k a + sum_j comb[j][k] X_j, in place: one thread a token and dim, or, for four
// copies and D % 4 == 0 (the host launches a quarter of the threads then), four dims.
template <int M>
__device__ void hc_post_m(float* x, const float* a, const float* post, const float* comb, long i, int D) {
    int D4 = D >> 2;
    long t = i / D4;
    int d = i % D4;
    float4* xs = (float4*)(x + t * M * D);
    float4 v[M];
#pragma unroll
    for (int j = 0; j < M; j++) v[j] = xs[j * D4 + d];
    const float* c = comb + t * M * M;
    float4 av = ((const float4*)a)[i];
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

extern "C" __global__ void hc_post(float* x, const float* a, const float* post, const float* comb,
                                   int T, int M, int D) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (M == 4 && D % 4 == 0) {
        if (i < (long)T * (D >> 2)) hc_post_m<4>(x, a, post, comb, i, D);
        return;
    }
    if (i >= (long)T * D) return;
    long t = i / D;
    int d = i % D;
    float* xs = x + t * M * D;
    float v[HC_MAX];
    for (int j = 0; j < M; j++) v[j] = xs[j * D + d];
    const float* c = comb + t * M * M;
    float av = a[i];
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
    float* part;        // [T, S, (2 + M) M + 1] partial mixes and sums of squares
    u32* done;          // [T] blocks finished (zero; the last block resets it)
    int D, iters;
    float hc_eps, norm_eps;
    // The sublayer's RMS norm of y, or null: its weights, eps and quant_act's output (rms_norm).
    const float* rms_w;
    u16* q;
    u16* qp;
    float* s;
    float rms_eps;
};

// The whole mHC pre step: the mixes fn @ x, the stream's RMS, the gates, Sinkhorn and the
// reduction, in one launch. Block (t, s) takes 1,024 of the token's M*D values (four a thread):
// its slice of every mix and of the sum of squares goes to `part`; the token's last block to
// finish adds the S partials in order, then warp 0 runs Sinkhorn while the others reduce the
// streams. The sums' order depends on the shape alone. With `rms_w`, the block then norms y as
// rms_norm does with as many threads (one launch fewer). M copies (a template: the mixes stay
// in registers); the host takes the two-kernel path for other M.
template <int M>
__device__ void hc_pre_m(const HcPreArgs& a) {
    const int n = (2 + M) * M;
    __shared__ float red[8][n + 1];
    __shared__ float mix[n + 1];
    __shared__ float pre[M];
    __shared__ float sh[32];
    __shared__ int last;
    int t = blockIdx.x, s = blockIdx.y, S = gridDim.y, D = a.D;
    int K = M * D, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* xs = a.x + (long)t * K;
    int k = s * 1024 + 4 * threadIdx.x;
    // Every row's four weights in flight at once, before the kernel waits for its input.
    float4 w[n];
#pragma unroll
    for (int j = 0; j < n; j++) {
        w[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (k < K) {
            const float* p = a.fn + (long)j * K + k;
            asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];"
                         : "=f"(w[j].x), "=f"(w[j].y), "=f"(w[j].z), "=f"(w[j].w)
                         : "l"(p));
        }
    }
    pdl_wait();
    float4 xv = k < K ? *(const float4*)(xs + k) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float acc[n + 1];
#pragma unroll
    for (int j = 0; j < n; j++) acc[j] = w[j].x * xv.x + w[j].y * xv.y + w[j].z * xv.z + w[j].w * xv.w;
    acc[n] = xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
#pragma unroll
    for (int j = 0; j <= n; j++) {
        float v = warp_sum(acc[j]);
        if (lane == 0) red[warp][j] = v;
    }
    __syncthreads();
    float* pt = a.part + ((long)t * S + s) * (n + 1);
    if ((int)threadIdx.x <= n) {
        float v = 0.0f;
        for (int w = 0; w < 8; w++) v += red[w][threadIdx.x];
        pt[threadIdx.x] = v;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&a.done[t], 1u) == (u32)S - 1;
        if (last) a.done[t] = 0;  // zero again for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if ((int)threadIdx.x <= n) {
        float v = 0.0f;
        for (int j = 0; j < S; j++) v += ((volatile float*)a.part)[((long)t * S + j) * (n + 1) + threadIdx.x];
        mix[threadIdx.x] = v;
    }
    __syncthreads();
    float r = 1.0f / sqrtf(mix[n] / (float)K + a.norm_eps);
    if ((int)threadIdx.x < M) {
        int j = threadIdx.x;
        pre[j] = sigmoidf(mix[j] * r * a.scale[0] + a.base[j]) + a.hc_eps;
        a.post[t * M + j] = 2.0f * sigmoidf(mix[M + j] * r * a.scale[1] + a.base[M + j]);
    }
    __syncthreads();
    if (warp == 0) {
        if (M * M <= 32) sinkhorn_lanes(mix, r, a.scale, a.base, a.comb + (long)t * M * M, M, a.iters, a.hc_eps);
        else if (lane == 0) sinkhorn_serial(mix, r, a.scale, a.base, a.comb + (long)t * M * M, M, a.iters, a.hc_eps);
    } else {
        reduce_streams(xs, pre, a.y + (long)t * D, M, D, threadIdx.x - 32, blockDim.x - 32);
    }
    if (threadIdx.x == 0) a.done[t] = 0;
    if (a.rms_w) {
        __syncthreads();
        float4 g[NORM_VEC];
        norm_weights(a.rms_w, D, g);
        norm_row(a.y + (long)t * D, g, D, a.rms_eps, t, a.q, a.qp, a.s, sh);
    }
}

extern "C" __global__ void __launch_bounds__(256) hc_pre_m4(HcPreArgs a) { hc_pre_m<4>(a); }

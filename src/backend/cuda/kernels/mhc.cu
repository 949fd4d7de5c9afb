// Manifold-constrained hyper-connections. The mixes `fn @ x` come from the linear kernels; these
// kernels apply the stream's RMS, the sigmoids, Sinkhorn and the reductions.

#define HC_MAX 8

// The sum of squares of a token's M*D stream values, over the block (loads issued four at a
// time, so a thread waits for memory once per four).
__device__ float stream_ss(const float* xs, int n, float* sh) {
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xs[i] * xs[i];
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

// One block a token: y = sum_j pre_j X_j; post and comb for hc_post.
extern "C" __global__ void hc_mix(const float* mix, const float* x, const float* base,
                                  const float* scale, float* y, float* post, float* comb, int M,
                                  int D, int iters, float hc_eps, float norm_eps) {
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
#pragma unroll 4
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < M; j++) acc += pre[j] * xs[j * D + d];
        y[(long)t * D + d] = acc;
    }
}

// X'_k = post_k a + sum_j comb[j][k] X_j, in place (one thread a token and dim).
extern "C" __global__ void hc_post(float* x, const float* a, const float* post, const float* comb,
                                   int T, int M, int D) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
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
    __shared__ float sh[32];
    __shared__ float pre[HC_MAX];
    int t = blockIdx.x;
    const float* xs = x + (long)t * M * D;
    float r = 1.0f / sqrtf(stream_ss(xs, M * D, sh) / (float)(M * D) + norm_eps);
    if ((int)threadIdx.x < M)
        pre[threadIdx.x] = sigmoidf(mix[(long)t * M + threadIdx.x] * r * scale + base[threadIdx.x]) + hc_eps;
    __syncthreads();
#pragma unroll 4
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < M; j++) acc += pre[j] * xs[j * D + d];
        y[(long)t * D + d] = acc;
    }
}

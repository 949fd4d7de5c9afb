// Manifold-constrained hyper-connections. The mixes `fn @ x` come from the linear kernels; these
// kernels apply the stream's RMS, the sigmoids, Sinkhorn and the reductions.

#define HC_MAX 8

// One block a token: y = sum_j pre_j X_j; post and comb for hc_post.
extern "C" __global__ void hc_mix(const float* mix, const float* x, const float* base,
                                  const float* scale, float* y, float* post, float* comb, int M,
                                  int D, int iters, float hc_eps, float norm_eps) {
    __shared__ float sh[32];
    __shared__ float pre[HC_MAX];
    int t = blockIdx.x, n = (2 + M) * M;
    const float* xs = x + (long)t * M * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < M * D; i += blockDim.x) ss += xs[i] * xs[i];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)(M * D) + norm_eps);
    if (threadIdx.x == 0) {
        const float* m = mix + (long)t * n;
        float c[HC_MAX * HC_MAX];
        for (int j = 0; j < M; j++) {
            pre[j] = sigmoidf(m[j] * r * scale[0] + base[j]) + hc_eps;
            post[t * M + j] = 2.0f * sigmoidf(m[M + j] * r * scale[1] + base[M + j]);
        }
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
        for (int k = 0; k < M * M; k++) comb[(long)t * M * M + k] = c[k];
    }
    __syncthreads();
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
    float ss = 0.0f;
    for (int i = threadIdx.x; i < M * D; i += blockDim.x) ss += xs[i] * xs[i];
    ss = block_sum(ss, sh);
    float r = 1.0f / sqrtf(ss / (float)(M * D) + norm_eps);
    if ((int)threadIdx.x < M)
        pre[threadIdx.x] = sigmoidf(mix[(long)t * M + threadIdx.x] * r * scale + base[threadIdx.x]) + hc_eps;
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < M; j++) acc += pre[j] * xs[j * D + d];
        y[(long)t * D + d] = acc;
    }
}

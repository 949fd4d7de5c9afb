// Norms, rotations, element-wise operations and the embedding.

// x = w * (x * rsqrt(mean(x^2) + eps)) on each row of width d (one block a row). A thread
// holds up to NORM_VEC float4 of the row in registers between the sum and the scaling (rows
// with d % 4 != 0 or wider than 4 * NORM_VEC * blockDim take the scalar loops).
#define NORM_VEC 4

__device__ __forceinline__ bool norm_vec_fits(int d) { return (d & 3) == 0 && (d >> 2) <= NORM_VEC * (int)blockDim.x; }

// The vector path: the weights' float4 i = threadIdx.x + u * blockDim.x, loaded before the
// kernel waits for its input (no kernel writes weights).
__device__ __forceinline__ void norm_weights(const float* __restrict__ w, int d, float4* g) {
#pragma unroll
    for (int u = 0; u < NORM_VEC; u++) {
        int i = threadIdx.x + u * blockDim.x;
        g[u] = i < (d >> 2) ? ((const float4*)w)[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// A float4's sum of squares, as the norms add it (hc_pre's fused norm takes the same sums).
__device__ __forceinline__ float sq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

// Then the row's float4 i in v[u] (zero past the row), normed in place.
__device__ void norm_vec(const float* r, const float4* g, int d, float eps, float4* v, float* sh) {
    int n4 = d >> 2;
    float ss = 0.0f;
#pragma unroll
    for (int u = 0; u < NORM_VEC; u++) {
        int i = threadIdx.x + u * blockDim.x;
        v[u] = i < n4 ? ((const float4*)r)[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += sq4(v[u]);
    }
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
#pragma unroll
    for (int u = 0; u < NORM_VEC; u++)
        v[u] = make_float4(g[u].x * (v[u].x * inv), g[u].y * (v[u].y * inv), g[u].z * (v[u].z * inv),
                           g[u].w * (v[u].w * inv));
}

// Where code e of a group of 8 goes in the activations of FP4 products: the order 0 2 1 3 4 6 5
// 7, the pairs `a_frags_f4` decodes weights in.
__device__ __forceinline__ int f4_slot(int e) { return (e & 4) | ((e & 1) << 1) | ((e >> 1) & 1); }

// One lane's share of quant_act: values 4 lane .. 4 lane + 3 of a block of 128, whose warp
// holds the block; codes to `o` (the block's 128, in `f4_slot` order with `perm`), the scale
// returned.
__device__ __forceinline__ float quant_block(float4 v, u16* o, bool perm, u16* o_perm = 0) {
    int lane = threadIdx.x & 31;
    float am = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    float sc = fp8_scale(warp_max(am));
    // A power of two's reciprocal is exact: c * inv has c / sc's bits.
    float inv = 1.0f / sc;
    float c[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float code = round_e4m3(fminf(fmaxf(c[i] * inv, -FP8_MAX), FP8_MAX));
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(code));
        int e = 4 * (lane & 1) + i, g = 8 * (lane >> 1);
        o[g + (perm ? f4_slot(e) : e)] = h;
        if (o_perm) o_perm[g + f4_slot(e)] = h;
    }
    return sc;
}

// With `q` (rows of d % 128 == 0 on the vector path), also quant_act's output of the normed
// row, in both orders (`q` and `qp`, scales `s`): its linears then need no launch of their own.
// With blockDim a multiple of 32, a warp's 32 float4 of one u are one block of 128.
// The vector path of row `row` (`r`, normed in place), with quant_act's output as above.
__device__ void norm_row(float* r, const float4* g, int d, float eps, long row, u16* q, u16* qp,
                         float* s, float* sh) {
    float4 v[NORM_VEC];
    norm_vec(r, g, d, eps, v, sh);
#pragma unroll
    for (int u = 0; u < NORM_VEC; u++) {
        int i = threadIdx.x + u * blockDim.x;
        if (i >= (d >> 2)) break;
        ((float4*)r)[i] = v[u];
        if (!q) continue;
        long b = (row * d >> 7) + (i >> 5);
        float sc = quant_block(v[u], q + 128 * b, false, qp + 128 * b);
        if ((threadIdx.x & 31) == 0) s[b] = sc;
    }
}

extern "C" __global__ void rms_norm(float* x, const float* __restrict__ w, int d, float eps, u16* q,
                                    u16* qp, float* s) {
    __shared__ float sh[32];
    float* r = x + (long)blockIdx.x * d;
    if (norm_vec_fits(d)) {
        float4 g[NORM_VEC];
        norm_weights(w, d, g);
        pdl_wait();
        norm_row(r, g, d, eps, blockIdx.x, q, qp, s, sh);
        return;
    }
    pdl_wait();
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += r[i] * r[i];
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] = w[i] * (r[i] * inv);
}

// Rotates the pair (x0, x1) by angle p * freq (backwards with `inverse`).
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float p, float freq, int inverse) {
    float a = p * freq, c, s;
    rope_sincos(a, &s, &c);
    float y0 = x0, y1 = x1;
    if (inverse) {
        x0 = y0 * c + y1 * s;
        x1 = y1 * c - y0 * s;
    } else {
        x0 = y0 * c - y1 * s;
        x1 = y0 * s + y1 * c;
    }
}

// Rotates pair i of the last 2 * half dims of a head at position p.
__device__ __forceinline__ void rotate(float* h, int dh, int half, int i, float p, const float* freqs,
                                       int inverse) {
    float* pr = h + dh - 2 * half + 2 * i;
    rotate_pair(pr[0], pr[1], p, freqs[i], inverse);
}

// Each head (block (t, h)) scaled by its own rsqrt(mean(q^2) + eps), then rotated.
extern "C" __global__ void head_norm_rope(float* q, const u32* pos, const float* freqs, int heads,
                                          int dh, int half, float eps) {
    pdl_wait();
    __shared__ float sh[32];
    int t = blockIdx.x / heads, h = blockIdx.x % heads;
    float* x = q + ((long)t * heads + h) * dh;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dh; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)dh + eps);
    for (int i = threadIdx.x; i < dh; i += blockDim.x) x[i] *= inv;
    __syncthreads();
    float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) rotate(x, dh, half, i, p, freqs, 0);
}

// Rotates the last 2 * half dims of each of `heads` heads of each token (one thread a pair).
extern "C" __global__ void rope(float* x, const u32* pos, const float* freqs, int T, int heads,
                                int dh, int half, int inverse) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * heads * half) return;
    int pair = i % half;
    long th = i / half;
    int t = th / heads;
    rotate(x + th * dh, dh, half, pair, (float)pos[t], freqs, inverse);
}

// Indexer queries (block (t, h), one thread a dim): rotated, Hadamard-transformed (scaled by
// `hs`), FP4-rounded in blocks of 32.
extern "C" __global__ void index_queries(float* q, const u32* pos, const float* freqs, int heads,
                                         int dim, int half, float hs) {
    pdl_wait();
    extern __shared__ float v[];
    int t = blockIdx.x / heads;
    float* x = q + (long)blockIdx.x * dim;
    int j = threadIdx.x;
    if (j < half) rotate(x, dim, half, j, (float)pos[t], freqs, 0);
    __syncthreads();
    v[j] = x[j];
    __syncthreads();
    for (int h = 1; h < dim; h *= 2) {
        float a = v[j], b = v[j ^ h];
        __syncthreads();
        v[j] = (j & h) ? b - a : a + b;
        __syncthreads();
    }
    float y = v[j] * hs;
    float am = warp_max(fabsf(y));
    x[j] = fq4(y, fp4_scale(am));
}

extern "C" __global__ void scale_k(float* x, long n, float s) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

extern "C" __global__ void add_k(float* x, const float* y, long n) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[t, c, :] += e[t, :] for each of the `copies` parts of row t.
extern "C" __global__ void add_to_copies(float* x, const float* e, int T, int copies, int d) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * copies * d) return;
    long t = i / ((long)copies * d);
    x[i] += e[t * d + i % d];
}

// silu(min(g, L)) * clamp(u, -L, L) (no clamp when L = 0).
__device__ __forceinline__ float swiglu1(float g, float u, float limit) {
    if (limit > 0.0f) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
    }
    return g / (1.0f + expf(-g)) * u;
}

extern "C" __global__ void swiglu(const float* g, const float* u, float* out, long n, float limit) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = swiglu1(g[i], u[i], limit);
}

// out[t, c, :] = table[tokens[t], :] for each of `copies` parts.
extern "C" __global__ void embed(const u8* W, const u8* S, int fmt, const u32* tokens, float* out,
                                 int T, int copies, int d) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * copies * d) return;
    long t = i / ((long)copies * d);
    out[i] = wval(fmt, W, S, tokens[t], i % d, d);
}

// Linear layers against weights in checkpoint precision: FP8 (128x128 block scales), packed FP4
// (1x32 scales), BF16, F32. Activations are f32; an FP8/FP4 linear first rounds them to FP8 in
// blocks of 128 (fake_quant_fp8), as the reference does. Products of decoded values are exact
// in f32, so these kernels differ from the CPU only in the order of their sums.

// Rounds each block of 128 values to e4m3 with its power-of-two scale (one warp a block).
extern "C" __global__ void fake_quant_fp8(const float* x, float* y, int nblocks) {
    int b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (b >= nblocks) return;
    float4 v = ((const float4*)(x + (long)b * 128))[lane];
    float am = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    float s = fp8_scale(warp_max(am));
    float4 o = make_float4(fq8(v.x, s), fq8(v.y, s), fq8(v.z, s), fq8(v.w, s));
    ((float4*)(y + (long)b * 128))[lane] = o;
}

// Elements a lane decodes from one 16-byte load.
template <int FMT> struct Chunk;
template <> struct Chunk<FMT_F8> { static const int N = 16; };
template <> struct Chunk<FMT_F4> { static const int N = 32; };
template <> struct Chunk<FMT_BF16> { static const int N = 8; };
template <> struct Chunk<FMT_F32> { static const int N = 4; };

// Decodes the CH weights of row n starting at column k0 (scales applied) into w.
template <int FMT>
__device__ __forceinline__ void decode_chunk(const u8* W, const u8* S, long n, long k0, long K,
                                             const float* lut, float* w) {
    const int CH = Chunk<FMT>::N;
    if (FMT == FMT_F8) {
        uint4 q = *(const uint4*)(W + n * K + k0);
        float s = e8m0(S[(n / 128) * ((K + 127) / 128) + k0 / 128]);
        u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) w[i * 4 + j] = e4m3((words[i] >> (8 * j)) & 0xff) * s;
    } else if (FMT == FMT_F4) {
        uint4 q = *(const uint4*)(W + n * (K / 2) + k0 / 2);
        float s = e8m0(S[n * (K / 32) + k0 / 32]);
        u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 8; j++) w[i * 8 + j] = lut[(words[i] >> (4 * j)) & 15] * s;
    } else if (FMT == FMT_BF16) {
        uint4 q = *(const uint4*)((const u16*)W + n * K + k0);
        u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __int_as_float(words[i] << 16);
            w[2 * i + 1] = __int_as_float(words[i] & 0xffff0000u);
        }
    } else {
        float4 q = *(const float4*)((const float*)W + n * K + k0);
        w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
    }
    (void)CH;
}

// Y[r, n] = sum_k X[r, g(n) K + k] W[n, k] for r < R <= 8: one warp (or KS warps splitting K)
// per output, 16-byte weight loads, the weights decoded in registers. g(n) = n / group_rows
// when group_rows > 0 (the grouped output projection), else 0. Needs K % chunk == 0.
template <int FMT>
__device__ void gemv(const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R,
                     int ldx, int ldy, int group_rows, int KS) {
    const int CH = Chunk<FMT>::N;
    __shared__ float lut[16];
    __shared__ float part[8][8];
    if (threadIdx.x < 16) lut[threadIdx.x] = E2M1[threadIdx.x];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rows_per_block = 8 / KS;
    int n = blockIdx.x * rows_per_block + warp / KS, ks = warp % KS;
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; r++) acc[r] = 0.0f;
    if (n < N) {
        const float* x = X + (group_rows > 0 ? (long)(n / group_rows) * K : 0);
        for (long k0 = (long)(ks * 32 + lane) * CH; k0 < K; k0 += (long)KS * 32 * CH) {
            float w[CH];
            decode_chunk<FMT>(W, S, n, k0, K, lut, w);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (r < R) {
                    const float4* xr = (const float4*)(x + (long)r * ldx + k0);
                    float a = 0.0f;
#pragma unroll
                    for (int i = 0; i < CH / 4; i++) {
                        float4 v = xr[i];
                        a = fmaf(w[4 * i], v.x, a);
                        a = fmaf(w[4 * i + 1], v.y, a);
                        a = fmaf(w[4 * i + 2], v.z, a);
                        a = fmaf(w[4 * i + 3], v.w, a);
                    }
                    acc[r] += a;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0) part[warp][r] = v;
    }
    __syncthreads();
    if (ks == 0 && n < N && lane < R) {
        float s = 0.0f;
        for (int j = 0; j < KS; j++) s += part[warp + j][lane];
        Y[(long)lane * ldy + n] = s;
    }
}

// The same product for any number of rows: 64x64 output tiles, weights decoded into shared
// memory. group_rows must be a multiple of 64.
template <int FMT>
__device__ void gemm(const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R,
                     int ldx, int ldy, int group_rows) {
    __shared__ float xs[32][65];
    __shared__ float ws[32][65];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    long r0 = (long)blockIdx.y * 64;
    long n0 = (long)blockIdx.x * 64;
    const float* xg = X + (group_rows > 0 ? (long)(n0 / group_rows) * K : 0);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (long k0 = 0; k0 < K; k0 += 32) {
        for (int i = threadIdx.x; i < 64 * 32; i += blockDim.x) {
            int rr = i / 32, kk = i % 32;
            long k = k0 + kk;
            long r = r0 + rr, n = n0 + rr;
            xs[kk][rr] = (r < R && k < K) ? xg[r * ldx + k] : 0.0f;
            ws[kk][rr] = (n < N && k < K) ? wval(FMT, W, S, n, k, K) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < 32; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a[i] = xs[kk][ty * 4 + i];
                b[i] = ws[kk][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        long r = r0 + ty * 4 + i;
        if (r >= R) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            long n = n0 + tx * 4 + j;
            if (n < N) Y[r * ldy + n] = acc[i][j];
        }
    }
}

#define LINEAR_KERNELS(NAME, FMT)                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_##NAME(                             \
        const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R, int ldx,      \
        int ldy, int group_rows, int KS) {                                                     \
        gemv<FMT>(W, S, X, Y, N, K, R, ldx, ldy, group_rows, KS);                              \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gemm_##NAME(                             \
        const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R, int ldx,      \
        int ldy, int group_rows) {                                                             \
        gemm<FMT>(W, S, X, Y, N, K, R, ldx, ldy, group_rows);                                  \
    }

LINEAR_KERNELS(f8, FMT_F8)
LINEAR_KERNELS(f4, FMT_F4)
LINEAR_KERNELS(bf16, FMT_BF16)
LINEAR_KERNELS(f32, FMT_F32)

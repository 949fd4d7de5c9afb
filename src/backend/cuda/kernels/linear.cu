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

// Y[r, n] = sum_k X[r, g(n) K + k] W[n, k]: one warp (or KS warps splitting K) per output,
// 16-byte weight loads decoded in registers and applied to 8 activation rows at a time.
// g(n) = n / group_rows when group_rows > 0 (the grouped output projection), else 0. Each
// output is summed in an order that depends on N and K alone (lane chunks, then the warp's
// butterfly, then the KS partials in order), never on R: a row gets the same bits alone or in
// any batch. Needs K % chunk == 0.
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
    const float* x = X + (group_rows > 0 && n < N ? (long)(n / group_rows) * K : 0);
    for (int r0 = 0; r0 < R; r0 += 8) {
        int rows = R - r0 < 8 ? R - r0 : 8;
        float acc[8];
#pragma unroll
        for (int r = 0; r < 8; r++) acc[r] = 0.0f;
        if (n < N) {
            for (long k0 = (long)(ks * 32 + lane) * CH; k0 < K; k0 += (long)KS * 32 * CH) {
                float w[CH];
                decode_chunk<FMT>(W, S, n, k0, K, lut, w);
#pragma unroll
                for (int r = 0; r < 8; r++) {
                    if (r < rows) {
                        const float4* xr = (const float4*)(x + (long)(r0 + r) * ldx + k0);
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
        if (ks == 0 && n < N && lane < rows) {
            float s = 0.0f;
            for (int j = 0; j < KS; j++) s += part[warp + j][lane];
            Y[(long)(r0 + lane) * ldy + n] = s;
        }
        __syncthreads();
    }
}

#define LINEAR_KERNELS(NAME, FMT)                                                              \
    extern "C" __global__ void __launch_bounds__(256) gemv_##NAME(                             \
        const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R, int ldx,      \
        int ldy, int group_rows, int KS) {                                                     \
        gemv<FMT>(W, S, X, Y, N, K, R, ldx, ldy, group_rows, KS);                              \
    }

LINEAR_KERNELS(f8, FMT_F8)
LINEAR_KERNELS(f4, FMT_F4)
LINEAR_KERNELS(bf16, FMT_BF16)
LINEAR_KERNELS(f32, FMT_F32)

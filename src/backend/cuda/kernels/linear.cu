// Linear layers against weights in checkpoint precision: FP8 (128x128 block scales), packed FP4
// (1x32 scales), BF16, F32. Activations are f32; an FP8/FP4 linear first rounds them to FP8 in
// blocks of 128 (fake_quant_fp8), as the reference does. Products of decoded values are exact
// in f32, so these kernels differ from the CPU only in the order of their sums.

// Rounds each block of 128 values to e4m3 with its power-of-two scale (one warp a block).
extern "C" __global__ void fake_quant_fp8(const float* x, float* y, int nblocks) {
    pdl_wait();
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

// A chunk's bytes and its scale, as loaded (decoded later, so that several loads are in flight).
struct Raw {
    uint4 q;
    float s;
};

// Loads the CH weights of row n starting at column k0 and their scale.
template <int FMT>
__device__ __forceinline__ Raw load_chunk(const u8* W, const u8* S, long n, long k0, long K) {
    Raw r;
    r.s = 1.0f;
    if (FMT == FMT_F8) {
        r.q = *(const uint4*)(W + n * K + k0);
        r.s = e8m0(S[(n / 128) * ((K + 127) / 128) + k0 / 128]);
    } else if (FMT == FMT_F4) {
        r.q = *(const uint4*)(W + n * (K / 2) + k0 / 2);
        r.s = e8m0(S[n * (K / 32) + k0 / 32]);
    } else if (FMT == FMT_BF16) {
        r.q = *(const uint4*)((const u16*)W + n * K + k0);
    } else {
        r.q = *(const uint4*)((const float*)W + n * K + k0);
    }
    return r;
}

// The CH weights of a loaded chunk, scale applied.
template <int FMT>
__device__ __forceinline__ void decode_raw(Raw r, const float* lut, float* w) {
    u32 words[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
    if (FMT == FMT_F8) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) w[i * 4 + j] = e4m3((words[i] >> (8 * j)) & 0xff) * r.s;
    } else if (FMT == FMT_F4) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 8; j++) w[i * 8 + j] = lut[(words[i] >> (4 * j)) & 15] * r.s;
    } else if (FMT == FMT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __int_as_float(words[i] << 16);
            w[2 * i + 1] = __int_as_float(words[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __int_as_float(words[i]);
    }
}

// Decodes the CH weights of row n starting at column k0 (scales applied) into w.
template <int FMT>
__device__ __forceinline__ void decode_chunk(const u8* W, const u8* S, long n, long k0, long K,
                                             const float* lut, float* w) {
    decode_raw<FMT>(load_chunk<FMT>(W, S, n, k0, K), lut, w);
}

// A chunk's products with activations v, summed alone (the order both gemv kernels keep).
template <int CH>
__device__ __forceinline__ float chunk_dot(const float* w, const float4* v) {
    float a = 0.0f;
#pragma unroll
    for (int i = 0; i < CH / 4; i++) {
        float4 x = v[i];
        a = fmaf(w[4 * i], x.x, a);
        a = fmaf(w[4 * i + 1], x.y, a);
        a = fmaf(w[4 * i + 2], x.z, a);
        a = fmaf(w[4 * i + 3], x.w, a);
    }
    return a;
}

// acc[r] += the chunk's products with rows r0 + r of X (each chunk summed alone, then added).
template <int FMT>
__device__ __forceinline__ void gemv_chunk(const float* w, const float* x, long k0, int r0,
                                           int rows, int ldx, float* acc) {
    const int CH = Chunk<FMT>::N;
#pragma unroll
    for (int r = 0; r < 8; r++)
        if (r < rows) acc[r] += chunk_dot<CH>(w, (const float4*)(x + (long)(r0 + r) * ldx + k0));
}

// Chunks a lane loads before it multiplies: a warp's loads are in flight together rather than
// one memory latency after another.
#define GEMV_AHEAD 4

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
    pdl_wait();
    if (threadIdx.x < 16) lut[threadIdx.x] = E2M1[threadIdx.x];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rows_per_block = 8 / KS;
    int n = blockIdx.x * rows_per_block + warp / KS, ks = warp % KS;
    const float* x = X + (group_rows > 0 && n < N ? (long)(n / group_rows) * K : 0);
    const long step = (long)KS * 32 * CH;
    for (int r0 = 0; r0 < R; r0 += 8) {
        int rows = R - r0 < 8 ? R - r0 : 8;
        float acc[8];
#pragma unroll
        for (int r = 0; r < 8; r++) acc[r] = 0.0f;
        if (n < N) {
            long k0 = (long)(ks * 32 + lane) * CH;
            for (; k0 + (GEMV_AHEAD - 1) * step < K; k0 += GEMV_AHEAD * step) {
                Raw raw[GEMV_AHEAD];
#pragma unroll
                for (int u = 0; u < GEMV_AHEAD; u++) raw[u] = load_chunk<FMT>(W, S, n, k0 + u * step, K);
#pragma unroll
                for (int u = 0; u < GEMV_AHEAD; u++) {
                    float w[CH];
                    decode_raw<FMT>(raw[u], lut, w);
                    gemv_chunk<FMT>(w, x, k0 + u * step, r0, rows, ldx, acc);
                }
            }
            for (; k0 < K; k0 += step) {
                float w[CH];
                decode_chunk<FMT>(W, S, n, k0, K, lut, w);
                gemv_chunk<FMT>(w, x, k0, r0, rows, ldx, acc);
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

// Weight rows a warp of `gemv_rows`.
#define GEMV_NR 4
#ifndef GEMV_RA
#define GEMV_RA 4
#endif

// gemv for many activation rows (prefill, decode batches): a warp takes GEMV_NR weight rows,
// so that each activation chunk it loads serves GEMV_NR outputs (gemv re-reads every
// activation row for every weight row), and a block `rpb` rows, 8 a pass. With `rows_in_x`
// the row blocks are grid x and the weight tiles grid y, so that the blocks of a tile of
// weights run together and read it from memory once (a decode batch's few row blocks); else
// the other way round (a prefill's many). Each output's sum is gemv's, term for term: the
// lane's chunks in increasing k, each chunk summed alone and then added, the warp's
// butterfly, the KS partials in order; so a row gets the same bits from either kernel. No
// groups (one activation row serves all of W); BF16 and F32 weights (no FP4 table).
template <int FMT>
__device__ void gemv_rows(const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R,
                          int ldx, int ldy, int KS, int rpb, int rows_in_x) {
    static_assert(FMT == FMT_BF16 || FMT == FMT_F32, "gemv_rows decodes BF16 and F32 weights");
    static_assert(GEMV_NR * 8 == 32, "a lane of a warp stores each of its outputs");
    const int CH = Chunk<FMT>::N, NR = GEMV_NR;
    __shared__ float part[8][NR][8];
    pdl_wait();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, ks = warp % KS;
    int tile = rows_in_x ? blockIdx.y : blockIdx.x, rb = rows_in_x ? blockIdx.x : blockIdx.y;
    int n0 = (tile * (8 / KS) + warp / KS) * NR;
    const long step = (long)KS * 32 * CH;
    int r1 = min(R, (rb + 1) * rpb);
    for (int r0 = rb * rpb; r0 < r1; r0 += 8) {
        int rows = min(r1 - r0, 8);
        float acc[NR][8];
#pragma unroll
        for (int i = 0; i < NR; i++)
#pragma unroll
            for (int r = 0; r < 8; r++) acc[i][r] = 0.0f;
        if (n0 < N)
            for (long k0 = (long)(ks * 32 + lane) * CH; k0 < K; k0 += step) {
                float w[NR][CH];
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    if (n0 + i < N) decode_chunk<FMT>(W, S, n0 + i, k0, K, nullptr, w[i]);
                    else
#pragma unroll
                        for (int c = 0; c < CH; c++) w[i][c] = 0.0f;
                }
                // GEMV_RA activation rows' chunks loaded at once, then their products: the
                // loads had been the warps' main wait (Nsight Compute, 2026-12-03).
#pragma unroll
                for (int r = 0; r < 8; r += GEMV_RA) {
                    if (r >= rows) break;
                    float4 v[GEMV_RA][CH / 4];
#pragma unroll
                    for (int a = 0; a < GEMV_RA; a++)
#pragma unroll
                        for (int c = 0; c < CH / 4; c++)
                            v[a][c] = r + a < rows ? ((const float4*)(X + (long)(r0 + r + a) * ldx + k0))[c]
                                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                    for (int a = 0; a < GEMV_RA; a++)
#pragma unroll
                        for (int i = 0; i < NR; i++) acc[i][r + a] += chunk_dot<CH>(w[i], v[a]);
                }
            }
#pragma unroll
        for (int i = 0; i < NR; i++)
#pragma unroll
            for (int r = 0; r < 8; r++) {
                float v = warp_sum(acc[i][r]);
                if (lane == 0) part[warp][i][r] = v;
            }
        __syncthreads();
        // Lane (i, r) of the first of the KS warps: output n0 + i of row r0 + r.
        int i = lane >> 3, r = lane & 7;
        if (ks == 0 && n0 + i < N && r < rows) {
            float s = 0.0f;
            for (int j = 0; j < KS; j++) s += part[warp + j][i][r];
            Y[(long)(r0 + r) * ldy + n0 + i] = s;
        }
        __syncthreads();
    }
}

#define LINEAR_KERNELS(NAME, FMT)                                                              \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_##NAME(                          \
        const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R, int ldx,      \
        int ldy, int group_rows, int KS) {                                                     \
        gemv<FMT>(W, S, X, Y, N, K, R, ldx, ldy, group_rows, KS);                              \
    }

#define ROWS_KERNELS(NAME, FMT)                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_rows_##NAME(                     \
        const u8* W, const u8* S, const float* X, float* Y, int N, int K, int R, int ldx,      \
        int ldy, int KS, int rpb, int rows_in_x) {                                             \
        gemv_rows<FMT>(W, S, X, Y, N, K, R, ldx, ldy, KS, rpb, rows_in_x);                     \
    }

LINEAR_KERNELS(f8, FMT_F8)
LINEAR_KERNELS(f4, FMT_F4)
LINEAR_KERNELS(bf16, FMT_BF16)
LINEAR_KERNELS(f32, FMT_F32)
ROWS_KERNELS(bf16, FMT_BF16)
ROWS_KERNELS(f32, FMT_F32)

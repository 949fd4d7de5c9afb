// Copies of pages of the decode state, and random weights generated in place (hadal bench).

// Copies n blocks of `bytes` bytes (a multiple of 16) from src[i] to dst[i] (one block each).
extern "C" __global__ void copy_blocks(const u64* src, const u64* dst, int bytes) {
    pdl_wait();
    const uint4* s = (const uint4*)src[blockIdx.x];
    uint4* d = (uint4*)dst[blockIdx.x];
    for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
}

__device__ __forceinline__ u64 splitmix(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Random bytes of a synthetic weight (backend::cuda::weights::Fill): kind 0 any byte (packed
// FP4), 1 e4m3 codes without NaN, 2 scale bytes in [lo, lo + span), 3 BF16 values of magnitude
// about 2^lo, 4 F32 values of magnitude about 2^lo.
extern "C" __global__ void fill_random(u8* out, long n, u64 seed, int kind, int lo, int span) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long stride = (long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        u64 r = splitmix(seed ^ (u64)i * 0x2545f4914f6cdd1dull);
        u32 b = (u32)(r & 0xff);
        if (kind == 0) out[i] = (u8)b;
        else if (kind == 1) out[i] = (u8)((b & 0x7f) == 0x7f ? b - 1 : b);
        else if (kind == 2) out[i] = (u8)(lo + (u32)(r % (u64)span));
        else if (kind == 3) {
            if (i % 2 == 0) {
                float v = (float)((r >> 8) & 0xffff) / 65536.0f * 2.0f - 1.0f;
                u32 bits = __float_as_uint(v * pow2i(lo));
                ((u16*)out)[i / 2] = (u16)(bits >> 16);
            }
        } else {
            if (i % 4 == 0) {
                float v = (float)((r >> 8) & 0xffff) / 65536.0f * 2.0f - 1.0f;
                ((float*)out)[i / 4] = v * pow2i(lo);
            }
        }
    }
}

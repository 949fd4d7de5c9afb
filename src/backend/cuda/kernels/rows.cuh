// Packed rows of the decode state on the GPU (backend::cuda::state::RowFormat): the CPU's
// codecs with each part aligned to 16 bytes.
//   attention rows: e4m3 codes of the `nope` dims | one UE8M0 scale per 64 at s_off | the rope
//                   dims as f32 at r_off;
//   index rows:     e2m1 nibbles of all dims (low nibble first) | one UE8M0 scale per 32 at s_off.

struct RowFmt {
    int kind;   // 0 attention, 1 index
    int dim;
    int nope;   // attention: dims stored as e4m3
    int s_off;
    int r_off;
    int bytes;
};

// What the host lays out for every sequence of a forward call.
struct SeqDesc {
    u64 fixed;   // windows and pending compressor rows of every block
    u64 tables;  // page tables of every block's compressed entries
    u32 pos;     // position of the chunk's first token
    u32 len;     // tokens in the chunk
    u32 start;   // first row of the chunk in the batch
    u32 pad;
};

// Row `e` of a paged list of rows (64 rows a page).
__device__ __forceinline__ u8* paged_row(u64 tables, long table_off, long e, int bytes) {
    const u64* pages = (const u64*)(tables + table_off);
    return (u8*)pages[e / 64] + (e % 64) * (long)bytes;
}

__device__ __forceinline__ u32 scale_byte(float s) { return (__float_as_uint(s) >> 23) & 0xff; }

// Rounds and packs the values `v` (shared memory, f.dim of them) into `row`, by the whole block
// (blockDim.x a multiple of 32); `rounded`, when given, receives the rounded values.
__device__ void encode_row(const float* v, u8* row, RowFmt f, float* rounded) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (f.kind == 0) {
        for (int b = warp; b < f.nope / 64; b += nw) {
            int i0 = b * 64 + 2 * lane;
            float x0 = v[i0], x1 = v[i0 + 1];
            float s = fp8_scale(warp_max(fmaxf(fabsf(x0), fabsf(x1))));
            float q0 = round_e4m3(fminf(fmaxf(x0 / s, -FP8_MAX), FP8_MAX));
            float q1 = round_e4m3(fminf(fmaxf(x1 / s, -FP8_MAX), FP8_MAX));
            row[i0] = (u8)encode_e4m3(q0);
            row[i0 + 1] = (u8)encode_e4m3(q1);
            if (rounded) {
                rounded[i0] = q0 * s;
                rounded[i0 + 1] = q1 * s;
            }
            if (lane == 0) row[f.s_off + b] = (u8)scale_byte(s);
        }
        for (int i = threadIdx.x; i < f.dim - f.nope; i += blockDim.x) {
            ((float*)(row + f.r_off))[i] = v[f.nope + i];
            if (rounded) rounded[f.nope + i] = v[f.nope + i];
        }
    } else {
        for (int b = warp; b < f.dim / 32; b += nw) {
            int i = b * 32 + lane;
            float s = fp4_scale(warp_max(fabsf(v[i])));
            float q = round_e2m1(fminf(fmaxf(v[i] / s, -FP4_MAX), FP4_MAX));
            u32 nib = encode_e2m1(q);
            u32 hi = __shfl_down_sync(0xffffffffu, nib, 1);
            if ((lane & 1) == 0) row[i / 2] = (u8)(nib | (hi << 4));
            if (rounded) rounded[i] = q * s;
            if (lane == 0) row[f.s_off + b] = (u8)scale_byte(s);
        }
    }
}

// Tensor-core linears for FP8 and FP4 weights, and the routed experts built on them.
//
// An FP8/FP4 linear takes its input rounded to e4m3 in blocks of 128 (the reference's
// act_quant). Both codes are exact in f16: an e4m3 code as itself, an e2m1 code as its value
// times 2^-14 (its bits shifted into an f16). So mma.sync's f16 products, accumulated in f32,
// give each scale block's sum of code products; the block's scales (powers of two) then
// multiply that partial into the f32 total. Each output is summed the same way whatever the
// number of activation rows (scale blocks in k order, each from a fixed set of MMAs, a fixed
// k split decided by the matrix's shape), so a row's bits do not depend on its batch.
//
// One warp computes 16 weight rows against up to 8 * RT activation rows. Fragment layout of
// mma.m16n8k16 (g = lane / 4, t = lane % 4): A registers {row g, row g+8} x {k 2t..2t+1,
// k 2t+8..2t+9}; B registers k 2t..2t+1 and 2t+8..2t+9 of column g; C rows g and g+8, columns
// 2t and 2t+1. Within an MMA the k order is free, so each lane feeds the k's its own loads
// hold, and the activation's k's are placed to match.

// Activations as the MMA kernels take them: the e4m3 codes of each block of 128 as f16, and
// the block's scale. With `perm`, each group of 8 codes is stored in `f4_slot` order. One warp a
// block.
extern "C" __global__ void quant_act(const float* x, u16* q, float* s, int nblocks, int perm) {
    pdl_wait();
    int b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (b >= nblocks) return;
    float sc = quant_block(((const float4*)(x + (long)b * 128))[lane], q + (long)b * 128, perm);
    if (lane == 0) s[b] = sc;
}

// swiglu (ops.cu) of a tensor whose width is a multiple of 128, with quant_act's output of the
// result in both orders, as rms_norm. One warp a block of 128.
extern "C" __global__ void swiglu_quant(const float* g, const float* u, float* out, long nblocks,
                                        float limit, u16* q, u16* qp, float* s) {
    pdl_wait();
    long b = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (b >= nblocks) return;
    long i = 32 * b + (threadIdx.x & 31);
    float4 gv = ((const float4*)g)[i], uv = ((const float4*)u)[i];
    float4 y = make_float4(swiglu1(gv.x, uv.x, limit), swiglu1(gv.y, uv.y, limit),
                           swiglu1(gv.z, uv.z, limit), swiglu1(gv.w, uv.w, limit));
    ((float4*)out)[i] = y;
    float sc = quant_block(y, q + 128 * b, false, qp + 128 * b);
    if ((threadIdx.x & 31) == 0) s[b] = sc;
}

// Activations as the exact FP8 kernels take them (weights against unrounded values, as `wo_a`):
// x = p0 + p1 + p2 exactly, three bf16 planes of n values each (each part the rounded rest of
// the one before; 8 + 8 + 8 bits hold an f32's 24). A product of a bf16 part with an e4m3
// weight is exact in f32, so these kernels, too, differ from the CPU only in the order of sums.
extern "C" __global__ void split_act(const float* x, u16* q, long n) {
    pdl_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float r = x[i];
#pragma unroll
    for (int p = 0; p < 3; p++) {
        u16 h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(r));
        q[p * n + i] = h;
        r -= __uint_as_float((u32)h << 16);
    }
}

__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate" PF_STR(LD_PF) ".v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_stream32(const void* p) {
    u32 v;
    asm volatile("ld.global.nc.L1::evict_first" PF_STR(LD_PF) ".u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_cached(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Four e4m3 bytes as two f16x2 (bytes 0,1 and 2,3; the lower byte in the lower half).
__device__ __forceinline__ void e4m3x4_f16(u32 w, u32& lo, u32& hi) {
#if __CUDA_ARCH__ >= 890
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, l;\n\t"
        "cvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
#else
    // e4m3 bits moved into an f16 give the value times 2^-8; the multiplication restores it.
    u32 a = __byte_perm(w, 0, 0x4140), b = __byte_perm(w, 0, 0x4342);
    u32 ha = ((a & 0x007f007fu) << 7) | ((a & 0x00800080u) << 8);
    u32 hb = ((b & 0x007f007fu) << 7) | ((b & 0x00800080u) << 8);
    u32 k = 0x5c005c00u;  // 256 in each half
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(ha), "r"(k));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(hb), "r"(k));
#endif
}

// Four e4m3 bytes as two bf16x2 (exact: an e4m3 value has 4 significant bits, and f16 and
// f32 hold it on the way).
__device__ __forceinline__ void e4m3x4_bf16(u32 w, u32& lo, u32& hi) {
#if __CUDA_ARCH__ >= 890
    // Through the f16 pairs of the hardware's conversion: 8 instructions, not 22.
    u32 a, b;
    e4m3x4_f16(w, a, b);
    const u32 ab[2] = {a, b};
    u32 out[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        unsigned short h0, h1;
        float f0, f1;
        asm("mov.b32 {%0, %1}, %2;" : "=h"(h0), "=h"(h1) : "r"(ab[i]));
        asm("cvt.f32.f16 %0, %1;" : "=f"(f0) : "h"(h0));
        asm("cvt.f32.f16 %0, %1;" : "=f"(f1) : "h"(h1));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out[i]) : "f"(f1), "f"(f0));
    }
    lo = out[0];
    hi = out[1];
#else
    u32 f0 = __float_as_uint(e4m3(w & 0xff)), f1 = __float_as_uint(e4m3((w >> 8) & 0xff));
    u32 f2 = __float_as_uint(e4m3((w >> 16) & 0xff)), f3 = __float_as_uint(e4m3(w >> 24));
    lo = __byte_perm(f0, f1, 0x7632);
    hi = __byte_perm(f2, f3, 0x7632);
#endif
}

// The A fragments of a scale block's two MMAs (32 k) from a lane's 4 bytes of rows g (`x`) and
// g + 8 (`y`), 8 e2m1 codes each. A code becomes an f16's high byte, its sign on bit 15 and its
// exponent and mantissa on bits 11..9 (the value times 2^-14): the even and the odd codes are
// first moved into one byte each, then two bytes at a time into place. MMA 0 takes codes
// (0, 2) and (1, 3), MMA 1 (4, 6) and (5, 7): quant_act's `perm` order.
__device__ __forceinline__ void e2m1x8(u32 w, u32* p) {
    u32 ev = ((w << 1) & 0x0e0e0e0eu) | ((w << 4) & 0x80808080u);  // codes 0 2 4 6
    u32 od = ((w >> 3) & 0x0e0e0e0eu) | (w & 0x80808080u);         // codes 1 3 5 7
    p[0] = __byte_perm(ev, 0, 0x1404);
    p[1] = __byte_perm(od, 0, 0x1404);
    p[2] = __byte_perm(ev, 0, 0x3424);
    p[3] = __byte_perm(od, 0, 0x3424);
}

__device__ __forceinline__ void a_frags_f4(u32 x, u32 y, u32* A0, u32* A1) {
    u32 px[4], py[4];
    e2m1x8(x, px);
    e2m1x8(y, py);
    A0[0] = px[0]; A0[1] = py[0]; A0[2] = px[1]; A0[3] = py[1];
    A1[0] = px[2]; A1[1] = py[2]; A1[2] = px[3]; A1[3] = py[3];
}

// The four UE8M0 scale bytes of `w` times 2^14, the e2m1 codes' offset: each byte plus 14 in
// an f32's exponent bits, the four added at once (bytewise, modulo 256). A scale byte from 241
// on (2^114 and more, beyond any weight's) gives infinity, zero or a tiny power of two instead
// of e8m0()'s value; every FP4 kernel reads the same.
__device__ __forceinline__ void f4_exponents(u32 e, float* f) {
    f[0] = __uint_as_float((e << 23) & 0x7f800000u);
    f[1] = __uint_as_float((e << 15) & 0x7f800000u);
    f[2] = __uint_as_float((e << 7) & 0x7f800000u);
    f[3] = __uint_as_float((e >> 1) & 0x7f800000u);
}

__device__ __forceinline__ void f4_scales(u32 w, float* f) {
    f4_exponents(((w & 0x7f7f7f7fu) + 0x0e0e0e0eu) ^ (w & 0x80808080u), f);
}

// The same with the addition as one opaque instruction: left to itself, the compiler adds 14
// to each byte apart after extracting it (four additions where one does), which costs the
// one-row passes' loops some 20 instructions a step; the tiles keep f4_scales (within their
// registers only so).
__device__ __forceinline__ void f4_scales_one_add(u32 w, float* f) {
    u32 e;
    asm("add.u32 %0, %1, 0x0e0e0e0e;" : "=r"(e) : "r"(w & 0x7f7f7f7fu));
    f4_exponents(e ^ (w & 0x80808080u), f);
}

__device__ __forceinline__ float f4_scale(u32 w, int b) {
    float f[4];
    f4_scales(w, f);
    return f[b];
}

// A scale block's partial `c` joins an FP4 product's total as fmaf(c, fa * x, tot) would (fa
// the weight's block scale, x the activation's 128-block scale, both powers of two), with
// half the multiplications: over a step's four blocks the total is carried in units of x
// (times `pow2_recip(x)`, fmaf(c, fa, u) a block, times x again), the same sums rounded the
// same way (a power of two's scaling commutes with rounding, short of subnormals and
// overflow). Every FP4 kernel does it so, so they agree bit for bit even there.
__device__ __forceinline__ float pow2_recip(float x) { return __uint_as_float(0x7f000000u - __float_as_uint(x)); }
// An MMA lane's four sums times their columns' factors (c[0], c[2] in column 2t, c[1], c[3]
// in 2t + 1): into and out of the activation scale's units.
__device__ __forceinline__ void scale_cols(float* c, float a, float b) {
    c[0] *= a;
    c[1] *= b;
    c[2] *= a;
    c[3] *= b;
}

// The A fragments of four MMAs from a lane's 16 FP8 bytes of rows g (`wa`) and g + 8 (`wb`):
// MMA i takes bytes 4i..4i+3 (bf16 against split_act's planes, else f16).
template <bool EXACT>
__device__ __forceinline__ void a_frags_f8(uint4 wa, uint4 wb, u32 (*A)[4]) {
    const u32* ra = &wa.x;
    const u32* rb = &wb.x;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (EXACT) {
            e4m3x4_bf16(ra[i], A[i][0], A[i][2]);
            e4m3x4_bf16(rb[i], A[i][1], A[i][3]);
        } else {
            e4m3x4_f16(ra[i], A[i][0], A[i][2]);
            e4m3x4_f16(rb[i], A[i][1], A[i][3]);
        }
    }
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma16816_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Where one lane's activation rows are: for tile j, the row it feeds into B (8j + g) and the
// rows of its two output columns (8j + 2t, 8j + 2t + 1), as offsets of f16 codes into the
// quantized activations (`q`) and of scales (`s`); -1 where the tile has no such row.
// (Offsets fit 31 bits: the activations of one call stay below 2^31 values.)
template <int RT>
struct LaneRows {
    int q[RT];
    int s0[RT], s1[RT];
};

// 128-k steps of weights a lane has loaded before it multiplies the oldest (a ring of
// registers): at batch 1 a warp's whole share of a small matrix is in flight at once; wider
// passes, which need the registers for activation rows, keep two.
// (FP4: two, within the experts kernels' 128 registers.)
#define MMA_STAGES (RT == 1 ? 4 : 2)
#define MMA_STAGES_F4 2

// Sums of 16 weight rows (from n0) with the lane's activation rows over k in [kb, ke), added
// into tot[j] (C layout). FP8 weights: 128 x 128 blocks of scales; each lane loads 16 bytes of
// rows g and g+8 per 64 k, and the activation's 16 codes at the same k.
// EXACT: the activation is split_act's three bf16 planes (`xs` unused, plane stride `pstride`
// codes), the weights converted to bf16, three MMAs a step.
template <int RT, bool EXACT>
__device__ void mma_core_f8(const u8* __restrict__ W, const u8* __restrict__ S, int N, int K,
                            int n0, const u16* __restrict__ xq, const float* __restrict__ xs,
                            const LaneRows<RT>& rows, int kb, int ke, float (*tot)[4],
                            long pstride) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    bool va = n0 + g < N, vb = n0 + g + 8 < N;
    const u8* wa = W + (long)(n0 + g) * K + 16 * t;
    const u8* wb = W + (long)(n0 + g + 8) * K + 16 * t;
    const u8* srow = S + (long)(n0 >> 7) * (K >> 7);
    uint4 zero = make_uint4(0, 0, 0, 0);
    const int STAGES = EXACT ? 2 : MMA_STAGES;
    uint4 ring[STAGES][4];
    auto load = [&](int k, uint4* r) {
        r[0] = va ? ld_stream(wa + k) : zero;
        r[1] = va ? ld_stream(wa + k + 64) : zero;
        r[2] = vb ? ld_stream(wb + k) : zero;
        r[3] = vb ? ld_stream(wb + k + 64) : zero;
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++)
        if (kb + 128 * s < ke) load(kb + 128 * s, ring[s]);
    // The weights' first steps are in flight before the input is waited for.
    pdl_wait();
    for (int k0 = kb; k0 < ke; k0 += 128 * STAGES)
#pragma unroll
    for (int st = 0; st < STAGES; st++) {
        int k = k0 + 128 * st;
        if (k >= ke) break;
        if (k + 128 * (STAGES - 1) < ke) load(k + 128 * (STAGES - 1), ring[(st + STAGES - 1) % STAGES]);
        const uint4* cur = ring[st];
        float sw = e8m0(srow[k >> 7]);
        // EXACT: the second and third planes' sums apart from the first's, whose magnitude
        // would absorb their low bits in the MMA's own accumulation.
        float c[RT][4], cl[RT][4];
#pragma unroll
        for (int j = 0; j < RT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                c[j][q] = 0.0f;
                if (EXACT) cl[j][q] = 0.0f;
            }
        // Two halves of 64 k, four MMAs each.
#pragma unroll
        for (int h = 0; h < 2; h++) {
            u32 A[4][4];
            a_frags_f8<EXACT>(cur[h], cur[2 + h], A);
#pragma unroll
            for (int j = 0; j < RT; j++) {
#pragma unroll
                for (int p = 0; p < (EXACT ? 3 : 1); p++) {
                    uint4 x0 = zero, x1 = zero;
                    if (rows.q[j] >= 0) {
                        const u16* px = xq + p * pstride + rows.q[j] + k + 64 * h + 16 * t;
                        x0 = ld_cached(px);
                        x1 = ld_cached(px + 8);
                    }
                    u32 xb[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        if (EXACT && p == 0)
                            mma16816_bf16(c[j], A[i][0], A[i][1], A[i][2], A[i][3], xb[2 * i], xb[2 * i + 1]);
                        else if (EXACT)
                            mma16816_bf16(cl[j], A[i][0], A[i][1], A[i][2], A[i][3], xb[2 * i], xb[2 * i + 1]);
                        else
                            mma16816(c[j], A[i][0], A[i][1], A[i][2], A[i][3], xb[2 * i], xb[2 * i + 1]);
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < RT; j++) {
            float s0 = rows.s0[j] < 0 ? 0.0f : EXACT ? sw : sw * xs[rows.s0[j] + (k >> 7)];
            float s1 = rows.s1[j] < 0 ? 0.0f : EXACT ? sw : sw * xs[rows.s1[j] + (k >> 7)];
            if (EXACT)
#pragma unroll
                for (int q = 0; q < 4; q++) c[j][q] += cl[j][q];
            tot[j][0] = fmaf(c[j][0], s0, tot[j][0]);
            tot[j][1] = fmaf(c[j][1], s1, tot[j][1]);
            tot[j][2] = fmaf(c[j][2], s0, tot[j][2]);
            tot[j][3] = fmaf(c[j][3], s1, tot[j][3]);
        }
    }
}

// The same for FP4 weights (1 x 32 scales, packed low nibble first): per 128 k each lane loads
// 4 bytes of rows g and g+8 in each of the four scale blocks, whose two MMAs sum before the
// row's scale applies; the activation comes in quant_act's `perm` order.
template <int RT>
__device__ void mma_core_f4(const u8* __restrict__ W, const u8* __restrict__ S, int N, int K,
                            int n0, const u16* __restrict__ xq, const float* __restrict__ xs,
                            const LaneRows<RT>& rows, int kb, int ke, float (*tot)[4]) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    bool va = n0 + g < N, vb = n0 + g + 8 < N;
    long half = K >> 1, kq = K >> 5;
    const u8* wa = W + (long)(n0 + g) * half + 4 * t;
    const u8* wb = W + (long)(n0 + g + 8) * half + 4 * t;
    const u8* sa = S + (long)(n0 + g) * kq;
    const u8* sb = S + (long)(n0 + g + 8) * kq;
    u32 ring[MMA_STAGES_F4][10];
    auto load = [&](int k, u32* r) {
#pragma unroll
        for (int b = 0; b < 4; b++) {
            r[b] = va ? ld_stream32(wa + (k >> 1) + 16 * b) : 0u;
            r[4 + b] = vb ? ld_stream32(wb + (k >> 1) + 16 * b) : 0u;
        }
        r[8] = va ? ld_stream32(sa + (k >> 5)) : 0u;
        r[9] = vb ? ld_stream32(sb + (k >> 5)) : 0u;
    };
#pragma unroll
    for (int s = 0; s < MMA_STAGES_F4 - 1; s++)
        if (kb + 128 * s < ke) load(kb + 128 * s, ring[s]);
    pdl_wait();
    for (int k0 = kb; k0 < ke; k0 += 128 * MMA_STAGES_F4)
#pragma unroll
    for (int st = 0; st < MMA_STAGES_F4; st++) {
        int k = k0 + 128 * st;
        if (k >= ke) break;
        if (k + 128 * (MMA_STAGES_F4 - 1) < ke) load(k + 128 * (MMA_STAGES_F4 - 1), ring[(st + MMA_STAGES_F4 - 1) % MMA_STAGES_F4]);
        const u32* cur = ring[st];
        float fsa[4], fsb[4];
        f4_scales(cur[8], fsa);
        f4_scales(cur[9], fsb);
        float x0[RT], x1[RT];
#pragma unroll
        for (int j = 0; j < RT; j++) {
            x0[j] = rows.s0[j] >= 0 ? xs[rows.s0[j] + (k >> 7)] : 0.0f;
            x1[j] = rows.s1[j] >= 0 ? xs[rows.s1[j] + (k >> 7)] : 0.0f;
            float r0 = pow2_recip(x0[j]), r1 = pow2_recip(x1[j]);
            scale_cols(tot[j], r0, r1);
        }
#pragma unroll
        for (int b = 0; b < 4; b++) {
            u32 x = cur[b], y = cur[4 + b];
            u32 A0[4], A1[4];
            a_frags_f4(x, y, A0, A1);
            float fa = fsa[b], fb = fsb[b];
#pragma unroll
            for (int j = 0; j < RT; j++) {
                uint4 xv = make_uint4(0, 0, 0, 0);
                if (rows.q[j] >= 0) xv = ld_cached(xq + rows.q[j] + k + 32 * b + 8 * t);
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma16816(c, A0[0], A0[1], A0[2], A0[3], xv.x, xv.y);
                mma16816(c, A1[0], A1[1], A1[2], A1[3], xv.z, xv.w);
                tot[j][0] = fmaf(c[0], fa, tot[j][0]);
                tot[j][1] = fmaf(c[1], fa, tot[j][1]);
                tot[j][2] = fmaf(c[2], fb, tot[j][2]);
                tot[j][3] = fmaf(c[3], fb, tot[j][3]);
            }
        }
#pragma unroll
        for (int j = 0; j < RT; j++) {
            scale_cols(tot[j], x0[j], x1[j]);
        }
    }
}

// Asynchronous 16-byte copies to shared memory (sm_80+), zero-filled where `valid` is false,
// with an L2 prefetch-size hint of PF bytes (a string literal in the instruction, hence a
// macro). The copies take a shared-memory address (`smem_addr`), so that loops compute it once.
#if __CUDA_ARCH__ >= 800
#define CP_ASYNC16(NAME, PF)                                                                  \
    __device__ __forceinline__ void NAME(u32 dst, const void* src, bool valid) {              \
        asm volatile("cp.async.cg.shared.global" PF_STR(PF) " [%0], [%1], 16, %2;" ::"r"(dst), \
                     "l"(src), "r"(valid ? 16 : 0));                                          \
    }
#else
#define CP_ASYNC16(NAME, PF) \
    __device__ __forceinline__ void NAME(u32, const void*, bool) {}
#endif

// The L2 prefetch-size hint of the batch passes' weight copies (`mma_core_f4_stream`: decode
// batches, whose experts are read whole): 256 bytes. At batch 32 (2026-12-03, sixth session,
// five calls each) 26.02-26.48 ms a step, mean 26.23, against 26.31-26.47, mean 26.40, with
// 128; every copy at 256 (`CP_PF`) gave 26.12-26.19 but cost batch 1 3.6%.
#ifndef F4S_PF
#define F4S_PF 256
#endif
CP_ASYNC16(cp_async16, CP_PF)
CP_ASYNC16(cp_async16_f4s, F4S_PF)

__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
#endif
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    cp_async16(smem_addr(dst), src, valid);
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    cp_async4(smem_addr(dst), src, valid);
}

__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// One-row FP4 passes (decode's experts) stream their weights through shared memory instead:
// F4S_STAGES steps of 128 k in flight a warp without spending registers on them, and, for the
// up projection, w1's and w3's rows in the same steps. A step of one weight: 16 rows of 64
// bytes of codes, each in 80 bytes (so the fragment reads of 8 rows hit 32 different banks),
// then the rows' 4 scale bytes.
#define F4S_STAGES 3
#define F4S_ROW 80
#define F4S_STEP (16 * F4S_ROW + 64)

// Where a one-row FP4 pass's lane copies from, of each of its NW weights, from step kb on: 16
// bytes of row g (and, 8 rows on, of g + 8) and row `lane`'s scale byte word. Rows past N are
// clamped to its last (the copy then reads nothing: size 0).
template <int NW>
__device__ __forceinline__ void f4_sources(const u8* W, const u8* S, const u8* W2, const u8* S2,
                                           int N, int K, int n0, int kb, bool va, bool sv,
                                           const u8** wp, const u8** sp) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int w = 0; w < NW; w++) {
        wp[w] = (w ? W2 : W) + (long)(va ? n0 + g : N - 1) * (K >> 1) + 16 * t + (kb >> 1);
        sp[w] = (w ? S2 : S) + (long)(sv ? n0 + lane : N - 1) * (K >> 5) + (kb >> 5);
    }
}

// The bits are mma_core_f4's: the same lanes hold the same codes, summed in the same order.
// The range [kb, ke) is walked in slices of `slice_steps` steps of 128 k: after each,
// `on_slice(i)` takes slice i's sums from `tot` (and `tot2`) and leaves them zero.
// The lane's activation row (its B column, code offset `xrow`) and its two output columns'
// (scale offsets `xsc0`, `xsc1`) are always some pair's: a column past the pass's pairs reads
// a real pair's row and is never kept (a column's sums depend on its own row alone), so no
// load is predicated. Every source advances a step at a time and the ring's stages are
// offsets that wrap, so a step computes no address from k; the fragments come by ldmatrix
// (matrices: rows g of block b, rows g + 8 of b, rows g of b + 1, rows g + 8 of b + 1, lane L
// giving row L % 8 of matrix L / 8: a row's 16 bytes of a block). By tools/cuda-sass.py a
// step of the up projection's pass took 566 instructions before, 432 now (down: 307, 232).
template <bool DUAL, typename OnSlice>
__device__ void mma_core_f4_stream(const u8* __restrict__ W, const u8* __restrict__ S,
                                   const u8* __restrict__ W2, const u8* __restrict__ S2, int N,
                                   int K, int n0, const u16* __restrict__ xq,
                                   const float* __restrict__ xs, long xrow, long xsc0, long xsc1,
                                   int kb, int ke, int slice_steps, float (*tot)[4],
                                   float (*tot2)[4], u8* ring, OnSlice on_slice) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int half = K >> 1;
    const int NW = DUAL ? 2 : 1;
    const u32 STRIDE = F4S_STEP * NW, RING = F4S_STAGES * STRIDE;
    // What a lane copies a step, of each weight: 16 bytes of rows g and g + 8 and, lanes 0-15,
    // row `lane`'s scale byte word. Rows past N are clamped (the copy then reads nothing: size 0).
    bool va = n0 + g < N, vb = n0 + g + 8 < N, sv = n0 + lane < N;
    u32 wob = vb ? 8 * half : 0;  // (one expert's matrix stays below 4 GiB)
    const u8* wp[NW];
    const u8* sp[NW];
    f4_sources<NW>(W, S, W2, S2, N, K, n0, kb, va, sv, wp, sp);
    const u16* xp = xq + xrow + kb + 8 * t;
    const float* xsp = xs + xsc0 + (kb >> 7);
    int x1d = (int)(xsc1 - xsc0);  // (the scales of one call stay below 2^31)
    u32 base = smem_addr(ring), wd = base + g * F4S_ROW + 16 * t, sd = base + 16 * F4S_ROW + 4 * lane;
    u32 lm = base + ((lane & 7) + 8 * ((lane >> 3) & 1)) * F4S_ROW + 16 * (lane >> 4);
    auto issue = [&](u32 at) {
#pragma unroll
        for (int w = 0; w < NW; w++) {
            cp_async16_f4s(wd + at + w * F4S_STEP, wp[w], va);
            cp_async16_f4s(wd + at + w * F4S_STEP + 8 * F4S_ROW, wp[w] + wob, vb);
            if (lane < 16) cp_async4(sd + at + w * F4S_STEP, sp[w], sv);
            wp[w] += 64;
            sp[w] += 4;
        }
    };
    auto next = [&](u32 at) { return at + STRIDE == RING ? 0u : at + STRIDE; };
    int steps = (ke - kb) >> 7;
    u32 put = 0, get = 0;
#pragma unroll
    for (int s = 0; s < F4S_STAGES - 1; s++) {
        if (s < steps) issue(put);
        cp_commit();
        put = next(put);
    }
    pdl_wait();
    for (int i = 0, left = slice_steps, slice = 0; i < steps; i++) {
        cp_wait<F4S_STAGES - 2>();
        __syncwarp();
        if (i + F4S_STAGES - 1 < steps) issue(put);
        cp_commit();
        put = next(put);
        const u8* st = ring + get;
        u32 xy[NW][2][4];
#pragma unroll
        for (int w = 0; w < NW; w++)
#pragma unroll
            for (int h = 0; h < 2; h++) ldsm_x4(xy[w][h], lm + get + w * F4S_STEP + 32 * h);
        get = next(get);
        float x0 = xsp[0], x1 = xsp[x1d];
        xsp++;
        float r0 = pow2_recip(x0), r1 = pow2_recip(x1);
#pragma unroll
        for (int w = 0; w < NW; w++) scale_cols((w ? tot2 : tot)[0], r0, r1);
        float fs[NW][2][4];
#pragma unroll
        for (int w = 0; w < NW; w++) {
            f4_scales_one_add(*(const u32*)(st + w * F4S_STEP + 16 * F4S_ROW + 4 * g), fs[w][0]);
            f4_scales_one_add(*(const u32*)(st + w * F4S_STEP + 16 * F4S_ROW + 4 * (g + 8)), fs[w][1]);
        }
#pragma unroll
        for (int b = 0; b < 4; b++) {
            uint4 xv = ld_cached(xp + 32 * b);
#pragma unroll
            for (int w = 0; w < NW; w++) {
                float(*acc)[4] = w ? tot2 : tot;
                u32 A0[4], A1[4];
                a_frags_f4(xy[w][b >> 1][2 * (b & 1)], xy[w][b >> 1][2 * (b & 1) + 1], A0, A1);
                float fa = fs[w][0][b], fb = fs[w][1][b];
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma16816(c, A0[0], A0[1], A0[2], A0[3], xv.x, xv.y);
                mma16816(c, A1[0], A1[1], A1[2], A1[3], xv.z, xv.w);
                acc[0][0] = fmaf(c[0], fa, acc[0][0]);
                acc[0][1] = fmaf(c[1], fa, acc[0][1]);
                acc[0][2] = fmaf(c[2], fb, acc[0][2]);
                acc[0][3] = fmaf(c[3], fb, acc[0][3]);
            }
        }
        xp += 128;
#pragma unroll
        for (int w = 0; w < NW; w++) scale_cols((w ? tot2 : tot)[0], x0, x1);
        if (--left == 0) {
            on_slice(slice++);
            left = slice_steps;
        }
    }
    cp_wait<0>();
}

// The same for a pass of one pair whose activation row and scale come through the ring too
// (F4S_X more bytes a step, from code offset `xrow` and scale offset `xsc`), so that no MMA
// waits for a load issued just before it: decode's batch 1, where each expert has one pair.
// Only the pair's column (0) is summed; each source advances a step at a time. The bits are
// mma_core_f4_stream's. (Its inner block, the fragments' reads and MMAs, repeats that one's:
// as a shared helper it cost the batch kernels' loop 12 instructions a step, 576 -> 588 by
// tools/cuda-sass.py, so each keeps its own.)
#define F4S_X (256 + 16)

template <bool DUAL, typename OnSlice>
__device__ void mma_core_f4_staged(const u8* __restrict__ W, const u8* __restrict__ S,
                                   const u8* __restrict__ W2, const u8* __restrict__ S2, int N,
                                   int K, int n0, const u16* __restrict__ xq,
                                   const float* __restrict__ xs, long xrow, long xsc, int kb,
                                   int ke, int slice_steps, float (*tot)[4], float (*tot2)[4],
                                   u8* ring, OnSlice on_slice) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int half = K >> 1;
    const int NW = DUAL ? 2 : 1, STRIDE = F4S_STEP * NW + F4S_X;
    // What a lane copies a step, of each weight: 16 bytes of rows g and g + 8 and, lanes 0-15,
    // row `lane`'s scale byte word (rows past N clamped: the copy then reads nothing, size 0);
    // of the activation, lanes 0-15 16 bytes of codes and lane 16 the scale. The sources
    // advance a step at a time.
    bool va = n0 + g < N, vb = n0 + g + 8 < N, sv = lane < 16 && n0 + lane < N;
    long wob = vb ? 8L * half : 0;
    const u8* wp[NW];
    const u8* sp[NW];
    f4_sources<NW>(W, S, W2, S2, N, K, n0, kb, va, sv, wp, sp);
    const u8* xp = lane < 16 ? (const u8*)(xq + xrow + kb + 8 * lane) : (const u8*)(xs + xsc + (kb >> 7));
    u32 base = smem_addr(ring), wd = base + g * F4S_ROW + 16 * t, sd = base + 16 * F4S_ROW + 4 * lane;
    u32 xd = base + NW * F4S_STEP + 16 * (lane & 15) + (lane < 16 ? 0 : 256);
    // The fragments' reads as ldmatrix, as mma_core_f4_stream's.
    u32 lm = base + ((lane & 7) + 8 * ((lane >> 3) & 1)) * F4S_ROW + 16 * (lane >> 4);
    auto issue = [&](int stage) {
        u32 at = stage * STRIDE;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            cp_async16(wd + at + w * F4S_STEP, wp[w], va);
            cp_async16(wd + at + w * F4S_STEP + 8 * F4S_ROW, wp[w] + wob, vb);
            if (lane < 16) cp_async4(sd + at + w * F4S_STEP, sp[w], sv);
            wp[w] += 64;
            sp[w] += 4;
        }
        if (lane < 16) cp_async16(xd + at, xp, true);
        else if (lane == 16) cp_async4(xd + at, xp, true);
        xp += lane < 16 ? 256 : 4;
    };
    int steps = (ke - kb) >> 7;
#pragma unroll
    for (int s = 0; s < F4S_STAGES - 1; s++) {
        if (s < steps) issue(s);
        cp_commit();
    }
    pdl_wait();
    // (Unrolled by the ring's length, each stage's offset a constant, the loop took 25 KB of
    // code and was no faster.)
    for (int i = 0, left = slice_steps, slice = 0; i < steps; i++) {
        cp_wait<F4S_STAGES - 2>();
        __syncwarp();
        if (i + F4S_STAGES - 1 < steps) issue((i + F4S_STAGES - 1) % F4S_STAGES);
        cp_commit();
        u32 get_at = (i % F4S_STAGES) * STRIDE;
        const u8* st = ring + get_at;
        const u8* xst = st + NW * F4S_STEP;
        float x0 = *(const float*)(xst + 256), r0 = pow2_recip(x0);
#pragma unroll
        for (int w = 0; w < NW; w++) {
            float* acc = (w ? tot2 : tot)[0];  // (column 2t + 1, acc[1] and acc[3], unused)
            acc[0] *= r0;
            acc[2] *= r0;
        }
        float fs[NW][2][4];
#pragma unroll
        for (int w = 0; w < NW; w++) {
            f4_scales(*(const u32*)(st + w * F4S_STEP + 16 * F4S_ROW + 4 * g), fs[w][0]);
            f4_scales(*(const u32*)(st + w * F4S_STEP + 16 * F4S_ROW + 4 * (g + 8)), fs[w][1]);
        }
        u32 xy[NW][2][4];
#pragma unroll
        for (int w = 0; w < NW; w++)
#pragma unroll
            for (int h = 0; h < 2; h++) ldsm_x4(xy[w][h], lm + get_at + w * F4S_STEP + 32 * h);
#pragma unroll
        for (int b = 0; b < 4; b++) {
            // Every lane reads the one row (the other columns are never kept).
            uint4 xv = *(const uint4*)(xst + 64 * b + 16 * t);
#pragma unroll
            for (int w = 0; w < NW; w++) {
                float(*acc)[4] = w ? tot2 : tot;
                u32 A0[4], A1[4];
                a_frags_f4(xy[w][b >> 1][2 * (b & 1)], xy[w][b >> 1][2 * (b & 1) + 1], A0, A1);
                float fa = fs[w][0][b], fb = fs[w][1][b];
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma16816(c, A0[0], A0[1], A0[2], A0[3], xv.x, xv.y);
                mma16816(c, A1[0], A1[1], A1[2], A1[3], xv.z, xv.w);
                acc[0][0] = fmaf(c[0], fa, acc[0][0]);
                acc[0][2] = fmaf(c[2], fb, acc[0][2]);
            }
        }
#pragma unroll
        for (int w = 0; w < NW; w++) {
            float* acc = (w ? tot2 : tot)[0];  // (column 2t + 1, acc[1] and acc[3], unused)
            acc[0] *= x0;
            acc[2] *= x0;
        }
        if (--left == 0) {
            on_slice(slice++);
            left = slice_steps;
        }
    }
    cp_wait<0>();
}

// FP8 weights against split_act's planes (plane stride `pstride`).
#define FMT_F8X 4

template <int FMT, int RT>
__device__ __forceinline__ void mma_core(const u8* W, const u8* S, int N, int K, int n0,
                                         const u16* xq, const float* xs, const LaneRows<RT>& rows,
                                         int kb, int ke, float (*tot)[4], long pstride = 0) {
    if (FMT == FMT_F8) mma_core_f8<RT, false>(W, S, N, K, n0, xq, xs, rows, kb, ke, tot, 0);
    else if (FMT == FMT_F8X) mma_core_f8<RT, true>(W, S, N, K, n0, xq, xs, rows, kb, ke, tot, pstride);
    else mma_core_f4<RT>(W, S, N, K, n0, xq, xs, rows, kb, ke, tot);
}

// Grid y = 1 of a linear: a second weight of the same input and shape class (W2, its N2 rows
// to Y2).
__device__ __forceinline__ void second_weight(const u8*& W, const u8*& S, float*& Y, int& N, int& ldy,
                                              const u8* W2, const u8* S2, float* Y2, int N2) {
    if (blockIdx.y != 1) return;
    W = W2;
    S = S2;
    Y = Y2;
    N = N2;
    ldy = N2;
}

// Adds the KS warps' partials of each tile in k order (warp = tile * KS + ks); the first warp
// of each tile ends with the sums. `part` holds 8 warps x RT x 4 x 32 floats.
template <int RT>
__device__ void reduce_splits(float (*tot)[4], float* part, int KS) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (KS > 1) {
#pragma unroll
        for (int j = 0; j < RT; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) part[((warp * RT + j) * 4 + c) * 32 + lane] = tot[j][c];
    }
    __syncthreads();
    if (KS > 1 && warp % KS == 0) {
        for (int s = 1; s < KS; s++)
#pragma unroll
            for (int j = 0; j < RT; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) tot[j][c] += part[(((warp + s) * RT + j) * 4 + c) * 32 + lane];
    }
    __syncthreads();
}

// Y[r, n] = sum_k X[r, g(n) K + k] W[n, k] for FP8/FP4 W, X given by quant_act (row stride
// ldq codes, ldq / 128 scales). Grid: x = row blocks of 128 / KS * 16 rows, y = the weight
// (two where a second one shares the input), z = batches of
// 8 * RT rows; 256 threads, warp = tile * KS + ks with KS in {1, 2, 4, 8} and K % (128 KS) == 0.
template <int FMT, int RT>
__device__ void mma_linear(const u8* W, const u8* S, const u16* xq, const float* xs, float* Y,
                           int N, int K, int R, int ldq, int ldy, int group_rows, int KS,
                           const u8* W2, const u8* S2, float* Y2, int N2) {
    second_weight(W, S, Y, N, ldy, W2, S2, Y2, N2);
    long pstride = (long)R * ldq;
    __shared__ float part[8 * RT * 4 * 32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int tpb = 8 / KS;
    int n0 = (blockIdx.x * tpb + warp / KS) * 16, ks = warp % KS;
    int kslice = K / KS, kb = ks * kslice;
    int goff = group_rows > 0 ? (n0 / group_rows) * K : 0;
    int r0 = blockIdx.z * 8 * RT;
    int lds = ldq >> 7;
    LaneRows<RT> rows;
    int rc0[RT], rc1[RT];
#pragma unroll
    for (int j = 0; j < RT; j++) {
        int rq = r0 + 8 * j + g, c0 = r0 + 8 * j + 2 * t, c1 = c0 + 1;
        rows.q[j] = rq < R ? (int)(rq * ldq + goff) : -1;
        rows.s0[j] = c0 < R ? (int)(c0 * lds + (goff >> 7)) : -1;
        rows.s1[j] = c1 < R ? (int)(c1 * lds + (goff >> 7)) : -1;
        rc0[j] = c0 < R ? c0 : -1;
        rc1[j] = c1 < R ? c1 : -1;
    }
    float tot[RT][4];
#pragma unroll
    for (int j = 0; j < RT; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) tot[j][c] = 0.0f;
    if (n0 < N) mma_core<FMT, RT>(W, S, N, K, n0, xq, xs, rows, kb, kb + kslice, tot, pstride);
    reduce_splits<RT>(tot, part, KS);
    if (ks != 0 || n0 >= N) return;
    int na = n0 + g, nb = n0 + g + 8;
#pragma unroll
    for (int j = 0; j < RT; j++) {
        if (rc0[j] >= 0) {
            if (na < N) Y[(long)rc0[j] * ldy + na] = tot[j][0];
            if (nb < N) Y[(long)rc0[j] * ldy + nb] = tot[j][2];
        }
        if (rc1[j] >= 0) {
            if (na < N) Y[(long)rc1[j] * ldy + na] = tot[j][1];
            if (nb < N) Y[(long)rc1[j] * ldy + nb] = tot[j][3];
        }
    }
}

#define MMA_LINEAR(NAME, FMT, RT, BOUNDS)                                                      \
    extern "C" __global__ void BOUNDS mma_linear_##NAME##_r##RT(                                \
        const u8* W, const u8* S, const u16* xq, const float* xs, float* Y, int N, int K,      \
        int R, int ldq, int ldy, int group_rows, int KS, const u8* W2, const u8* S2, float* Y2, \
        int N2) {                                                                              \
        mma_linear<FMT, RT>(W, S, xq, xs, Y, N, K, R, ldq, ldy, group_rows, KS, W2, S2, Y2, N2); \
    }

// One-row passes (decode) keep to 128 registers, so that two blocks share an SM; so does the
// two-row FP4 pass (ptxas spills it with the register file to itself).
#define TWO_BLOCKS __launch_bounds__(256, 2)
#define ONE_BLOCK __launch_bounds__(256)

MMA_LINEAR(f8, FMT_F8, 1, TWO_BLOCKS)
MMA_LINEAR(f8, FMT_F8, 2, ONE_BLOCK)
MMA_LINEAR(f8, FMT_F8, 4, ONE_BLOCK)
MMA_LINEAR(f8, FMT_F8, 8, ONE_BLOCK)
MMA_LINEAR(f8x, FMT_F8X, 1, TWO_BLOCKS)
// (Told one block an SM, ptxas gives it 198 registers; told nothing, 128 and spills.)
MMA_LINEAR(f8x, FMT_F8X, 2, __launch_bounds__(256, 1))
MMA_LINEAR(f4, FMT_F4, 1, TWO_BLOCKS)
MMA_LINEAR(f4, FMT_F4, 2, TWO_BLOCKS)
MMA_LINEAR(f4, FMT_F4, 4, ONE_BLOCK)

struct MmaExpertArgs {
    const u64* w1; const u64* s1;  // per expert: weight and scale addresses
    const u64* w3; const u64* s3;
    const u64* w2; const u64* s2;
    const u32* seg_expert; const u32* seg_off; const u32* seg_cnt; const u32* nseg;
    const u32* order;
    const u16* xq; const float* xs;  // quant_act of the tokens [T, D] (up) or of h [P, F] (down)
    const float* weights;            // [P] routing weights
    float* out;                      // [P, F] SwiGLU outputs times weights (up), [P, D] (down)
    int D, F, k, KS, W;
    float limit;
};

// One expert's rows for the (token, expert) pairs routed to it, in one-row passes of 8 pairs
// (wider batches take tiles.cu's tiled kernels, with the same bits). Grid: x = segment (see
// moe_sort), y = tiles of 16 rows; W warps a block share the tile's KS slices of k (W divides
// KS), each walking KS / W of them in turn. Every slice's sums stay apart until they are added
// in slice order, as mma_linear's KS warps' are (reduce_splits): the bits do not depend on W,
// which the host picks to fill the GPU (fewer warps, longer walks, when tiles are many).
// Dynamic shared memory: each warp's ring (FP4), then the slices of warps 1.. (`part`).
template <int FMT, bool UP, bool XS>
__device__ void mma_experts(const MmaExpertArgs& a) {
    extern __shared__ __align__(16) u8 smem[];
    const int NW = UP ? 2 : 1;
    pdl_wait();
    u32 sg = blockIdx.x;
    if (sg >= *a.nseg) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    u32 e = a.seg_expert[sg], off = a.seg_off[sg], cnt = a.seg_cnt[sg];
    int N = UP ? a.F : a.D, K = UP ? a.D : a.F, KS = a.KS, per = KS / a.W;
    int n0 = blockIdx.y * 16, kslice = K / KS, kb = warp * per * kslice, ke = kb + per * kslice;
    long lds = K >> 7;
    const u8* W1 = (const u8*)(UP ? a.w1[e] : a.w2[e]);
    const u8* S1 = (const u8*)(UP ? a.s1[e] : a.s2[e]);
    const u8* W3 = (const u8*)(UP ? a.w3[e] : 0);
    const u8* S3 = (const u8*)(UP ? a.s3[e] : 0);
    // XS: one token, whose activation the FP4 passes of one pair stage with the weights.
    const int RING = FMT == FMT_F4 ? F4S_STAGES * (F4S_STEP * NW + (XS ? F4S_X : 0)) : 0;
    u8* ring = smem + warp * RING;
    // The slices of warps 1.. (KS - per of each weight).
    float* part = (float*)(smem + a.W * RING);
    int kept = KS - per;
    // A pair's activation row (up: its token's).
    auto xrow = [&](u32 i) -> long { long p = a.order[off + i]; return UP ? p / a.k : p; };
    for (u32 c = 0; c < cnt; c += 8) {
        LaneRows<1> rows;
        u32 iq = c + g, i0 = c + 2 * t, i1 = i0 + 1;
        int pc0 = i0 < cnt ? (int)a.order[off + i0] : -1;
        int pc1 = i1 < cnt ? (int)a.order[off + i1] : -1;
        rows.q[0] = iq < cnt ? (int)(xrow(iq) * K) : -1;
        rows.s0[0] = pc0 < 0 ? -1 : (int)(xrow(i0) * lds);
        rows.s1[0] = pc1 < 0 ? -1 : (int)(xrow(i1) * lds);
        float acc[NW][1][4], run[NW][4];
#pragma unroll
        for (int w = 0; w < NW; w++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[w][0][q] = run[w][q] = 0.0f;
        // Warp 0 adds its slices as they finish; the others leave theirs in `part`.
        auto on_slice = [&](int i) {
#pragma unroll
            for (int w = 0; w < NW; w++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    if (warp == 0) run[w][q] = i == 0 ? acc[w][0][q] : run[w][q] + acc[w][0][q];
                    else part[((w * kept + warp * per + i - per) * 4 + q) * 32 + lane] = acc[w][0][q];
                    acc[w][0][q] = 0.0f;
                }
        };
        if (n0 < N) {
            if constexpr (FMT == FMT_F4) {
                // One token's one pair, staged. (With one token an expert still has several
                // pairs where a hash layer's table names it twice: those read theirs through L1.)
                if (XS && cnt == 1) {
                    long r = xrow(0);
                    mma_core_f4_staged<UP>(W1, S1, W3, S3, N, K, n0, a.xq, a.xs, r * K, r * lds, kb, ke,
                                           kslice >> 7, acc[0], acc[NW - 1], ring, on_slice);
                } else {
                    // Columns past the pass's pairs read its first pair's rows.
                    auto row_of = [&](u32 i) { return xrow(i < cnt ? i : c); };
                    mma_core_f4_stream<UP>(W1, S1, W3, S3, N, K, n0, a.xq, a.xs, row_of(iq) * K,
                                           row_of(i0) * lds, row_of(i1) * lds, kb, ke, kslice >> 7,
                                           acc[0], acc[NW - 1], ring, on_slice);
                }
            } else {
                for (int i = 0; i < per; i++) {
                    int k0 = kb + i * kslice;
                    mma_core<FMT, 1>(W1, S1, N, K, n0, a.xq, a.xs, rows, k0, k0 + kslice, acc[0]);
                    if (UP) mma_core<FMT, 1>(W3, S3, N, K, n0, a.xq, a.xs, rows, k0, k0 + kslice, acc[NW - 1]);
                    on_slice(i);
                }
            }
        }
        __syncthreads();
        if (warp == 0 && n0 < N) {
            for (int sl = per; sl < KS; sl++)
#pragma unroll
                for (int w = 0; w < NW; w++)
#pragma unroll
                    for (int q = 0; q < 4; q++) run[w][q] += part[((w * kept + sl - per) * 4 + q) * 32 + lane];
            int na = n0 + g, nb = n0 + g + 8;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int p = (q & 1) ? pc1 : pc0;
                int n = q < 2 ? na : nb;
                if (p < 0 || n >= N) continue;
                if (UP) a.out[(long)p * N + n] = swiglu1(run[0][q], run[NW - 1][q], a.limit) * a.weights[p];
                else a.out[(long)p * N + n] = run[0][q];
            }
        }
        __syncthreads();
    }
}

#define MMA_EXPERTS(NAME, FMT, XS, BOUNDS)                                                     \
    extern "C" __global__ void BOUNDS mma_experts_up_##NAME(MmaExpertArgs a) {                 \
        mma_experts<FMT, true, XS>(a);                                                         \
    }                                                                                          \
    extern "C" __global__ void BOUNDS mma_experts_down_##NAME(MmaExpertArgs a) {               \
        mma_experts<FMT, false, XS>(a);                                                        \
    }

MMA_EXPERTS(f8_r1, FMT_F8, false, TWO_BLOCKS)
MMA_EXPERTS(f4_r1, FMT_F4, false, TWO_BLOCKS)
// One token: its few blocks, spread over the SMs, never need two of 256 threads an SM. ptxas
// told nothing gives the kernel 128 registers, where the stream pass spills; told one block an
// SM, 171, and then an SM holds five of V4-Flash's up-projection blocks of two warps (registers
// go by 8 a lane: 176 x 64 each), not the six its 768 blocks over 132 SMs need, and batch 1
// lost 3% (2026-12-03, eighth session, run o2). 168 keeps six.
MMA_EXPERTS(f4_x1, FMT_F4, true, __maxnreg__(168))

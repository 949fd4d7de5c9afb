// Shared definitions of hadal's CUDA kernels. Compiled by NVRTC with no CUDA headers: every
// type and intrinsic below is plain CUDA C++ or inline PTX.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Weight formats (backend::cuda::weights::Format).
#define FMT_F8 0
#define FMT_F4 1
#define FMT_BF16 2
#define FMT_F32 3

// L2 prefetch-size hints of weight loads (PTX `.level::prefetch_size`): `CP_PF` for the copies
// into shared memory, `LD_PF` for loads into registers; 0 (none), 64, 128 or 256 bytes. A
// one-row pass reads 64 or 128 bytes of each of 16 rows a step, short pieces scattered over
// DRAM; with the hint each miss fetches the aligned 128 bytes around it. (Measured, 2026-12-02:
// the one-token up projection's access pattern alone 2.1 -> 2.7 TB/s, tools/device/pattern.cu;
// 256 bytes gained less, and cost batch 1 its gain.) `HADAL_CUDA_DEFINES` sets them per run.
#ifndef CP_PF
#define CP_PF 128
#endif
#ifndef LD_PF
#define LD_PF 128
#endif
#define PF_HINT(n) PF_HINT_##n
#define PF_HINT_0 ""
#define PF_HINT_64 ".L2::64B"
#define PF_HINT_128 ".L2::128B"
#define PF_HINT_256 ".L2::256B"
#define PF_STR(n) PF_HINT(n)

#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90): kernels are launched so that the next one may start
// while this one runs. Each kernel waits for the work before it (`griddepcontrol.wait`: all of
// it finished, its writes visible) before it touches any buffer, and then lets the next one be
// scheduled, whose blocks then wait in turn. What may come before the wait: reads of weights,
// which no kernel writes (the linears start loading theirs there).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}" : "=r"(a) : "l"(p));
    return a;
}

// Four 8 x 8 matrices of 16-bit elements from shared memory (lanes 8i..8i+7 give the row
// addresses of matrix i; each lane gets 32 bits of each: row L / 4, bytes 4 (L % 4)..).
__device__ __forceinline__ void ldsm_x4(u32* r, u32 p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(p));
}

// Thread block clusters (sm_90): a block writes into another's shared memory asynchronously
// (`st_async4`: addresses from `cluster_addr`, which maps this block's address of a variable to
// block `rank`'s), each write counted against an mbarrier of the receiver that expects that
// many bytes (`mbar_expect`); the receiver waits for the barrier (`mbar_wait0`), no thread
// fences on either side (a release at cluster scope waits for every access the thread has in
// flight, an acquire invalidates the L1: polled, they took half of a kernel's time). Launched
// on older GPUs they do nothing (the host does not choose them there).
__device__ __forceinline__ u32 cluster_addr(u32 local, u32 rank) {
    u32 r = local;
#if __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
#endif
    return r;
}
// 16 bytes into another block's shared memory (`addr`), counted by its mbarrier `bar`.
__device__ __forceinline__ void st_async4u(u32 addr, uint4 v, u32 bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1,%2,%3,%4}, [%5];" ::"r"(addr),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(bar)
                 : "memory");
#endif
}
// The same for four floats.
__device__ __forceinline__ void st_async4(u32 addr, float4 v, u32 bar) {
    st_async4u(addr, make_uint4(__float_as_uint(v.x), __float_as_uint(v.y), __float_as_uint(v.z), __float_as_uint(v.w)),
               bar);
}
// An mbarrier of this block that completes once `bytes` have arrived (its one arrival made
// here), made visible to the cluster by the cluster barrier that must follow.
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    unsigned long long state;
    asm volatile(
        "mbarrier.init.shared::cta.b64 [%1], 1;\n\t"
        "mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n\t"
        "fence.mbarrier_init.release.cluster;"
        : "=l"(state)
        : "r"(bar), "r"(bytes)
        : "memory");
#endif
}
// Waits for the first phase of this block's mbarrier `bar` (each is used once a launch).
__device__ __forceinline__ void mbar_wait0(u32 bar) {
#if __CUDA_ARCH__ >= 900
    u32 done = 0;
    while (!done)
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar)
            : "memory");
#endif
}
// Every thread of every block of the cluster, with no memory ordering beyond the mbarriers'
// initialization.
__device__ __forceinline__ void cluster_sync_relaxed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
#endif
}
// A barrier for the first `n` threads of the block (named barrier 1; n a multiple of 32).
__device__ __forceinline__ void bar_first(int n) { asm volatile("bar.sync 1, %0;" ::"r"(n) : "memory"); }

#define FP8_MAX 448.0f
#define FP4_MAX 6.0f

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; `sh` holds 32 floats. Every thread must call it.
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : 0.0f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : NEG_INF;
    if (w == 0) v = warp_max(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// A block's threads walking the items of a rows x cols grid, row by row: thread i takes item
// i, then every blockDim.x-th, its row and column carried along without a division a step.
struct WalkStep {
    int cols, rows, extra;  // a step of blockDim.x items: whole rows, then columns
};
struct Walk {
    int row, col;
};
__device__ __forceinline__ WalkStep walk_step(int cols) {
    WalkStep s;
    s.cols = cols;
    s.rows = cols > 0 ? (int)blockDim.x / cols : 1 << 30;
    s.extra = cols > 0 ? (int)blockDim.x % cols : 0;
    return s;
}
__device__ __forceinline__ Walk walk_start(int cols) {
    Walk w;
    w.row = cols > 0 ? (int)threadIdx.x / cols : 1 << 30;
    w.col = cols > 0 ? (int)threadIdx.x % cols : 0;
    return w;
}
__device__ __forceinline__ void walk_next(Walk& w, WalkStep s) {
    w.row += s.rows;
    w.col += s.extra;
    if (w.col >= s.cols) {
        w.col -= s.cols;
        w.row++;
    }
}

// sin and cos of an f32 angle, rounded from double precision: the C library's correctly
// rounded `sinf`/`cosf` (the CPU's) bar a rare double rounding, and at long contexts (angles up
// to 1e6 rad) faster than sinf's slow argument reduction.
__device__ __forceinline__ void rope_sincos(float a, float* s, float* c) {
    double sd, cd;
    sincos((double)a, &sd, &cd);
    *s = (float)sd;
    *c = (float)cd;
}

// 2^e for e in the normal range.
__device__ __forceinline__ float pow2i(int e) { return __int_as_float((e + 127) << 23); }

// A UE8M0 scale byte (selects, not branches: it sits in the linears' inner loops).
__device__ __forceinline__ float e8m0(u32 u) {
    u32 b = u << 23;
    b = u == 0 ? 0x00400000u : b;  // 2^-127
    b = u == 255 ? 0x7fc00000u : b;
    return __int_as_float(b);
}

// An e4m3 byte (the NaN codes 0x7f/0xff excepted): its bits moved into an f32's exponent and
// mantissa, then the bias difference restored by an exact multiplication by 2^120 (subnormal
// codes land on f32 subnormals, which the multiplication scales back exactly).
__device__ __forceinline__ float e4m3(u32 b) {
    return __int_as_float(((b & 0x7fu) << 20) | ((b & 0x80u) << 24)) * __int_as_float(0x7B800000);
}

__device__ __constant__ float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

__device__ __forceinline__ float bf16(u32 h) { return __int_as_float(h << 16); }

// floor(log2(|x|)) of a normal non-zero x.
__device__ __forceinline__ int exponent_of(float a) { return ((__float_as_int(a) >> 23) & 0xff) - 127; }

// 2^ceil(log2(x)) of a positive normal x, as the reference's bit trick.
__device__ __forceinline__ float pow2_ceil(float x) {
    u32 b = __float_as_uint(x);
    int e = (int)((b >> 23) & 0xff) - 127 + ((b & 0x7fffffu) != 0 ? 1 : 0);
    e = e < -126 ? -126 : (e > 127 ? 127 : e);
    return pow2i(e);
}

// Nearest e4m3 value, ties to even; x within [-448, 448]. (x / q as x times 2^-e': the same
// bits, a power of two's reciprocal being exact, without a division.)
__device__ __forceinline__ float round_e4m3(float x) {
    float a = fabsf(x);
    if (a == 0.0f) return x;
    int e = exponent_of(a);
    e = (e < -6 ? -6 : e) - 3;
    return rintf(x * pow2i(-e)) * pow2i(e);
}

// Nearest e2m1 value, ties to even; x within [-6, 6].
__device__ __forceinline__ float round_e2m1(float x) {
    float a = fabsf(x);
    if (a == 0.0f) return x;
    int e = exponent_of(a);
    e = (e < 0 ? 0 : e) - 1;
    return rintf(x * pow2i(-e)) * pow2i(e);
}

// The e4m3 byte of an exactly representable value (the output of round_e4m3).
__device__ __forceinline__ u32 encode_e4m3(float v) {
    u32 sign = (__float_as_uint(v) >> 31) ? 0x80u : 0u;
    float a = fabsf(v);
    if (a == 0.0f) return sign;
    int e = exponent_of(a);
    if (e < -6) return sign | (u32)(a / pow2i(-9));
    u32 m = (u32)((a / pow2i(e) - 1.0f) * 8.0f);
    return sign | ((u32)(e + 7) << 3) | m;
}

// The e2m1 nibble of an exactly representable value.
__device__ __forceinline__ u32 encode_e2m1(float v) {
    u32 sign = (__float_as_uint(v) >> 31) ? 8u : 0u;
    float a = fabsf(v);
    u32 c = a < 0.25f ? 0 : a < 0.75f ? 1 : a < 1.25f ? 2 : a < 1.75f ? 3 : a < 2.5f ? 4 : a < 3.5f ? 5 : a < 5.0f ? 6 : 7;
    return sign | c;
}

// The power-of-two scale of an FP8 block with absolute maximum `amax`.
__device__ __forceinline__ float fp8_scale(float amax) { return pow2_ceil(fmaxf(amax, 1e-4f) / FP8_MAX); }

// The same for FP4 (amax floored at 6 * 2^-126).
__device__ __forceinline__ float fp4_scale(float amax) {
    return pow2_ceil(fmaxf(amax, FP4_MAX * __int_as_float(0x00800000)) / FP4_MAX);
}

__device__ __forceinline__ float fq8(float v, float s) {
    return round_e4m3(fminf(fmaxf(v / s, -FP8_MAX), FP8_MAX)) * s;
}

__device__ __forceinline__ float fq4(float v, float s) {
    return round_e2m1(fminf(fmaxf(v / s, -FP4_MAX), FP4_MAX)) * s;
}

// Element (n, k) of a K-wide weight matrix in format `fmt`, scales applied.
__device__ __forceinline__ float wval(int fmt, const u8* W, const u8* S, long n, long k, long K) {
    if (fmt == FMT_F8) {
        long kb = (K + 127) / 128;
        return e4m3(W[n * K + k]) * e8m0(S[(n / 128) * kb + k / 128]);
    } else if (fmt == FMT_F4) {
        u32 b = W[n * (K / 2) + k / 2];
        u32 nib = (k & 1) ? (b >> 4) : (b & 15);
        return E2M1[nib] * e8m0(S[n * (K / 32) + k / 32]);
    } else if (fmt == FMT_BF16) {
        return bf16(((const u16*)W)[n * K + k]);
    } else {
        return ((const float*)W)[n * K + k];
    }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// log(1 + e^x), linear above 20 as torch's softplus.
__device__ __forceinline__ float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

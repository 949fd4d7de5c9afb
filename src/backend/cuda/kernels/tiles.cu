// Tiled tensor-core products for many activation rows (prefill, routed experts of wide batches).
//
// The sums are mma.cu's, bit for bit: each (weight row, activation row) output comes from the
// same MMAs with the same k in the same slots, its scale blocks' partials folded into the total
// in k order, and the KS k-slices of mma_split added in order (one block walks all of k and
// keeps the sum of the slices it has finished in shared memory). So a row's result does not
// depend on which kernel its batch took. What differs is where the operands come from: a block
// stages a tile of weight rows and a tile of activation rows in shared memory, several steps of
// 128 k in flight (cp.async), and each warp multiplies 64 weight rows by 32 activation rows
// (16 against split_act's three planes) out of them. A weight byte is then read from memory
// once per tile of activation rows, not once per 64 rows, and an activation once per tile of
// weight rows.
//
// Shared memory rows are stored in 16-byte chunks permuted by the row (`swz_*`), so that the
// eight lanes of a quarter-warp reading one chunk column hit different banks.

// Whether a step spreads the next step's copies over its MMAs (1) or issues them at its start
// (0), where the tile keeps all in registers with it: the experts' tiles and `wo_a`'s (the
// other linears' tiles spill with it).
#ifndef TILE_SPREAD
#define TILE_SPREAD 1
#endif

#define TL_LINEAR 0
#define TL_UP 1
#define TL_DOWN 2

// Geometry of a block: WN warps along weight rows (64 rows each), 8 / WN along activation rows.
template <int FMT, int WN>
struct Tile {
    static constexpr bool EXACT = FMT == FMT_F8X;
    static constexpr bool F4 = FMT == FMT_F4;
    static constexpr int PLANES = EXACT ? 3 : 1;
    static constexpr int MT = 4;                // 16-row MMA tiles of weights a warp
    static constexpr int WM = EXACT ? 16 : 32;  // activation rows a warp
    static constexpr int NT = WM / 8;           // 8-row MMA tiles of activations a warp
    static constexpr int BN = 64 * WN;
    static constexpr int BM = WM * (8 / WN);
    static constexpr int WROW = F4 ? 64 : 128;  // weight bytes a row and step
    static constexpr int STAGES = EXACT ? 2 : 3;
    static constexpr int W_BYTES = BN * WROW;
    static constexpr int WS_BYTES = F4 ? BN * 4 : 0;
    static constexpr int X_BYTES = PLANES * BM * 256;
    static constexpr int XS_BYTES = EXACT ? 0 : BM * 4;
    static constexpr int STAGE = W_BYTES + WS_BYTES + X_BYTES + XS_BYTES;
    static constexpr int RUN = 8 * MT * NT * 4 * 32 * 4;
    // Stages, the finished slices' sums, the activation rows' offsets and output rows.
    static constexpr int SMEM = STAGES * STAGE + RUN + 2 * BM * 4;
};

// Where chunk `c` of a row lives. FP8 weights: lanes read chunk 4h + t of rows g (even and odd
// rows of a quarter-warp); activations: chunks 8h + 2t and 8h + 2t + 1 (FP8) or 4b + t (FP4);
// FP4 weights (64-byte rows): 4 bytes of chunk b of rows g, eight rows a wavefront.
__device__ __forceinline__ int swz_w8(int row, int c) { return c ^ ((row & 1) << 2); }
__device__ __forceinline__ int swz_w4(int row, int c) { return c ^ ((row >> 1) & 3); }
template <bool F4>
__device__ __forceinline__ int swz_x(int row, int c) { return F4 ? c ^ ((row & 1) << 2) : c ^ (row & 1); }

__device__ __forceinline__ uint4 lds128(const u8* p) { return *(const uint4*)p; }
__device__ __forceinline__ u32 lds32(const u8* p) { return *(const u32*)p; }

// The weight rows a block multiplies: WN slabs of 64 rows, each from a weight (codes and
// scales) and a first row. Kept in shared memory (the loaders index it by row).
template <int WN>
struct Slabs {
    const u8* w[WN];
    const u8* s[WN];
    int row[WN];
};

// One tile: the block's weight rows against the activation rows whose code offsets are in
// `arow` (-1: none), over all of k. Leaves each warp's outputs in `run` (index
// ((warp * MT + m) * NT + j) * 4 + q) * 32 + lane, C layout).
template <int FMT, int WN>
__device__ void tile_product(const Slabs<WN>& sl /* shared */, int N, int K, int KS, const u16* __restrict__ xq,
                             const float* __restrict__ xs, long pstride, const int* arow, float* run,
                             u8* stages) {
    using T = Tile<FMT, WN>;
    constexpr int MT = T::MT, NT = T::NT, BM = T::BM, WM = T::WM;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int wn = warp / (8 / WN), wm = warp % (8 / WN);
    long wbytes = T::F4 ? K >> 1 : K, kq = K >> 5;
    // The thread's copies of a step, fixed for the tile: each source at k = 0 (where the row is
    // past the weight's or the batch's end, its slab's first byte, copied as zeros) and where
    // it lands. Read into registers once: the copies' barriers would otherwise make the
    // compiler reload `sl` and `arow` from shared memory and redo the address arithmetic
    // (30-odd instructions a copy) every step.
    constexpr int CPR = T::WROW / 16, NW = T::BN * CPR / 256, NX = T::PLANES * BM * 16 / 256;
    static_assert(T::BN * CPR % 256 == 0 && BM * 16 % 256 == 0, "whole copies a thread");
    const u8* wsrc[NW];
    u32 wdst[NW], wok = 0;
#pragma unroll
    for (int i = 0; i < NW; i++) {
        int row = tid / CPR + 256 / CPR * i, ch = tid % CPR, s = row >> 6, r = sl.row[s] + (row & 63);
        bool ok = r < N;
        wok |= (u32)ok << i;
        wsrc[i] = sl.w[s] + (ok ? r * wbytes + 16 * ch : 0);
        wdst[i] = row * T::WROW + 16 * (T::F4 ? swz_w4(row, ch) : swz_w8(row, ch));
    }
    const u8* ssrc = sl.s[0];  // FP4: the row's scales
    bool sok = false;
    if (T::F4 && tid < T::BN) {
        int s = tid >> 6, r = sl.row[s] + (tid & 63);
        sok = r < N;
        ssrc = sl.s[s] + (sok ? r * kq : 0);
    }
    // Activations: copy i reads plane i / (NX / PLANES) (BM * 16 copies a plane).
    int xsrc[NX];  // code offsets within the plane; -1: no row
    u32 xdst[NX];
#pragma unroll
    for (int i = 0; i < NX; i++) {
        int p = i / (NX / T::PLANES), row = (tid / 16 + 16 * i) % BM, ch = tid & 15, a = arow[row];
        xsrc[i] = a >= 0 ? a + 8 * ch : -1;
        xdst[i] = (p * BM + row) * 256 + 16 * swz_x<T::F4>(row, ch);
    }
    int xssrc = !T::EXACT && tid < BM && arow[tid] >= 0 ? arow[tid] >> 7 : -1;  // the row's scales
    // Stage step `st` (k = 128 st) into buffer `buf`: of the step's copies (the weights', their
    // scales', the activations', theirs), those that fall in `part` of `parts` (compile-time
    // constants once unrolled). A step spreads the next one's copies over its MMAs: issued at
    // once, each copy's registers stayed locked until the copy left the queue, and the first
    // MMAs waited on them (11% of the up projection's stall samples, 2026-12-02 run 1).
    constexpr int NCOPY = NW + T::F4 + NX + !T::EXACT;
    auto issue = [&](int st, u8* buf, int part, int parts) {
        auto mine = [&](int q) { return q * parts / NCOPY == part; };
        int k = st * 128;
        u32 b = smem_addr(buf);
#pragma unroll
        for (int i = 0; i < NW; i++) {
            bool ok = wok >> i & 1;
            if (mine(i)) cp_async16(b + wdst[i], wsrc[i] + (ok ? (T::F4 ? k >> 1 : k) : 0), ok);
        }
        if (T::F4 && mine(NW) && tid < T::BN) cp_async4(b + T::W_BYTES + 4 * tid, ssrc + (sok ? k >> 5 : 0), sok);
        u32 xb = b + T::W_BYTES + T::WS_BYTES;
#pragma unroll
        for (int i = 0; i < NX; i++) {
            const u16* plane = xq + (i / (NX / T::PLANES)) * pstride;
            if (mine(NW + T::F4 + i))
                cp_async16(xb + xdst[i], plane + (xsrc[i] >= 0 ? xsrc[i] + k : 0), xsrc[i] >= 0);
        }
        if (!T::EXACT && mine(NCOPY - 1) && tid < BM)
            cp_async4(xb + T::X_BYTES + 4 * tid, xs + (xssrc >= 0 ? xssrc + (k >> 7) : 0), xssrc >= 0);
    };

    int steps = K >> 7, per_split = steps / KS;
#pragma unroll
    for (int s = 0; s < T::STAGES - 1; s++) {
        if (s < steps) issue(s, stages + s * T::STAGE, 0, 1);
        cp_commit();
    }
    float tot[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) tot[m][j][q] = 0.0f;
    int wr0 = wn * 64, xr0 = wm * WM;
    const u8* wsc = sl.s[wn] + (long)(sl.row[wn] >> 7) * (K >> 7);  // FP8: the slab's scale row

    for (int i = 0; i < steps; i++) {
        cp_wait<T::STAGES - 2>();
        __syncthreads();
        int nx = i + T::STAGES - 1;
        u8* next = stages + (nx % T::STAGES) * T::STAGE;
        constexpr bool SPREAD = TILE_SPREAD && (WN == 4 || T::EXACT);
        auto issue_part = [&](int part, int parts) {
            if (nx < steps && (SPREAD || part == 0)) issue(nx, next, SPREAD ? part : 0, SPREAD ? parts : 1);
        };
        const u8* st = stages + (i % T::STAGES) * T::STAGE;
        const u8* xst = st + T::W_BYTES + T::WS_BYTES;
        const float* xsc = (const float*)(xst + T::X_BYTES);
        if constexpr (T::F4) {
            // The totals in units of the activation rows' scales over the step (pow2_recip).
            float x0[NT], x1[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                x0[j] = xsc[xr0 + 8 * j + 2 * t];
                x1[j] = xsc[xr0 + 8 * j + 2 * t + 1];
                float r0 = pow2_recip(x0[j]), r1 = pow2_recip(x1[j]);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    scale_cols(tot[m][j], r0, r1);
                }
            }
#pragma unroll
            for (int b = 0; b < 4; b++) {
                issue_part(b, 4);
                uint4 xv[NT];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    int row = xr0 + 8 * j + g;
                    xv[j] = lds128(xst + row * 256 + 16 * swz_x<true>(row, 4 * b + t));
                }
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    int ra = wr0 + 16 * m + g, rb = ra + 8;
                    u32 x = lds32(st + ra * 64 + 16 * swz_w4(ra, b) + 4 * t);
                    u32 y = lds32(st + rb * 64 + 16 * swz_w4(rb, b) + 4 * t);
                    u32 A0[4], A1[4];
                    a_frags_f4(x, y, A0, A1);
                    float fa = f4_scale(lds32(st + T::W_BYTES + 4 * ra), b);
                    float fb = f4_scale(lds32(st + T::W_BYTES + 4 * rb), b);
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        mma16816(c, A0[0], A0[1], A0[2], A0[3], xv[j].x, xv[j].y);
                        mma16816(c, A1[0], A1[1], A1[2], A1[3], xv[j].z, xv[j].w);
                        tot[m][j][0] = fmaf(c[0], fa, tot[m][j][0]);
                        tot[m][j][1] = fmaf(c[1], fa, tot[m][j][1]);
                        tot[m][j][2] = fmaf(c[2], fb, tot[m][j][2]);
                        tot[m][j][3] = fmaf(c[3], fb, tot[m][j][3]);
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    scale_cols(tot[m][j], x0[j], x1[j]);
                }
        } else {
            // mma_core_f8's order a sum: halves of 64 k, MMAs i = 0..3 of each; the exact
            // planes' second and third parts into their own sums, plane by plane. (The weight
            // block's scale is loaded first, its latency under the MMAs.)
            float sw = e8m0(wsc[i]);
            float c[MT][NT][4], cl[T::EXACT ? MT : 1][NT][4];
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        c[m][j][q] = 0.0f;
                        if (T::EXACT) cl[m][j][q] = 0.0f;
                    }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                u32 xb[T::PLANES][NT][8];
#pragma unroll
                for (int p = 0; p < T::PLANES; p++)
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        int row = xr0 + 8 * j + g;
                        const u8* base = xst + (p * BM + row) * 256;
                        uint4 v0 = lds128(base + 16 * swz_x<false>(row, 8 * h + 2 * t));
                        uint4 v1 = lds128(base + 16 * swz_x<false>(row, 8 * h + 2 * t + 1));
                        u32 v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
                        for (int u = 0; u < 8; u++) xb[p][j][u] = v[u];
                    }
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    issue_part(h * MT + m, 2 * MT);
                    int ra = wr0 + 16 * m + g, rb = ra + 8;
                    uint4 wa = lds128(st + ra * 128 + 16 * swz_w8(ra, 4 * h + t));
                    uint4 wb = lds128(st + rb * 128 + 16 * swz_w8(rb, 4 * h + t));
                    u32 A[4][4];
                    a_frags_f8<T::EXACT>(wa, wb, A);
#pragma unroll
                    for (int p = 0; p < T::PLANES; p++)
#pragma unroll
                        for (int i = 0; i < 4; i++)
#pragma unroll
                            for (int j = 0; j < NT; j++) {
                                if (!T::EXACT)
                                    mma16816(c[m][j], A[i][0], A[i][1], A[i][2], A[i][3], xb[p][j][2 * i],
                                             xb[p][j][2 * i + 1]);
                                else if (p == 0)
                                    mma16816_bf16(c[m][j], A[i][0], A[i][1], A[i][2], A[i][3], xb[p][j][2 * i],
                                                  xb[p][j][2 * i + 1]);
                                else
                                    mma16816_bf16(cl[T::EXACT ? m : 0][j], A[i][0], A[i][1], A[i][2], A[i][3],
                                                  xb[p][j][2 * i], xb[p][j][2 * i + 1]);
                            }
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float s0 = T::EXACT ? sw : sw * xsc[xr0 + 8 * j + 2 * t];
                float s1 = T::EXACT ? sw : sw * xsc[xr0 + 8 * j + 2 * t + 1];
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if (T::EXACT)
#pragma unroll
                        for (int q = 0; q < 4; q++) c[m][j][q] += cl[T::EXACT ? m : 0][j][q];
                    tot[m][j][0] = fmaf(c[m][j][0], s0, tot[m][j][0]);
                    tot[m][j][1] = fmaf(c[m][j][1], s1, tot[m][j][1]);
                    tot[m][j][2] = fmaf(c[m][j][2], s0, tot[m][j][2]);
                    tot[m][j][3] = fmaf(c[m][j][3], s1, tot[m][j][3]);
                }
            }
        }
        cp_commit();
        // A k-slice ends: its sum joins those before it, in order (reduce_splits').
        if ((i + 1) % per_split == 0) {
            bool first = i + 1 == per_split;
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        float* r = run + (((warp * MT + m) * NT + j) * 4 + q) * 32 + lane;
                        *r = first ? tot[m][j][q] : *r + tot[m][j][q];
                        tot[m][j][q] = 0.0f;
                    }
        }
    }
    cp_wait<0>();
}

__device__ __forceinline__ u32 dynamic_smem() {
    u32 v;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
    return v;
}

// The outputs a warp (wn, wm) holds in `run` after tile_product: f(weight row, activation row,
// index into run), the rows counted from the block's first.
template <int FMT, int WN, class F>
__device__ __forceinline__ void tile_outputs(int wn, int wm, F f) {
    using T = Tile<FMT, WN>;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int m = 0; m < T::MT; m++)
#pragma unroll
        for (int j = 0; j < T::NT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++)
                f(64 * wn + 16 * m + g + (q >= 2 ? 8 : 0), wm * T::WM + 8 * j + 2 * t + (q & 1),
                  (((warp * T::MT + m) * T::NT + j) * 4 + q) * 32 + lane);
}

// Y = X W^T as mma_linear computes it, for R > 64 rows. Grid: x = tiles of BN weight rows, y =
// the weight (two where a second one shares the input: W2, N2 rows to Y2), z = tiles of BM
// rows. Groups (wo_a) need group_rows to be a multiple of BN.
template <int FMT>
__device__ void tile_linear(const u8* W, const u8* S, const u16* xq, const float* xs, float* Y, int N,
                            int K, int R, int ldq, int ldy, int group_rows, int KS, const u8* W2,
                            const u8* S2, float* Y2, int N2) {
    using T = Tile<FMT, 2>;
    extern __shared__ __align__(16) u8 smem[];
    if (dynamic_smem() < T::SMEM) __trap();
    pdl_wait();
    second_weight(W, S, Y, N, ldy, W2, S2, Y2, N2);
    int n0 = blockIdx.x * T::BN, r0 = blockIdx.z * T::BM;
    if (n0 >= N) return;
    float* run = (float*)(smem + T::STAGES * T::STAGE);
    int* arow = (int*)(smem + T::STAGES * T::STAGE + T::RUN);
    __shared__ Slabs<2> sl;
    int goff = group_rows > 0 ? (n0 / group_rows) * K : 0;
    for (int i = threadIdx.x; i < T::BM; i += 256) arow[i] = r0 + i < R ? (r0 + i) * ldq + goff : -1;
    if (threadIdx.x == 0) sl = {{W, W}, {S, S}, {n0, n0 + 64}};
    __syncthreads();
    tile_product<FMT, 2>(sl, N, K, KS, xq, xs, (long)R * ldq, arow, run, smem);
    int warp = threadIdx.x >> 5;
    tile_outputs<FMT, 2>(warp / 4, warp % 4, [&](int dn, int dr, int idx) {
        int n = n0 + dn, r = r0 + dr;
        if (n < N && r < R) Y[(long)r * ldy + n] = run[idx];
    });
}

#define TILE_LINEAR(NAME, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 1) tile_linear_##NAME(                   \
        const u8* W, const u8* S, const u16* xq, const float* xs, float* Y, int N, int K, int R, \
        int ldq, int ldy, int group_rows, int KS, const u8* W2, const u8* S2, float* Y2, int N2) { \
        tile_linear<FMT>(W, S, xq, xs, Y, N, K, R, ldq, ldy, group_rows, KS, W2, S2, Y2, N2);   \
    }

TILE_LINEAR(f8, FMT_F8)
TILE_LINEAR(f8x, FMT_F8X)
TILE_LINEAR(f4, FMT_F4)

// The routed experts as mma_experts computes them, an expert's pairs in tiles of 64. Up: a
// block takes 128 rows of w1 (warps 0-3) and the same rows of w3 (warps 4-7), and w1's warps
// finish with SwiGLU and the routing weight; down: 256 rows of w2. Grid: x = segment (moe_sort),
// y = tiles of weight rows.
template <int FMT, bool UP>
__device__ void tile_experts(const MmaExpertArgs& a) {
    using T = Tile<FMT, 4>;
    extern __shared__ __align__(16) u8 smem[];
    if (dynamic_smem() < T::SMEM) __trap();
    pdl_wait();
    u32 sg = blockIdx.x;
    if (sg >= *a.nseg) return;
    u32 e = a.seg_expert[sg], off = a.seg_off[sg], cnt = a.seg_cnt[sg];
    int N = UP ? a.F : a.D, K = UP ? a.D : a.F;
    int n0 = blockIdx.y * (UP ? T::BN / 2 : T::BN);
    if (n0 >= N) return;
    float* run = (float*)(smem + T::STAGES * T::STAGE);
    int* arow = (int*)(smem + T::STAGES * T::STAGE + T::RUN);
    int* pair = arow + T::BM;
    const u8* W1 = (const u8*)(UP ? a.w1[e] : a.w2[e]);
    const u8* S1 = (const u8*)(UP ? a.s1[e] : a.s2[e]);
    __shared__ Slabs<4> sl;
    if (threadIdx.x == 0 && UP) {
        const u8* W3 = (const u8*)a.w3[e];
        const u8* S3 = (const u8*)a.s3[e];
        sl = {{W1, W1, W3, W3}, {S1, S1, S3, S3}, {n0, n0 + 64, n0, n0 + 64}};
    } else if (threadIdx.x == 0) {
        sl = {{W1, W1, W1, W1}, {S1, S1, S1, S1}, {n0, n0 + 64, n0 + 128, n0 + 192}};
    }
    int warp = threadIdx.x >> 5, wn = warp / 2, wm = warp % 2;
    for (u32 c0 = 0; c0 < cnt; c0 += T::BM) {
        for (int i = threadIdx.x; i < T::BM; i += 256) {
            int p = c0 + i < cnt ? (int)a.order[off + c0 + i] : -1;
            pair[i] = p;
            arow[i] = p < 0 ? -1 : (UP ? p / a.k : p) * K;
        }
        __syncthreads();
        tile_product<FMT, 4>(sl, N, K, a.KS, a.xq, a.xs, 0, arow, run, smem);
        __syncthreads();
        if (!UP || wn < 2) {
            const float* up = run + (UP ? 4 * T::MT * T::NT * 4 * 32 : 0);  // w3's warps' sums
            tile_outputs<FMT, 4>(wn, wm, [&](int dn, int dr, int idx) {
                int n = n0 + dn, p = pair[dr];
                if (n >= N || p < 0) return;
                if (UP) a.out[(long)p * N + n] = swiglu1(run[idx], up[idx], a.limit) * a.weights[p];
                else a.out[(long)p * N + n] = run[idx];
            });
        }
        __syncthreads();
    }
}

#define TILE_EXPERTS(NAME, FMT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 1) tile_experts_up_##NAME(MmaExpertArgs a) { \
        tile_experts<FMT, true>(a);                                                            \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1) tile_experts_down_##NAME(MmaExpertArgs a) { \
        tile_experts<FMT, false>(a);                                                           \
    }

TILE_EXPERTS(f8, FMT_F8)
TILE_EXPERTS(f4, FMT_F4)

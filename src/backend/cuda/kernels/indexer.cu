// The lightning indexer: scores of every visible compressed key for each query, then the top-k.

struct ScoreArgs {
    const float* q;      // [T, H, dim], rotated, Hadamard-transformed, FP4-rounded
    const float* w;      // [T, H] head weights
    const u32* tok_seq;
    const u32* tok_pos;
    const SeqDesc* descs;
    float* scores;       // [T, nmax]
    u8* img;             // [T, image]: each token's staged queries (index_stage)
    u32* hist;           // [T, 256] zero, or null: the histogram topk_cluster starts from
    int H, dim, ratio, nmax;
    int passes;          // of 128 entries a row, dealt evenly over the grid's y blocks
    int blockwise;       // 1: every pass sums each block of 32 dims on its own (tests)
    long table;
    RowFmt row;
};

// Scale blocks of 32 dims an index row has at most, and its 16-byte pieces (dim <= 128: 64
// bytes of codes, 4 of scales, padded; the host checks).
#define IKB_MAX 4
#define IROW_PIECES 5
// Bytes between two heads' staged queries: the dims as f16 plus 64, so that the eight lanes of
// a quarter warp (two heads, four 16-byte pieces each) reach all 32 banks.
#define QROW(dim) ((dim) * 2 + 64)
// How many binades below its row's (or head's) largest a block's scale may lie, keys' and
// queries' together, for the blocks to be summed by the MMAs together (see index_scores).
#define IFOLD_SPAN 6
// A query block of zeros: no exponent.
#define IZERO (-100000)

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// Bytes of a token's staged queries: per head the f16 values in the lanes' order (QROW), each
// block's scale (IKB_MAX floats) and the head's weight, then 16 bytes holding how far below
// its head's largest the lowest block's scale lies (at most 0). index_scores copies the rest
// to shared memory as it is.
__host__ __device__ __forceinline__ int index_image(int H, int dim) {
    return H * QROW(dim) + 4 * H * IKB_MAX + 4 * H + 16;
}

// Stages each token's queries for index_scores (one block a token): each (head, block)'s
// exponent 2^floor(log2 max|v|), each head's largest and how far below it the others lie, then
// the values over a power of two, exact in f16: the head's largest where every block lies
// within IFOLD_SPAN binades of its head's largest, else the block's own.
extern "C" __global__ void index_stage(ScoreArgs a) {
    pdl_wait();
    __shared__ int qe[128 * IKB_MAX], qtop[128];
    __shared__ int q_span;
    int t = blockIdx.x;
    int H = (a.H + 7) & ~7, dim = a.dim, KB = dim >> 5;
    u8* q16 = a.img + (long)t * index_image(H, dim);
    float* qs = (float*)(q16 + H * QROW(dim));
    float* wh = qs + H * IKB_MAX;
    if (threadIdx.x == 0) q_span = 0;
    for (int i = threadIdx.x; i < H * KB; i += blockDim.x) {
        int h = i / KB, b = i % KB;
        float am = 0.0f;
        if (h < a.H) {
            const float4* src = (const float4*)(a.q + ((long)t * a.H + h) * dim + 32 * b);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float4 f = src[j];
                am = fmaxf(am, fmaxf(fmaxf(fabsf(f.x), fabsf(f.y)), fmaxf(fabsf(f.z), fabsf(f.w))));
            }
        }
        qe[h * IKB_MAX + b] = am > 0.0f ? exponent_of(am) : IZERO;
    }
    __syncthreads();
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        int top = IZERO, low = 0;
        for (int b = 0; b < KB; b++) top = max(top, qe[h * IKB_MAX + b]);
        if (top == IZERO) top = 0;
        for (int b = 0; b < KB; b++)
            if (qe[h * IKB_MAX + b] != IZERO) low = min(low, qe[h * IKB_MAX + b] - top);
        atomicMin(&q_span, low);
        qtop[h] = top;
        wh[h] = h < a.H ? a.w[(long)t * a.H + h] * pow2i(top) : 0.0f;
    }
    __syncthreads();
    bool fold = q_span >= -IFOLD_SPAN;
    for (int i = threadIdx.x; i < H * KB; i += blockDim.x) {
        int h = i / KB, b = i % KB;
        float v[32];
        const float4* src = (const float4*)(a.q + ((long)t * a.H + h) * dim + 32 * b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float4 f = h < a.H ? src[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
        }
        // The block's exponent as the first loop found it (a block of zeros takes the head's).
        int top = qtop[h], e = qe[h * IKB_MAX + b] == IZERO ? top : qe[h * IKB_MAX + b];
        int by = fold ? top : e;
        // A power of two's reciprocal is exact (for normal values' exponents), so v * inv is
        // v / 2^by.
        float inv = 1.0f / pow2i(by);
        qs[h * IKB_MAX + b] = pow2i(by - top) * 16384.0f;
        uint4* o = (uint4*)(q16 + h * QROW(dim) + 64 * b);
#pragma unroll
        for (int grp = 0; grp < 4; grp++) {
            u16 c[8];
#pragma unroll
            for (int el = 0; el < 8; el++)
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(c[f4_slot(el)]) : "f"(v[8 * grp + el] * inv));
            o[grp] = make_uint4(c[0] | (u32)c[1] << 16, c[2] | (u32)c[3] << 16, c[4] | (u32)c[5] << 16,
                                c[6] | (u32)c[7] << 16);
        }
    }
    if (threadIdx.x == 0) *(int*)(wh + H) = q_span;
}

// An order-preserving key of a float (larger float, larger key).
__device__ __forceinline__ u32 fkey(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Scores on tensor cores. A query value is an e2m1 code times its block's power-of-two scale,
// a key the same. mma.m16n8k16: A = 16 entries' key codes (shifted into f16s, times 2^-14), B =
// 8 heads' query values over a power of two, C = entries x heads. A lane (g, t) feeds, of each
// block, the 8 dims at 8t (4 bytes of a row, in the pairs `a_frags_f4` decodes them in) and
// the queries are staged in that order. Each warp scores 32 entries (two m-tiles) a pass,
// against every head; a block of 4 warps covers its share of a token's passes of 128 entries.
//
// Every product is exact, and so is each block's sum of 32 (they fit an f32's significand).
// Where a row's block scales and a head's lie within IFOLD_SPAN binades of their largest, the
// relative scales go into the operands (keys' by an exact f16 multiplication, queries' when
// staged): the whole dot product is then summed by the MMAs (one chain a tile), exact too,
// in any order, since every partial sum is a multiple of the smallest
// product's unit and below 2^21 of them (128 products of at most 12 units of the largest
// blocks, 2^-4 of which the smallest unit is, times 2^-IFOLD_SPAN).
// Elsewhere each block's sum is scaled into the head's total by its own two scales, in block
// order, whose sum is then the same exact value where it fits and correctly rounded where not.
// Totals are in units of the row's largest key scale times the head's largest query scale;
// those multiply the head weights (the query's, exact: powers of two) and the entry's score at
// the end, which ReLU and the weighted sum commute with exactly.
//
// KB, the scale blocks of a row, is a template constant: with a run-time count, every block's
// loop ended in a branch, which kept the next block's loads and MMAs from being scheduled
// among the current ones.
template <int KB>
__device__ __forceinline__ void index_scores_kb(const ScoreArgs& a, u8* smem, u32* lh) {
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    // Heads in whole n-tiles of 8; the padding heads score zero with weight zero.
    int H = (a.H + 7) & ~7, dim = KB * 32, rb = a.row.bytes, pieces = rb >> 4;
    u8* q16 = smem;                                   // [H][QROW] f16 codes
    float* qs = (float*)(smem + H * QROW(dim));       // [H][KB] scale of each staged block
    float* wh = qs + H * IKB_MAX;                     // [H]
    uint4* rows = (uint4*)(wh + H);                   // per warp: 32 rows of rb bytes
    uint4* mine = rows + warp * 32 * IROW_PIECES;
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long n = (a.tok_pos[t] + 1) / a.ratio;
    long e_lo = 128 * ((long)blockIdx.y * a.passes / gridDim.y);
    long e_hi = 128 * ((long)(blockIdx.y + 1) * a.passes / gridDim.y);
    e_hi = e_hi < a.nmax ? e_hi : a.nmax;
    // A warp's passes: 32 entries each, interleaved with the other warps'. Rows of the next
    // pass are loaded while this one multiplies (a ring of three passes in shared memory,
    // copied asynchronously, measured slower: 33.6 -> 36.2 us at 1M). A pass's 32 rows lie in
    // one page (64 rows, and passes start at multiples of 32), one after another: one page
    // lookup, and the pieces past the last row the token sees left zero.
    uint4 next[IROW_PIECES];
    long e_end = n < e_hi ? n : e_hi;
    auto fetch = [&](long e0) {
        // (A page past the token's entries may not exist: its table entry is not read.)
        long live = (e_end - e0) * pieces;
        const uint4* rows0 = live > 0 ? (const uint4*)paged_row(s.tables, a.table, e0, rb) : nullptr;
#pragma unroll
        for (int u = 0; u < IROW_PIECES; u++) {
            int i = lane + 32 * u;
            next[u] = make_uint4(0, 0, 0, 0);
            if (i < 32 * pieces && i < live) next[u] = rows0[i];
        }
    };
    long e0 = e_lo + 32 * warp;
    if (e0 < e_hi) fetch(e0);
    // The token's staged queries, all loads in flight at once (and the first rows').
    const uint4* img = (const uint4*)(a.img + (long)t * index_image(H, dim));
    int pieces_img = (index_image(H, dim) - 16) >> 4;
    for (int i0 = threadIdx.x; i0 < pieces_img; i0 += 8 * blockDim.x) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (i0 + j * (int)blockDim.x < pieces_img) v[j] = img[i0 + j * blockDim.x];
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (i0 + j * (int)blockDim.x < pieces_img) ((uint4*)smem)[i0 + j * blockDim.x] = v[j];
    }
    int q_span = ((const int*)img)[4 * pieces_img];
    bool fold = q_span >= -IFOLD_SPAN;
    __syncthreads();
    for (; e0 < e_hi; e0 += 128) {
        __syncwarp();
#pragma unroll
        for (int u = 0; u < IROW_PIECES; u++) {
            int i = lane + 32 * u;
            if (i < 32 * pieces) mine[i] = next[u];
        }
        __syncwarp();
        if (e0 + 128 < e_hi) fetch(e0 + 128);
        const u8* rw = (const u8*)mine;
        // A fragments of both m-tiles, every block (even registers row g, odd row g + 8); each
        // row's largest key scale and its blocks' relative to it.
        u32 A[2][IKB_MAX][8], hk[2][2][IKB_MAX];
        float sk[2][2][IKB_MAX], top[2][2];
        bool near = true;
#pragma unroll
        for (int m = 0; m < 2; m++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                // (A row's scale bytes are 4-aligned: one load.)
                u32 sw = *(const u32*)(rw + (16 * m + g + 8 * r) * rb + a.row.s_off);
                int e[IKB_MAX], hi = 0, lo = 0;
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) e[b] = b < KB ? (sw >> (8 * b)) & 255 : 0;
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) hi = b < KB ? max(hi, e[b]) : hi;
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) {
                    if (b < KB) lo = min(lo, e[b] - hi);
                    // 2^(e - hi), flushed to zero below 2^-126 (the scales 126 binades apart);
                    // where the blocks fold, 2^(e - hi + 14) in both halves of an f16x2.
                    int x = max(127 + e[b] - hi, 0);
                    sk[m][r][b] = __int_as_float(x << 23);
                    hk[m][r][b] = 0x10001u * ((u32)(x - 127 + 29) << 10);
                }
                top[m][r] = e8m0(hi);
                near = near && lo + q_span >= -IFOLD_SPAN;
            }
#pragma unroll
            for (int b = 0; b < IKB_MAX; b++) {
                if (b >= KB) break;
                const u8* ra = rw + (16 * m + g) * rb;
                const u8* rc = rw + (16 * m + g + 8) * rb;
                u32 x = *(const u32*)(ra + 16 * b + 4 * tq), y = *(const u32*)(rc + 16 * b + 4 * tq);
                a_frags_f4(x, y, A[m][b], A[m][b] + 4);
            }
        }
        float sc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        if (fold && !a.blockwise && __all_sync(0xffffffffu, near)) {
            // Codes times 2^14 (undoing the shift) times the block's relative scale: exact, the
            // products at least 2^-9.
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) {
                    if (b >= KB) break;
#pragma unroll
                    for (int i = 0; i < 8; i++) A[m][b][i] = hmul2(A[m][b][i], hk[m][i & 1][b]);
                }
#pragma unroll 2
            for (int h0 = 0; h0 < H; h0 += 8) {
                const u8* qb = q16 + (h0 + g) * QROW(dim) + 16 * tq;
                // One chain a tile (exact in any order).
                float c[2][4] = {};
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) {
                    if (b >= KB) break;
                    uint4 B = *(const uint4*)(qb + 64 * b);
#pragma unroll
                    for (int m = 0; m < 2; m++) {
                        float* cm = c[m];
                        mma16816(cm, A[m][b][0], A[m][b][1], A[m][b][2], A[m][b][3], B.x, B.y);
                        mma16816(cm, A[m][b][4], A[m][b][5], A[m][b][6], A[m][b][7], B.z, B.w);
                    }
                }
                float w0 = wh[h0 + 2 * tq], w1 = wh[h0 + 2 * tq + 1];
#pragma unroll
                for (int m = 0; m < 2; m++) {
                    float d[4];
#pragma unroll
                    for (int j = 0; j < 4; j++) d[j] = c[m][j];
                    sc[m][0] += fmaxf(d[0], 0.0f) * w0 + fmaxf(d[1], 0.0f) * w1;
                    sc[m][1] += fmaxf(d[2], 0.0f) * w0 + fmaxf(d[3], 0.0f) * w1;
                }
            }
        } else {
            for (int h0 = 0; h0 < H; h0 += 8) {
                float tot[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                const u8* qb = q16 + (h0 + g) * QROW(dim) + 16 * tq;
                const float* q0 = qs + (h0 + 2 * tq) * IKB_MAX;
#pragma unroll
                for (int b = 0; b < IKB_MAX; b++) {
                    if (b >= KB) break;
                    uint4 B = *(const uint4*)(qb + 64 * b);
                    float s0 = q0[b], s1 = q0[IKB_MAX + b];
#pragma unroll
                    for (int m = 0; m < 2; m++) {
                        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        mma16816(c, A[m][b][0], A[m][b][1], A[m][b][2], A[m][b][3], B.x, B.y);
                        mma16816(c, A[m][b][4], A[m][b][5], A[m][b][6], A[m][b][7], B.z, B.w);
                        tot[m][0] = fmaf(c[0], sk[m][0][b] * s0, tot[m][0]);
                        tot[m][1] = fmaf(c[1], sk[m][0][b] * s1, tot[m][1]);
                        tot[m][2] = fmaf(c[2], sk[m][1][b] * s0, tot[m][2]);
                        tot[m][3] = fmaf(c[3], sk[m][1][b] * s1, tot[m][3]);
                    }
                }
                float w0 = wh[h0 + 2 * tq], w1 = wh[h0 + 2 * tq + 1];
#pragma unroll
                for (int m = 0; m < 2; m++) {
                    sc[m][0] += fmaxf(tot[m][0], 0.0f) * w0 + fmaxf(tot[m][1], 0.0f) * w1;
                    sc[m][1] += fmaxf(tot[m][2], 0.0f) * w0 + fmaxf(tot[m][3], 0.0f) * w1;
                }
            }
        }
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float v = sc[m][r];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                long e = e0 + 16 * m + 8 * r + g;
                if (tq == 0 && e < e_hi) {
                    v = e < n ? v * top[m][r] : NEG_INF;
                    a.scores[(long)t * a.nmax + e] = v;
                    if (lh && e < n) atomicAdd(&lh[fkey(v) >> 24], 1u);
                }
            }
    }
}

// With `hist`, each block also counts its visible scores by their keys' top 8 bits (`lh`) into
// the token's histogram: topk_cluster's first digit then needs no pass of its own.
extern "C" __global__ void __launch_bounds__(128) index_scores(ScoreArgs a) {
    pdl_wait();
    extern __shared__ __align__(16) u8 smem[];
    __shared__ u32 hist[256];
    u32* lh = a.hist ? hist : nullptr;
    if (lh)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) lh[i] = 0;
    // (index_scores_kb's barrier after its staging orders the zeros before its counts.)
    switch (a.dim >> 5) {
    case 1: index_scores_kb<1>(a, smem, lh); break;
    case 2: index_scores_kb<2>(a, smem, lh); break;
    case 3: index_scores_kb<3>(a, smem, lh); break;
    default: index_scores_kb<4>(a, smem, lh); break;
    }
    if (!lh) return;
    __syncthreads();
    u32* gh = a.hist + 256l * blockIdx.x;
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (lh[i]) atomicAdd(&gh[i], lh[i]);
}

// Warp 0 of the block finds, counting a 256-bin histogram's bins from the top, the bin in
// which the count reaches `need`: sel[0] = the bin, sel[1] = how many of its keys are needed
// (bin 0 and what is left where the bins hold fewer). Each lane sums 8 bins, a warp scan adds
// the lanes' sums: a thread walking 256 bins one shared-memory latency after another had taken
// some 3 us a pass.
__device__ void pick_bin(const u32* hist, u32 need, u32* sel) {
    int lane = threadIdx.x & 31;
    if (threadIdx.x >= 32) return;
    u32 h[8], c = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        h[j] = hist[255 - 8 * lane - j];
        c += h[j];
    }
    u32 cum = c;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        u32 y = __shfl_up_sync(0xffffffffu, cum, o);
        if (lane >= o) cum += y;
    }
    u32 above = cum - c;
    if ((above < need && need <= cum) || (lane == 31 && cum < need)) {
        int j = 0;
        for (; j < 7; j++) {
            if (above + h[j] >= need) break;
            above += h[j];
        }
        sel[0] = 255 - 8 * lane - j;
        sel[1] = need - above;
    }
}

// Inclusive prefix sums over the warp of two values a lane.
__device__ __forceinline__ void warp_scan2(u32& a, u32& b) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        u32 ya = __shfl_up_sync(0xffffffffu, a, o), yb = __shfl_up_sync(0xffffffffu, b, o);
        if (lane >= o) {
            a += ya;
            b += yb;
        }
    }
}

// Exclusive prefix sums over the block (1024 threads at most) of two values a thread; `sh` holds
// 64 words.
__device__ void block_scan2(u32& a, u32& b, u32* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    u32 ia = a, ib = b;
    warp_scan2(ia, ib);
    __syncthreads();
    if (lane == 31) {
        sh[w] = ia;
        sh[32 + w] = ib;
    }
    __syncthreads();
    if (w == 0) {
        u32 sa = lane < nw ? sh[lane] : 0, sb = lane < nw ? sh[32 + lane] : 0;
        warp_scan2(sa, sb);
        sh[lane] = sa;
        sh[32 + lane] = sb;
    }
    __syncthreads();
    a = ia - a + (w > 0 ? sh[w - 1] : 0);
    b = ib - b + (w > 0 ? sh[31 + w] : 0);
}

// Exclusive prefix sum over the block (1024 threads at most) of one value a thread, and the
// block's total; `sh` holds 64 words.
__device__ u32 block_scan(u32 v, u32* sh, u32* total) {
    u32 x = v, zero = 0;
    block_scan2(x, zero, sh);
    *total = sh[((blockDim.x + 31) >> 5) - 1];
    return x;
}

// The next 8 bits of the k-th largest key from a pass's histogram (all threads, after the
// barrier that completes it).
__device__ __forceinline__ void take_digit(const u32* hist, int shift, u32* sel, u32& prefix, u32& mask, u32& need) {
    pick_bin(hist, need, sel);
    __syncthreads();
    prefix |= sel[0] << shift;
    mask |= 255u << shift;
    need = sel[1];
}

// A thread's PER keys from entry i0 (those from n on left out): how many lie above the k-th
// largest (`prefix`) and how many equal it (gt, eq), and the same of the block's threads
// before it (gt_before, eq_before; `sh` as block_scan2's).
template <int PER>
__device__ __forceinline__ void count_keys(const u32 (&u)[PER], long i0, long n, u32 prefix, u32* sh, u32& gt,
                                           u32& eq, u32& gt_before, u32& eq_before) {
    gt = 0;
    eq = 0;
#pragma unroll
    for (int j = 0; j < PER; j++) {
        gt += i0 + j < n && u[j] > prefix;
        eq += i0 + j < n && u[j] == prefix;
    }
    gt_before = gt;
    eq_before = eq;
    block_scan2(gt_before, eq_before, sh);
}

// A thread's picks in index order from out[at] on: its keys above the k-th largest and the
// first `take` of those equal to it.
template <int PER>
__device__ __forceinline__ void write_picks(const u32 (&u)[PER], long i0, long n, u32 prefix, u32 take, u32 at,
                                            int* out) {
#pragma unroll
    for (int j = 0; j < PER; j++) {
        if (i0 + j < n && (u[j] > prefix || (u[j] == prefix && take > 0))) {
            if (u[j] == prefix) take--;
            out[at++] = (int)(i0 + j);
        }
    }
}

// Entries a thread of `index_topk` holds: rows of up to 8,192 entries take one block.
#define TOPK1_PER 8

// The k largest of each row's first n scores (n = visible entries of the token; the lowest
// indices among ties), written in index order to picks[t][0..], the rest -1: one block of 1,024
// threads a row, each holding 8 consecutive keys in registers through four passes of 8 bits.
extern "C" __global__ void __launch_bounds__(1024) index_topk(const float* scores, const u32* tok_pos,
                                                              int ratio, int nmax, int k, int* picks) {
    pdl_wait();
    __shared__ u32 hist[256];
    __shared__ u32 sh[64];
    __shared__ u32 sel[2];
    int t = blockIdx.x;
    long n = (tok_pos[t] + 1) / ratio;
    const float* row = scores + (long)t * nmax;
    int* out = picks + (long)t * k;
    if (n <= k) {
        for (int i = threadIdx.x; i < k; i += blockDim.x) out[i] = i < n ? i : -1;
        return;
    }
    long i0 = (long)threadIdx.x * TOPK1_PER;
    u32 u[TOPK1_PER];
#pragma unroll
    for (int j = 0; j < TOPK1_PER; j++) u[j] = i0 + j < n ? fkey(row[i0 + j]) : 0;
    u32 prefix = 0, mask = 0, need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (threadIdx.x < 256) hist[threadIdx.x] = 0;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < TOPK1_PER; j++)
            if (i0 + j < n && (u[j] & mask) == prefix) atomicAdd(&hist[(u[j] >> shift) & 255], 1u);
        __syncthreads();
        take_digit(hist, shift, sel, prefix, mask, need);
    }
    // `prefix` is the k-th largest key; `need` entries equal to it are taken, lowest first.
    u32 gt, eq, gt_before, eq_before;
    count_keys(u, i0, n, prefix, sh, gt, eq, gt_before, eq_before);
    u32 tied = eq_before < need ? eq_before : need, take = need - tied < eq ? need - tied : eq;
    write_picks(u, i0, n, prefix, take, gt_before + tied, out);
}

// The top-k of long rows over many blocks a token. Three passes of `topk_digit` find the k-th
// largest key 11, 11 and 10 bits at a time: each block counts its slice of the row (the keys
// that match the digits found so far) into the token's global histogram, and the last block
// to finish picks the digit, records it in the token's state and clears the histogram and its
// counter (which are launch counters: zero before, zero after). `topk_count` and `topk_write`
// then emit the picks in index order, the lowest indices among ties, as index_topk does.
struct TopkArgs {
    const float* scores;  // [T, nmax]
    const u32* tok_pos;
    u32* hist;            // [T, 2048], zero (left zero)
    u32* done;            // [T] blocks finished, zero (left zero)
    u32* state;           // [T, 4]: prefix, mask, need (the first pass writes them)
    u32* counts;          // [T, blocks, 2]: keys above the k-th, keys equal to it
    int* picks;           // [T, k]
    int ratio, nmax, k, per_block;
};

// One digit of the k-th largest key, bits [shift, shift + bits), among the keys that match the
// digits found before (none for the first).
extern "C" __global__ void __launch_bounds__(256) topk_digit(TopkArgs a, int shift, int bits) {
    pdl_wait();
    __shared__ u32 lh[2048];
    __shared__ u32 scan[64];
    __shared__ int last;
    int t = blockIdx.x, nbins = 1 << bits;
    long n = (a.tok_pos[t] + 1) / a.ratio;
    if (n <= a.k) return;
    u32* st = a.state + 4 * t;
    bool first = shift + bits == 32;
    u32 prefix = first ? 0 : st[0], mask = first ? 0 : st[1];
    for (int i = threadIdx.x; i < nbins; i += blockDim.x) lh[i] = 0;
    __syncthreads();
    const float* row = a.scores + (long)t * a.nmax;
    long lo = (long)blockIdx.y * a.per_block, hi = lo + a.per_block < n ? lo + a.per_block : n;
#pragma unroll 4
    for (long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        u32 u = fkey(row[i]);
        if ((u & mask) == prefix) atomicAdd(&lh[(u >> shift) & (nbins - 1)], 1u);
    }
    __syncthreads();
    u32* gh = a.hist + 2048l * t;
    for (int i = threadIdx.x; i < nbins; i += blockDim.x)
        if (lh[i]) atomicAdd(&gh[i], lh[i]);
    __threadfence();
    __syncthreads();
    // Blocks past the row's visible entries count nothing but still report in.
    if (threadIdx.x == 0) last = atomicAdd(&a.done[t], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Thread i holds bins counted from the top, nbins / 256 of them (at most 8), loaded at once
    // past L1 (the other blocks' counts are in L2): the thread that finds the digit walks them
    // in registers (reloading each had cost it one L2 round trip after another).
    int per = nbins / blockDim.x;
    u32 need = first ? (u32)a.k : st[2];
    u32 hb[8], c = 0, total;
#pragma unroll
    for (int j = 0; j < 8; j++) hb[j] = j < per ? __ldcg(gh + nbins - 1 - (threadIdx.x * per + j)) : 0;
#pragma unroll
    for (int j = 0; j < 8; j++) c += hb[j];
    u32 above = block_scan(c, scan, &total);
    if (above < need && need <= above + c) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int bin = nbins - 1 - (threadIdx.x * per + j);
            if (above + hb[j] >= need) {
                st[0] = prefix | ((u32)bin << shift);
                st[1] = mask | ((u32)(nbins - 1) << shift);
                st[2] = need - above;
                break;
            }
            above += hb[j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nbins; i += blockDim.x) gh[i] = 0;
    if (threadIdx.x == 0) a.done[t] = 0;
}

// Per block: keys above the k-th largest and keys equal to it.
extern "C" __global__ void __launch_bounds__(256) topk_count(TopkArgs a) {
    pdl_wait();
    __shared__ float sh[32];
    int t = blockIdx.x;
    long n = (a.tok_pos[t] + 1) / a.ratio;
    if (n <= a.k) return;
    u32 prefix = a.state[4 * t];
    const float* row = a.scores + (long)t * a.nmax;
    long lo = (long)blockIdx.y * a.per_block, hi = lo + a.per_block < n ? lo + a.per_block : n;
    u32 gt = 0, eq = 0;
#pragma unroll 4
    for (long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        u32 u = fkey(row[i]);
        gt += u > prefix;
        eq += u == prefix;
    }
    // Counts below 2^24 add exactly in f32.
    float g = block_sum((float)gt, sh), e = block_sum((float)eq, sh);
    if (threadIdx.x == 0) {
        u32* c = a.counts + 2 * ((long)t * gridDim.y + blockIdx.y);
        c[0] = (u32)g;
        c[1] = (u32)e;
    }
}

// Each block writes its picks after those of the blocks before it, in index order.
extern "C" __global__ void __launch_bounds__(256) topk_write(TopkArgs a) {
    pdl_wait();
    __shared__ u32 scan[256];
    int t = blockIdx.x;
    long n = (a.tok_pos[t] + 1) / a.ratio;
    int* out = a.picks + (long)t * a.k;
    if (n <= a.k) {
        if (blockIdx.y == 0)
            for (int i = threadIdx.x; i < a.k; i += blockDim.x) out[i] = i < n ? i : -1;
        return;
    }
    u32 prefix = a.state[4 * t], need = a.state[4 * t + 2];
    // What the blocks before this one write: their keys above the k-th and the ties they take
    // (the lowest indices first: block y takes min(e_y, need - ties before y)), by block scans.
    u32 at = 0, eqb = 0;
    const u32* c = a.counts + 2l * t * gridDim.y;
    for (u32 y0 = 0; y0 < blockIdx.y; y0 += blockDim.x) {
        u32 y = y0 + threadIdx.x, g = 0, e = 0, te, tg;
        if (y < blockIdx.y) {
            g = c[2 * y];
            e = c[2 * y + 1];
        }
        u32 before = eqb + block_scan(e, scan, &te);
        u32 take = before >= need ? 0 : (need - before < e ? need - before : e);
        block_scan(g + take, scan, &tg);
        at += tg;
        eqb += te;
    }
    const float* row = a.scores + (long)t * a.nmax;
    long lo = (long)blockIdx.y * a.per_block, hi = lo + a.per_block < n ? lo + a.per_block : n;
    long len = hi > lo ? hi - lo : 0;
    long chunk = (len + blockDim.x - 1) / blockDim.x;
    long i0 = lo + threadIdx.x * chunk, i1 = i0 + chunk < hi ? i0 + chunk : hi;
    u32 gt = 0, eq = 0;
    for (long i = i0; i < i1; i++) {
        u32 u = fkey(row[i]);
        gt += u > prefix;
        eq += u == prefix;
    }
    u32 gt_before = gt, eq_before = eq;
    block_scan2(gt_before, eq_before, scan);
    // Ties go lowest first: of those before this thread's, the blocks before took `prior`.
    u32 prior = eqb < need ? eqb : need, tied = eqb + eq_before < need ? eqb + eq_before : need;
    u32 take = need - tied < eq ? need - tied : eq;
    at += gt_before + tied - prior;
    for (long i = i0; i < i1; i++) {
        u32 u = fkey(row[i]);
        if (u > prefix || (u == prefix && take > 0)) {
            if (u == prefix) take--;
            out[at++] = (int)i;
        }
    }
}

// Entries a thread of `topk_cluster` holds, and a block's (1,024 threads).
#define TOPKC_PER 16
#define TOPKC_BLOCK (1024 * TOPKC_PER)

// index_topk's selection for rows of up to 16 blocks' entries (262,144: V4's 1M context over
// 4), one cluster of ceil(n / TOPKC_BLOCK) blocks a row, its keys in registers from one load.
// The first 8 bits of the k-th largest key come from the row's histogram of its keys' top 8
// bits, which index_scores counted (`hist`, [T, 256]; zero again when the kernel ends). Three
// passes find the rest, 8 bits each: each block counts its keys into a 256-bin histogram and
// sends it to every block of the cluster, which all pick the same digit from the sum; then
// each block writes its picks after those of the blocks before it, whose counts they sent it
// too. The same picks as index_topk and the digit passes (the lowest indices among ties, index
// order), in one launch where those took five, each a round trip through global memory. Blocks
// send by `st.async`, counted by the receiver's mbarrier (one for each exchange): no fences.
extern "C" __global__ void __launch_bounds__(1024) topk_cluster(const float* scores, const u32* tok_pos,
                                                                int ratio, int nmax, int k, int* picks,
                                                                u32* hist) {
    __shared__ __align__(8) unsigned long long bars[4];
    __shared__ __align__(16) u32 lhist[256];
    __shared__ __align__(16) u32 recv[2][16][256];  // the cluster's histograms, by pass parity
    __shared__ __align__(16) uint4 cnt[16];         // the blocks' keys above the k-th and equal
    __shared__ u32 total[256];
    __shared__ u32 sh[64];
    __shared__ u32 sel[2];
    const int C = gridDim.x, r = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, lane = tid & 31;
    // The barriers exist in every block before any block sends.
    if (tid < 4) mbar_expect(smem_addr(&bars[tid]), tid < 3 ? C * 1024 : C * 16);
    if (tid < 256) lhist[tid] = 0;
    __syncthreads();
    cluster_sync_relaxed();
    pdl_wait();
    long n = (tok_pos[t] + 1) / ratio;
    int* out = picks + (long)t * k;
    u32* gh = hist + 256l * t;
    if (n <= k) {
        // (Uniform over the cluster: no block waits for another.)
        if (r == 0) {
            for (int i = tid; i < k; i += blockDim.x) out[i] = i < n ? i : -1;
            if (tid < 256) gh[tid] = 0;
        }
        return;
    }
    if (tid < 256) total[tid] = gh[tid];
    const float* row = scores + (long)t * nmax;
    long i0 = (long)r * TOPKC_BLOCK + (long)tid * TOPKC_PER;
    u32 u[TOPKC_PER];
    if (i0 + TOPKC_PER <= n && ((long)t * nmax & 3) == 0) {
#pragma unroll
        for (int j = 0; j < TOPKC_PER; j += 4) {
            float4 v = *(const float4*)(row + i0 + j);
            u[j] = fkey(v.x);
            u[j + 1] = fkey(v.y);
            u[j + 2] = fkey(v.z);
            u[j + 3] = fkey(v.w);
        }
    } else {
#pragma unroll
        for (int j = 0; j < TOPKC_PER; j++) u[j] = i0 + j < n ? fkey(row[i0 + j]) : 0;
    }
    u32 prefix = 0, mask = 0, need = k;
    __syncthreads();
    take_digit(total, 24, sel, prefix, mask, need);
    for (int pass = 1, shift = 16; shift >= 0; pass++, shift -= 8) {
        // Lanes with the same bin add once (the keys that match the digits so far crowd into
        // a few bins).
#pragma unroll
        for (int j = 0; j < TOPKC_PER; j++) {
            bool in = i0 + j < n && (u[j] & mask) == prefix;
            if (!__any_sync(0xffffffffu, in)) continue;
            u32 bin = (u[j] >> shift) & 255;
            u32 peers = __match_any_sync(0xffffffffu, in ? bin : 0xffffffffu);
            if (in && __ffs(peers) - 1 == lane) atomicAdd(&lhist[bin], __popc(peers));
        }
        __syncthreads();
        // Thread i sends 16 bytes of the histogram to block i / 64.
        u32 bar = smem_addr(&bars[pass - 1]);
        if (tid < 64 * C) {
            int dst = tid >> 6, c = tid & 63;
            u32 at = smem_addr(&recv[pass & 1][r][4 * c]);
            st_async4u(cluster_addr(at, dst), ((const uint4*)lhist)[c], cluster_addr(bar, dst));
        }
        __syncthreads();
        if (tid < 256) lhist[tid] = 0;
        mbar_wait0(bar);
        // Every block has read the row's histogram before it sent this pass's.
        if (pass == 1 && r == 0 && tid < 256) gh[tid] = 0;
        if (tid < 256) {
            u32 s = 0;
            for (int b = 0; b < C; b++) s += recv[pass & 1][b][tid];
            total[tid] = s;
        }
        __syncthreads();
        take_digit(total, shift, sel, prefix, mask, need);
    }
    // `prefix` is the k-th largest key; `need` entries equal to it are taken, lowest first.
    u32 gt, eq, gt_before, eq_before;
    count_keys(u, i0, n, prefix, sh, gt, eq, gt_before, eq_before);
    // The block's counts to every block (the last thread's sums).
    u32 bar = smem_addr(&bars[3]);
    if (tid == blockDim.x - 1) {
        uint4 v = make_uint4(gt_before + gt, eq_before + eq, 0, 0);
        for (int b = 0; b < C; b++) st_async4u(cluster_addr(smem_addr(&cnt[r]), b), v, cluster_addr(bar, b));
    }
    mbar_wait0(bar);
    u32 gb = 0, eb = 0;
    for (int b = 0; b < r; b++) {
        gb += cnt[b].x;
        eb += cnt[b].y;
    }
    u32 eqb = eb + eq_before;
    u32 tied = eqb < need ? eqb : need, take = need - tied < eq ? need - tied : eq;
    write_picks(u, i0, n, prefix, take, gb + gt_before + tied, out);
}

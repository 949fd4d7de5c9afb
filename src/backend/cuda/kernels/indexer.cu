// The lightning indexer: scores of every visible compressed key for each query, then the top-k.

struct ScoreArgs {
    const float* q;      // [T, H, dim], rotated, Hadamard-transformed, FP4-rounded
    const float* w;      // [T, H] head weights
    const u32* tok_seq;
    const u32* tok_pos;
    const SeqDesc* descs;
    float* scores;       // [T, nmax]
    int H, dim, ratio, nmax, per_block, pad;
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

// Scores on tensor cores. A query value is an e2m1 code times its block's power-of-two scale,
// a key the same: each block of 32 dims sums exact products of f16 codes (key codes shifted
// into f16s, times 2^-14; query values divided by a power of two of their block), and the two
// scales then multiply that partial into the head's f32 total. mma.m16n8k16: A = 16 entries'
// key codes, B = 8 heads' query codes, C = entries x heads. A lane (g, t) feeds, of each block,
// the 8 dims at 8t (4 bytes of a row, in the pairs `a_frags_f4` decodes them in) and
// the queries are staged in that order. Each warp scores 32 entries (two m-tiles) a pass,
// against every head; a block of 4 warps covers `per_block` entries of one token.
extern "C" __global__ void __launch_bounds__(128) index_scores(ScoreArgs a) {
    pdl_wait();
    extern __shared__ __align__(16) u8 smem[];
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    // Heads in whole n-tiles of 8; the padding heads score zero with weight zero.
    int H = (a.H + 7) & ~7, dim = a.dim, KB = dim >> 5, rb = a.row.bytes, pieces = rb >> 4;
    u8* q16 = smem;                                   // [H][QROW] f16 codes
    float* qs = (float*)(smem + H * QROW(dim));       // [H][KB] scale of each staged block
    float* wh = qs + H * IKB_MAX;                     // [H]
    uint4* rows = (uint4*)(wh + H);                   // per warp: 32 rows of rb bytes
    uint4* mine = rows + warp * 32 * IROW_PIECES;
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long n = (a.tok_pos[t] + 1) / a.ratio;
    long e_lo = (long)blockIdx.y * a.per_block;
    long e_hi = e_lo + a.per_block < a.nmax ? e_lo + a.per_block : a.nmax;
    // Queries: each (head, block) divided by 2^floor(log2 max|v|), exact in f16, stored in the
    // lanes' order.
    for (int i = threadIdx.x; i < H * KB; i += blockDim.x) {
        int h = i / KB, b = i % KB;
        float v[32];
        const float4* src = (const float4*)(a.q + ((long)t * a.H + h) * dim + 32 * b);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float4 f = h < a.H ? src[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
        }
        float am = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j++) am = fmaxf(am, fabsf(v[j]));
        float sc = am > 0.0f ? pow2i(exponent_of(am)) : 1.0f;
        // A power of two's reciprocal is exact (2^-127 too, a subnormal), so v * inv is v / sc.
        float inv = 1.0f / sc;
        qs[h * IKB_MAX + b] = sc * 16384.0f;
        u16* o = (u16*)(q16 + h * QROW(dim)) + 32 * b;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            int grp = j >> 3, e = j & 7;
            u16 c;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(c) : "f"(v[j] * inv));
            o[8 * grp + f4_slot(e)] = c;
        }
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) wh[i] = i < a.H ? a.w[(long)t * a.H + i] : 0.0f;
    __syncthreads();
    // A warp's passes: 32 entries each, interleaved with the other warps'. Rows of the next
    // pass are loaded while this one multiplies.
    uint4 next[IROW_PIECES];
    auto fetch = [&](long e0) {
#pragma unroll
        for (int u = 0; u < IROW_PIECES; u++) {
            int i = lane + 32 * u;
            long e = e0 + i / pieces;
            next[u] = make_uint4(0, 0, 0, 0);
            if (i < 32 * pieces && e < n && e < e_hi)
                next[u] = ((const uint4*)paged_row(s.tables, a.table, e, rb))[i % pieces];
        }
    };
    long e0 = e_lo + 32 * warp;
    if (e0 < e_hi) fetch(e0);
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
        // A fragments of both m-tiles, every block; the keys' scales of rows g and g + 8.
        u32 A[2][IKB_MAX][8];
        float sk[2][2][IKB_MAX];
#pragma unroll
        for (int m = 0; m < 2; m++) {
            const u8* ra = rw + (16 * m + g) * rb;
            const u8* rc = rw + (16 * m + g + 8) * rb;
#pragma unroll
            for (int b = 0; b < IKB_MAX; b++) {
                if (b >= KB) break;
                u32 x = *(const u32*)(ra + 16 * b + 4 * tq), y = *(const u32*)(rc + 16 * b + 4 * tq);
                a_frags_f4(x, y, A[m][b], A[m][b] + 4);
                sk[m][0][b] = e8m0(ra[a.row.s_off + b]);
                sk[m][1][b] = e8m0(rc[a.row.s_off + b]);
            }
        }
        float sc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
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
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float v = sc[m][r];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                long e = e0 + 16 * m + 8 * r + g;
                if (tq == 0 && e < e_hi) a.scores[(long)t * a.nmax + e] = e < n ? v : NEG_INF;
            }
    }
}

// An order-preserving key of a float (larger float, larger key).
__device__ __forceinline__ u32 fkey(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Exclusive prefix sum over the block (blockDim.x <= 1024) of one value per thread.
__device__ u32 block_scan(u32 v, u32* sh, u32* total) {
    int i = threadIdx.x;
    sh[i] = v;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o *= 2) {
        u32 x = i >= o ? sh[i - o] : 0;
        __syncthreads();
        sh[i] += x;
        __syncthreads();
    }
    u32 incl = sh[i];
    *total = sh[blockDim.x - 1];
    __syncthreads();
    return incl - v;
}

// The k largest of each row's first n scores (n = visible entries of the token; the lowest
// indices among ties), written in index order to picks[t][0..], the rest -1 (one block a row).
extern "C" __global__ void index_topk(const float* scores, const u32* tok_pos, int ratio, int nmax,
                                      int k, int* picks) {
    pdl_wait();
    __shared__ u32 hist[256];
    __shared__ u32 scan[1024];
    __shared__ u32 sel[2];
    int t = blockIdx.x;
    long n = (tok_pos[t] + 1) / ratio;
    const float* row = scores + (long)t * nmax;
    int* out = picks + (long)t * k;
    if (n <= k) {
        for (int i = threadIdx.x; i < k; i += blockDim.x) out[i] = i < n ? i : -1;
        return;
    }
    u32 prefix = 0, mask = 0, need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
#pragma unroll 8
        for (long i = threadIdx.x; i < n; i += blockDim.x) {
            u32 u = fkey(row[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 above = 0;
            int bin = 255;
            for (; bin > 0; bin--) {
                if (above + hist[bin] >= need) break;
                above += hist[bin];
            }
            sel[0] = bin;
            sel[1] = need - above;
        }
        __syncthreads();
        prefix |= sel[0] << shift;
        mask |= 255u << shift;
        need = sel[1];
        __syncthreads();
    }
    // `prefix` is the k-th largest key; `need` elements equal to it are taken, lowest first.
    long chunk = (n + blockDim.x - 1) / blockDim.x;
    long i0 = threadIdx.x * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
    u32 gt = 0, eq = 0;
#pragma unroll 8
    for (long i = i0; i < i1; i++) {
        u32 u = fkey(row[i]);
        gt += u > prefix;
        eq += u == prefix;
    }
    u32 total;
    u32 eq_before = block_scan(eq, scan, &total);
    u32 take = eq_before >= need ? 0 : (need - eq_before < eq ? need - eq_before : eq);
    u32 at = block_scan(gt + take, scan, &total);
    for (long i = i0; i < i1; i++) {
        u32 u = fkey(row[i]);
        if (u > prefix || (u == prefix && take > 0)) {
            if (u == prefix) take--;
            out[at++] = (int)i;
        }
    }
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

extern "C" __global__ void __launch_bounds__(256) topk_digit(TopkArgs a, int shift, int bits) {
    pdl_wait();
    __shared__ u32 lh[2048];
    __shared__ u32 scan[256];
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
    // Thread i holds bins counted from the top, nbins / 256 of them.
    int per = nbins / blockDim.x;
    u32 need = first ? (u32)a.k : st[2];
    u32 c = 0;
    for (int j = 0; j < per; j++) c += ((volatile u32*)gh)[nbins - 1 - (threadIdx.x * per + j)];
    u32 total;
    u32 above = block_scan(c, scan, &total);
    if (above < need && need <= above + c) {
        for (int j = 0; j < per; j++) {
            int bin = nbins - 1 - (threadIdx.x * per + j);
            u32 h = ((volatile u32*)gh)[bin];
            if (above + h >= need) {
                st[0] = prefix | ((u32)bin << shift);
                st[1] = mask | ((u32)(nbins - 1) << shift);
                st[2] = need - above;
                break;
            }
            above += h;
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
    u32 total;
    eqb += block_scan(eq, scan, &total);
    u32 take = eqb >= need ? 0 : (need - eqb < eq ? need - eqb : eq);
    at += block_scan(gt + take, scan, &total);
    for (long i = i0; i < i1; i++) {
        u32 u = fkey(row[i]);
        if (u > prefix || (u == prefix && take > 0)) {
            if (u == prefix) take--;
            out[at++] = (int)i;
        }
    }
}

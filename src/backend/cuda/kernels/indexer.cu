// The lightning indexer: scores of every visible compressed key for each query, then the top-k.

struct ScoreArgs {
    const float* q;      // [T, H, dim], rotated, Hadamard-transformed, FP4-rounded
    const float* w;      // [T, H] head weights
    const u32* tok_seq;
    const u32* tok_pos;
    const SeqDesc* descs;
    float* scores;       // [T, nmax]
    int H, dim, ratio, nmax;
    long table;
    RowFmt row;
};

#define ET 32
// Entries each warp scores (8 warps a block).
#define EPW (ET / 8)
// Head chunks of 32 a lane holds (H <= 32 * HC_MAX; the host checks).
#define HC_MAX 4
// Bytes of an index row staged in shared memory (the host checks).
#define IROW_MAX 256

// One block (8 warps) a token and ET entries; each warp scores EPW entries at once (one pass
// over the dims, each query value read once for all of them), each lane 1/32 of the heads.
// Shared: q transposed [dim][H], the head weights, the decoded keys [ET][dim].
extern "C" __global__ void index_scores(ScoreArgs a) {
    extern __shared__ float sm[];
    __shared__ uint4 raw[ET][IROW_MAX / 16];
    float* qt = sm;
    float* wh = qt + a.dim * a.H;
    float* keys = wh + a.H;
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long n = (a.tok_pos[t] + 1) / a.ratio;
    long e0 = (long)blockIdx.y * ET;
    for (int i = threadIdx.x; i < a.dim * a.H; i += blockDim.x) {
        int h = i / a.dim, d = i % a.dim;
        qt[d * a.H + h] = a.q[(long)t * a.H * a.dim + i];
    }
    for (int i = threadIdx.x; i < a.H; i += blockDim.x) wh[i] = a.w[(long)t * a.H + i];
    // The entries' bytes in 16-byte pieces, all in flight at once, then decoded.
    int chunks = a.row.bytes / 16;
    for (int i = threadIdx.x; i < ET * chunks; i += blockDim.x) {
        long e = e0 + i / chunks;
        if (e < n) raw[i / chunks][i % chunks] = ((const uint4*)paged_row(s.tables, a.table, e, a.row.bytes))[i % chunks];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ET * a.dim; i += blockDim.x) {
        long e = e0 + i / a.dim;
        keys[i] = e < n ? row_elem((const u8*)raw[i / a.dim], i % a.dim, a.row) : 0.0f;
    }
    __syncthreads();
    const float* kw = keys + warp * EPW * a.dim;
    float acc[EPW][HC_MAX];
#pragma unroll
    for (int k = 0; k < EPW; k++)
#pragma unroll
        for (int c = 0; c < HC_MAX; c++) acc[k][c] = 0.0f;
    for (int d = 0; d < a.dim; d++) {
        float q[HC_MAX];
#pragma unroll
        for (int c = 0; c < HC_MAX; c++) q[c] = lane + 32 * c < a.H ? qt[d * a.H + lane + 32 * c] : 0.0f;
#pragma unroll
        for (int k = 0; k < EPW; k++) {
            float kv = kw[k * a.dim + d];
#pragma unroll
            for (int c = 0; c < HC_MAX; c++) acc[k][c] = fmaf(q[c], kv, acc[k][c]);
        }
    }
#pragma unroll
    for (int k = 0; k < EPW; k++) {
        long e = e0 + warp * EPW + k;
        float sc = 0.0f;
#pragma unroll
        for (int c = 0; c < HC_MAX; c++)
            if (lane + 32 * c < a.H) sc += fmaxf(acc[k][c], 0.0f) * wh[lane + 32 * c];
        sc = warp_sum(sc);
        if (lane == 0 && e < a.nmax) a.scores[(long)t * a.nmax + e] = e < n ? sc : NEG_INF;
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

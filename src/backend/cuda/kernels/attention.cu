// Sparse attention over the sliding window, the compressed entries and the sink, one shared KV
// head for every query head.

// Rounds the non-RoPE dims of each KV row to FP8 (block 64, in place) and packs the row in the
// state's layout (one block a token).
extern "C" __global__ void kv_pack(float* kv, u8* packed, RowFmt f) {
    extern __shared__ float v[];
    float* x = kv + (long)blockIdx.x * f.dim;
    for (int i = threadIdx.x; i < f.dim; i += blockDim.x) v[i] = x[i];
    __syncthreads();
    encode_row(v, packed + (long)blockIdx.x * f.bytes, f, x);
}

// Copies each sequence's last `window` packed rows of the chunk into its window ring.
extern "C" __global__ void window_store(const u8* packed, const u32* tok_seq, const u32* tok_pos,
                                        const SeqDesc* descs, long win_off, int window, int bytes) {
    int t = blockIdx.x;
    const SeqDesc s = descs[tok_seq[t]];
    long q = tok_pos[t];
    if (q - s.pos + window < s.len) return;
    uint4* dst = (uint4*)((u8*)s.fixed + win_off + (q % window) * (long)bytes);
    const uint4* src = (const uint4*)(packed + (long)t * bytes);
    for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) dst[i] = src[i];
}

struct AttnArgs {
    const float* q;      // [T, H, dh]
    const float* kv;     // [T, dh], rounded
    const int* picks;    // [T, K] entry ids (-1: none), or null
    const u32* tok_seq;
    const u32* tok_pos;
    const SeqDesc* descs;
    float* om;           // [T, H, S]
    float* ol;           // [T, H, S]
    float* oo;           // [T, H, S, dh]
    int H, dh, S, K, window, ratio;
    int t0;              // first token of this launch
    float scale;
    long win_off, table;
    RowFmt row;
};

#define KT 16
#define KEYS_PER_SPLIT 32
#define DPL_MAX 16
// Bytes of a packed row staged in shared memory (attention rows of head_dim <= 512 with 64
// RoPE dims take 720; the host checks).
#define ROW_MAX 768

// Where key kk of token t's key list lives: a packed row (its window rows, then its compressed
// entries), or, for a row of this very call not yet in the state, its index in `kv` (-1-i).
__device__ __forceinline__ const u8* key_row(const AttnArgs& a, const SeqDesc& s, long p, int nwin,
                                             long kk, int t, long* kv_row) {
    *kv_row = -1;
    if (kk < nwin) {
        long qk = p - nwin + 1 + kk;
        if (qk >= s.pos) {
            *kv_row = s.start + qk - s.pos;
            return nullptr;
        }
        return (const u8*)s.fixed + a.win_off + (qk % a.window) * (long)a.row.bytes;
    }
    long e = kk - nwin;
    if (a.picks) e = a.picks[(long)t * a.K + e];
    return paged_row(s.tables, a.table, e, a.row.bytes);
}

// Partial softmax of one token (t0 + blockIdx.x), a group of heads (one warp each, blockIdx.y),
// and a slice of its keys (blockIdx.z): running max, sum and weighted values.
extern "C" __global__ void attn_partial(AttnArgs a) {
    __shared__ float keys[KT][512];
    __shared__ uint4 raw[KT][ROW_MAX / 16];
    __shared__ const u8* src[KT];
    __shared__ long kv_row[KT];
    int t = a.t0 + blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nwarps = blockDim.x >> 5;
    int h = blockIdx.y * nwarps + warp;
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long p = a.tok_pos[t];
    int nwin = (int)(p + 1 < a.window ? p + 1 : a.window);
    long ncomp = 0;
    if (a.picks) {
        while (ncomp < a.K && a.picks[(long)t * a.K + ncomp] >= 0) ncomp++;
    } else if (a.ratio > 0) {
        ncomp = (p + 1) / a.ratio;
    }
    // The token's own number of slices, so that its result does not depend on the batch.
    long total = nwin + ncomp;
    long splits = (total + KEYS_PER_SPLIT - 1) / KEYS_PER_SPLIT;
    splits = splits < 1 ? 1 : (splits > a.S ? a.S : splits);
    long per = (total + splits - 1) / splits;
    long k0 = blockIdx.z * per, k1 = k0 + per < total ? k0 + per : total;
    if (blockIdx.z >= splits) k1 = k0;
    int dpl = a.dh / 32;
    float qv[DPL_MAX], o[DPL_MAX];
    bool live = h < a.H;
    const float* qh = a.q + ((long)t * a.H + (live ? h : 0)) * a.dh;
#pragma unroll
    for (int i = 0; i < DPL_MAX; i++) {
        qv[i] = (i < dpl) ? qh[lane + 32 * i] : 0.0f;
        o[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    int chunks = a.row.bytes / 16;
    for (long kb = k0; kb < k1; kb += KT) {
        int nk = (int)(k1 - kb < KT ? k1 - kb : KT);
        __syncthreads();
        // The rows' bytes in 16-byte pieces, all in flight at once; then decoded from shared
        // memory.
        if ((int)threadIdx.x < nk) src[threadIdx.x] = key_row(a, s, p, nwin, kb + threadIdx.x, t, &kv_row[threadIdx.x]);
        __syncthreads();
#pragma unroll 4
        for (int i = threadIdx.x; i < nk * chunks; i += blockDim.x) {
            const u8* r = src[i / chunks];
            if (r) raw[i / chunks][i % chunks] = ((const uint4*)r)[i % chunks];
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nk * a.dh; i += blockDim.x) {
            int k = i / a.dh, d = i % a.dh;
            keys[k][d] = src[k] ? row_elem((const u8*)raw[k], d, a.row) : a.kv[kv_row[k] * a.dh + d];
        }
        __syncthreads();
        for (int k = 0; k < nk; k++) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL_MAX; i++)
                if (i < dpl) d = fmaf(qv[i], keys[k][lane + 32 * i], d);
            float sc = warp_sum(d) * a.scale;
            float mn = fmaxf(m, sc);
            float alpha = expf(m - mn), pr = expf(sc - mn);
            l = l * alpha + pr;
#pragma unroll
            for (int i = 0; i < DPL_MAX; i++)
                if (i < dpl) o[i] = o[i] * alpha + pr * keys[k][lane + 32 * i];
            m = mn;
        }
    }
    if (!live) return;
    long slot = ((long)blockIdx.x * a.H + h) * a.S + blockIdx.z;
#pragma unroll
    for (int i = 0; i < DPL_MAX; i++)
        if (i < dpl) a.oo[slot * a.dh + lane + 32 * i] = o[i];
    if (lane == 0) {
        a.om[slot] = m;
        a.ol[slot] = l;
    }
}

// Joins the slices of each (token, head) (one block each) with the sink in the denominator.
// Each slice's weight exp(m_i - max) is computed once, in shared memory (S <= SPLITS_MAX).
#define SPLITS_MAX 128
extern "C" __global__ void attn_combine(const float* om, const float* ol, const float* oo,
                                        const float* sink, float* out, int H, int dh, int S) {
    __shared__ float wt[SPLITS_MAX];
    long th = blockIdx.x;
    int h = th % H;
    const float* ms = om + th * S;
    float mx = NEG_INF;
    for (int i = 0; i < S; i++) mx = fmaxf(mx, ms[i]);
    for (int i = threadIdx.x; i < S; i += blockDim.x) wt[i] = ms[i] > NEG_INF ? expf(ms[i] - mx) : 0.0f;
    __syncthreads();
    float den = expf(sink[h] - mx);
    for (int i = 0; i < S; i++)
        if (ms[i] > NEG_INF) den += ol[th * S + i] * wt[i];
    for (int d = threadIdx.x; d < dh; d += blockDim.x) {
        float acc = 0.0f;
#pragma unroll 4
        for (int i = 0; i < S; i++)
            if (ms[i] > NEG_INF) acc += oo[(th * S + i) * dh + d] * wt[i];
        out[th * dh + d] = acc / den;
    }
}

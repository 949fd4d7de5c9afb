// Sparse attention over the sliding window, the compressed entries and the sink, one shared KV
// head for every query head.

// Each KV row with its non-RoPE dims rounded to FP8 (block 64) into `rounded`, and packed in
// the state's layout (one block a token).
extern "C" __global__ void kv_pack(const float* kv, float* rounded, u8* packed, RowFmt f) {
    pdl_wait();
    extern __shared__ float v[];
    const float* x = kv + (long)blockIdx.x * f.dim;
    for (int i = threadIdx.x; i < f.dim; i += blockDim.x) v[i] = x[i];
    __syncthreads();
    encode_row(v, packed + (long)blockIdx.x * f.bytes, f, rounded + (long)blockIdx.x * f.dim);
}

// Copies token t's packed row into its sequence's window ring if it is among the sequence's
// last `window` rows of the chunk, by the calling block.
__device__ __forceinline__ void store_window_row(const u8* packed, const u32* tok_seq, const u32* tok_pos,
                                 const SeqDesc* descs, long win_off, int window, int bytes, int t) {
    const SeqDesc s = descs[tok_seq[t]];
    long q = tok_pos[t];
    if (q - s.pos + window < s.len) return;
    uint4* dst = (uint4*)((u8*)s.fixed + win_off + (q % window) * (long)bytes);
    const uint4* src = (const uint4*)(packed + (long)t * bytes);
    for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void window_store(const u8* packed, const u32* tok_seq, const u32* tok_pos,
                                        const SeqDesc* descs, long win_off, int window, int bytes) {
    pdl_wait();
    store_window_row(packed, tok_seq, tok_pos, descs, win_off, window, bytes, blockIdx.x);
}

struct AttnArgs {
    const float* q;      // [T, H, dh]
    const float* kv;     // [T, dh], rounded
    const int* picks;    // [T, K] entry ids, increasing, then -1s; or null
    const u32* tok_seq;
    const u32* tok_pos;
    const SeqDesc* descs;
    float* om;           // [T, H, S] partial results of the slices
    float* ol;           // [T, H, S]
    float* oo;           // [T, H, S, dh]
    const float* sink;   // [H]
    float* out;          // [T, H, dh], from token t0 on
    u32* done;           // [T, groups] counters, zero (left zero); attend only
    int H, dh, S, K, window, ratio;
    int t0;              // first token of this launch
    float scale;
    long win_off, table;
    RowFmt row;
    const u8* packed;    // [T] rows of this call in the state's layout (attend_mma)
    int hpb;             // heads a block (attend_mma)
    // attend_join: the inverse rotation's frequencies (`half` of them) or null; split_act's
    // three planes of `out` (`plane_n` values each) or null; whether it stores the window rows.
    const float* freqs;
    int half, store;
    u16* planes;
    long plane_n;
};

// Keys decoded to f32 in shared memory at once.
#define KT 16
#define KEYS_PER_SPLIT 16
#define DPL_MAX 16

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

// How token t's keys (nwin window rows, then its picks or all its compressed entries) divide
// into slices: `per` keys a slice (a multiple of 16), `n` of them, at most S; slice j is
// [j per, min((j + 1) per, total)). It depends on the token alone, so that its result does not
// depend on the batch. Every thread of the block calls it (`picked`: a shared int).
__device__ void token_slices(const AttnArgs& a, int t, long p, int nwin, int per_split, int* picked,
                             long* total, long* per, long* n) {
    long ncomp = 0;
    if (a.picks) {
        // The picks come first, then -1s: the last pick finds itself (one round of loads).
        if (threadIdx.x == 0) *picked = 0;
        __syncthreads();
        const int* pk = a.picks + (long)t * a.K;
        for (int i = threadIdx.x; i < a.K; i += blockDim.x)
            if (pk[i] >= 0 && (i + 1 == a.K || pk[i + 1] < 0)) *picked = i + 1;
        __syncthreads();
        ncomp = *picked;
    } else if (a.ratio > 0) {
        ncomp = (p + 1) / a.ratio;
    }
    *total = nwin + ncomp;
    long m = (*total + per_split - 1) / per_split;
    m = m < 1 ? 1 : (m > a.S ? a.S : m);
    // Whole chunks of 16 keys a slice (a chunk costs the same however few keys it holds).
    *per = ((*total + m - 1) / m + 15) & ~15l;
    *n = *total > *per ? (*total + *per - 1) / *per : 1;
}

// Block z's slice of token t's keys, [k0, k1) (empty past the token's slices), and their count.
__device__ void token_slice(const AttnArgs& a, int t, long p, int nwin, int per_split, int* picked,
                            long* k0, long* k1, long* splits) {
    long total, per;
    token_slices(a, t, p, nwin, per_split, picked, &total, &per, splits);
    *k0 = blockIdx.z * per;
    *k1 = *k0 + per < total ? *k0 + per : total;
    if (blockIdx.z >= *splits) *k1 = *k0;
}

// Attention of one token (t0 + blockIdx.x) and a group of heads (one warp each, blockIdx.y)
// over a slice of its keys (blockIdx.z): the running max, sum and weighted values of the slice.
// The last slice to finish joins the token's slices, with the sink in the denominator, in slice
// order.
extern "C" __global__ void attend(AttnArgs a) {
    pdl_wait();
    __shared__ __align__(16) float keys[KT][512];
    __shared__ const u8* src[KT];
    __shared__ long kv_row[KT];
    __shared__ int picked;
    __shared__ bool last;
    int t = a.t0 + blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nwarps = blockDim.x >> 5;
    int h = blockIdx.y * nwarps + warp;
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long p = a.tok_pos[t];
    int nwin = (int)(p + 1 < a.window ? p + 1 : a.window);
    // The token's own number of slices, so that its result does not depend on the batch.
    long k0, k1, splits;
    token_slice(a, t, p, nwin, KEYS_PER_SPLIT, &picked, &k0, &k1, &splits);
    // A lane holds dims lane + 32 i, strided as the CPU's 16 lanes are. (Four adjacent dims a
    // lane, read as float4s, gained little and moved the whole-model logits of
    // `whole_model_matches_the_cpu` from the CPU's: mean 1.8e-2 -> 2.7e-2.)
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
    for (long kb = k0; kb < k1; kb += KT) {
        int nk = (int)(k1 - kb < KT ? k1 - kb : KT);
        __syncthreads();
        if ((int)threadIdx.x < nk) src[threadIdx.x] = key_row(a, s, p, nwin, kb + threadIdx.x, t, &kv_row[threadIdx.x]);
        __syncthreads();
        // One warp a key: its e4m3 codes four at a time (all of a lane's loads issued first)
        // times their block's scale, its RoPE dims as stored; a row of this call from `kv`.
        for (int k = warp; k < nk; k += nwarps) {
            const u8* r = src[k];
            float* dst = keys[k];
            if (!r) {
                for (int d = lane; d < a.dh; d += 32) dst[d] = a.kv[kv_row[k] * a.dh + d];
                continue;
            }
            int nq = a.row.nope / 4;
            u32 w[4], sb[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int j = lane + 32 * u;
                if (j < nq) {
                    w[u] = ((const u32*)r)[j];
                    sb[u] = r[a.row.s_off + j / 16];
                }
            }
            const float* rp = (const float*)(r + a.row.r_off);
            for (int d = lane; d < a.dh - a.row.nope; d += 32) dst[a.row.nope + d] = rp[d];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int j = lane + 32 * u;
                if (j < nq) {
                    float sc = e8m0(sb[u]);
                    ((float4*)dst)[j] = make_float4(e4m3(w[u] & 0xff) * sc, e4m3((w[u] >> 8) & 0xff) * sc,
                                                    e4m3((w[u] >> 16) & 0xff) * sc, e4m3(w[u] >> 24) * sc);
                }
            }
        }
        __syncthreads();
        // All the chunk's scores first (independent sums, so their shuffles overlap), then
        // one rescaling of the running results.
        float sc[KT];
#pragma unroll
        for (int k = 0; k < KT; k++) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL_MAX; i++)
                if (i < dpl) d = fmaf(qv[i], keys[k][lane + 32 * i], d);
            sc[k] = d;
        }
        float mn = m;
#pragma unroll
        for (int k = 0; k < KT; k++) {
            sc[k] = k < nk ? warp_sum(sc[k]) * a.scale : NEG_INF;
            mn = fmaxf(mn, sc[k]);
        }
        float alpha = expf(m - mn);
        l *= alpha;
#pragma unroll
        for (int i = 0; i < DPL_MAX; i++) o[i] *= alpha;
#pragma unroll
        for (int k = 0; k < KT; k++) {
            if (k >= nk) break;
            float pr = expf(sc[k] - mn);
            l += pr;
#pragma unroll
            for (int i = 0; i < DPL_MAX; i++)
                if (i < dpl) o[i] = fmaf(pr, keys[k][lane + 32 * i], o[i]);
        }
        m = mn;
    }
    long base = ((long)blockIdx.x * a.H + (live ? h : 0)) * a.S;
    if (live) {
#pragma unroll
        for (int i = 0; i < DPL_MAX; i++)
            if (i < dpl) a.oo[(base + blockIdx.z) * a.dh + lane + 32 * i] = o[i];
        if (lane == 0) {
            a.om[base + blockIdx.z] = m;
            a.ol[base + blockIdx.z] = l;
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* c = a.done + (long)blockIdx.x * gridDim.y + blockIdx.y;
        last = atomicAdd(c, 1u) == gridDim.z - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last || !live) return;
    __threadfence();
    // The join: each slice's weight exp(m_i - max) (0 for an empty slice, whose values are
    // 0), kept in shared memory so that the loads of the slices' values do not wait on them;
    // the sink in the denominator.
    float* wt = &keys[0][0] + warp * 128;
    float mx = NEG_INF;
    for (int i = lane; i < splits; i += 32) mx = fmaxf(mx, __ldcg(a.om + base + i));
    mx = warp_max(mx);
    float den = 0.0f;
    for (int i = lane; i < splits; i += 32) {
        float mi = __ldcg(a.om + base + i);
        float wi = mi > NEG_INF ? expf(mi - mx) : 0.0f;
        if (mi > NEG_INF) den += __ldcg(a.ol + base + i) * wi;
        wt[i] = wi;
    }
    __syncwarp();
    den = warp_sum(den) + expf(a.sink[h] - mx);
    float acc[DPL_MAX];
#pragma unroll
    for (int i = 0; i < DPL_MAX; i++) acc[i] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < splits; j++) {
        float wj = wt[j];
        const float* oj = a.oo + (base + j) * a.dh + lane;
#pragma unroll
        for (int i = 0; i < DPL_MAX; i++)
            if (i < dpl) acc[i] = fmaf(__ldcg(oj + 32 * i), wj, acc[i]);
    }
    float* y = a.out + ((long)blockIdx.x * a.H + h) * a.dh + lane;
#pragma unroll
    for (int i = 0; i < DPL_MAX; i++)
        if (i < dpl) y[32 * i] = acc[i] / den;
}

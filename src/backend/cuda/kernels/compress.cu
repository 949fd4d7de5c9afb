// The KV compressors. A block of `c` tokens becomes one entry; with c = 4 the projections are 2d
// wide and entry b pools the first halves of block b-1 with the second halves of block b. Rows
// of a block come from the batch (positions from the chunk on), from the state's pending rows
// (the block in progress when the chunk started) or from its previous block's overlap halves.

struct CompressArgs {
    const float* kv;     // [T, width] projections of the batch
    const float* score;  // [T, width]
    const float* ape;    // [c, width]
    const float* norm;   // [d]
    const float* freqs;  // rope frequencies
    int c, d, width, overlap, half;
    float eps, hs;       // norm epsilon, Hadamard scale (index rows)
    long pend_kv, pend_score, prev_kv, prev_score;  // byte offsets in the fixed region
    long table;          // byte offset of this compressor's page table
    RowFmt row;
};

// Row q (dims `off + j`) of the block being pooled: its projection and its score (ape added).
__device__ __forceinline__ float2 comp_row(const CompressArgs& a, const SeqDesc& s, long q, int off,
                                           int j) {
    const u8* fixed = (const u8*)s.fixed;
    int slot = q % a.c;
    if (q >= s.pos) {
        long t = s.start + (q - s.pos);
        long i = t * a.width + off + j;
        return make_float2(a.kv[i], a.score[i] + a.ape[slot * a.width + off + j]);
    }
    if (q / a.c == s.pos / a.c) {
        long i = (long)slot * a.width + off + j;
        return make_float2(((const float*)(fixed + a.pend_kv))[i], ((const float*)(fixed + a.pend_score))[i]);
    }
    long i = (long)slot * a.d + j;
    return make_float2(((const float*)(fixed + a.prev_kv))[i], ((const float*)(fixed + a.prev_score))[i]);
}

// One block a (sequence, entry) job, one thread a dim (blockDim.x = d). A job whose sequence is
// 0xffffffff is a vacancy: a recorded decode step launches one block for each sequence.
extern "C" __global__ void compress_emit(const u32* jobs, const SeqDesc* descs, CompressArgs a) {
    pdl_wait();
    __shared__ float sh[32];
    extern __shared__ float v[];
    if (jobs[2 * blockIdx.x] == 0xffffffffu) return;
    const SeqDesc s = descs[jobs[2 * blockIdx.x]];
    long b = jobs[2 * blockIdx.x + 1];
    int j = threadIdx.x;
    long lo = (a.overlap && b > 0) ? (b - 1) * a.c : b * a.c, hi = (b + 1) * a.c;
    float m = NEG_INF;
    for (long q = lo; q < hi; q++) {
        int off = (a.overlap && q >= b * a.c) ? a.d : 0;
        m = fmaxf(m, comp_row(a, s, q, off, j).y);
    }
    float sum = 0.0f, acc = 0.0f;
    for (long q = lo; q < hi; q++) {
        int off = (a.overlap && q >= b * a.c) ? a.d : 0;
        float2 r = comp_row(a, s, q, off, j);
        float e = expf(r.y - m);
        sum += e;
        acc += e * r.x;
    }
    float x = acc / sum;
    float ss = block_sum(x * x, sh);
    v[j] = a.norm[j] * (x * (1.0f / sqrtf(ss / (float)a.d + a.eps)));
    __syncthreads();
    if (j < a.half) {
        float* h = v;
        float p = (float)(b * a.c);
        float ang = p * a.freqs[j];
        float cs, sn;
        rope_sincos(ang, &sn, &cs);
        float* pr = h + a.d - 2 * a.half + 2 * j;
        float x0 = pr[0], x1 = pr[1];
        pr[0] = x0 * cs - x1 * sn;
        pr[1] = x0 * sn + x1 * cs;
    }
    __syncthreads();
    if (a.row.kind == 1) {
        for (int h = 1; h < a.d; h *= 2) {
            float p = v[j], q = v[j ^ h];
            __syncthreads();
            v[j] = (j & h) ? q - p : p + q;
            __syncthreads();
        }
        v[j] *= a.hs;
        __syncthreads();
    }
    encode_row(v, paged_row(s.tables, a.table, b, a.row.bytes), a.row, 0);
}

// After compress_emit: the overlap halves of the last finished block and the rows of the block in
// progress move into the state (one block a sequence).
extern "C" __global__ void compress_carry(const SeqDesc* descs, CompressArgs a) {
    pdl_wait();
    const SeqDesc s = descs[blockIdx.x];
    u8* fixed = (u8*)s.fixed;
    long p0 = s.pos, p1 = (long)s.pos + s.len;
    long k0 = p0 / a.c, k1 = p1 / a.c;
    if (a.overlap && k1 > k0) {
        for (long i = threadIdx.x; i < (long)a.c * a.d; i += blockDim.x) {
            long q = (k1 - 1) * a.c + i / a.d;
            int j = i % a.d;
            float2 r = comp_row(a, s, q, 0, j);
            ((float*)(fixed + a.prev_kv))[(q % a.c) * a.d + j] = r.x;
            ((float*)(fixed + a.prev_score))[(q % a.c) * a.d + j] = r.y;
        }
    }
    __syncthreads();
    // The call's positions in the unfinished block (a decode step: its one token), not the
    // block's c rows (128 for HCA: 65,536 values to skip).
    long q0 = k1 * a.c > p0 ? k1 * a.c : p0;
    for (long i = threadIdx.x; i < (p1 - q0) * a.width; i += blockDim.x) {
        long q = q0 + i / a.width;
        int w = i % a.width;
        long t = s.start + (q - p0);
        ((float*)(fixed + a.pend_kv))[(q % a.c) * a.width + w] = a.kv[t * a.width + w];
        ((float*)(fixed + a.pend_score))[(q % a.c) * a.width + w] =
            a.score[t * a.width + w] + a.ape[(q % a.c) * a.width + w];
    }
}

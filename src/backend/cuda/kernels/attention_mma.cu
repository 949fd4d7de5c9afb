// Sparse attention on tensor cores: attention.cu's slices, each slice's scores and weighted
// values computed by bf16 MMAs whose every product is exact, then the slices joined by a launch
// of their own.
//
// A block takes one token, up to 16 heads (`hpb`: the MMA's 16 rows, those past them zero) and
// one or more slices of the token's keys, 16 keys a chunk. Key values are e4m3 codes times power-of-two scales (exact in bf16) and f32 RoPE dims;
// queries and probabilities are f32. Each f32 operand is split into three bf16 parts that add up
// to it exactly (split_act's split), so each MMA product is exact in f32 and the sums differ
// from the CPU's only in their order. The first parts' products go to one accumulator and all
// the others to a second, added at the end: a single accumulator would align the small terms to
// the large ones and drop their low bits (as `wo_a`'s planes would).
//
// Warp w takes a quarter of the dims for its share of every score (the four shares are added in
// warp order through shared memory), and every fourth step of 16 dims (w, w + 4, ...) for the
// weighted values: a dim's weighted sum is the same whichever warp computes it, and so each
// warp holds a quarter of the RoPE dims, whose products take three times the MMAs. The scores
// keep their quarters, the last warp's taking twice the others' MMAs: dealt in steps, their
// sums' order, and so the logits, would change (docs/cuda.md). Every warp keeps the same
// running max and sum of each head, computed from the same scores in the same order.
//
// Shapes: 64 RoPE dims of a head dividing 512, so that the other dims are a multiple of 64 (each
// warp then has nope / 64 non-RoPE steps and one RoPE step), up to 448.

#define TC_HEADS 16
#define TC_KEYS 16
#define TC_KEYS_PER_SPLIT 32
#define TC_NT_NOPE 14  // 8-dim MMA tiles of a warp's non-RoPE dims: 2 for every 64 of them, up to 448
#define TC_JOIN_AHEAD 4  // slices a warp of the join loads before the weights are known (of <= 64)

// Shared-memory addresses as 32-bit offsets: generic pointers cost a 64-bit address computation
// (and its conversion) per load, more instructions than the attention's MMAs in its inner loops.
__device__ __forceinline__ void ldsm_x2_trans(u32* r, u32 p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(p));
}

__device__ __forceinline__ u16 bf16_rn(float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// x = p[0] + p[1] + p[2] exactly (8 + 8 + 8 bits of an f32's 24).
__device__ __forceinline__ void split3(float x, u16* p) {
#pragma unroll
    for (int i = 0; i < 3; i++) {
        p[i] = bf16_rn(x);
        x -= __uint_as_float((u32)p[i] << 16);
    }
}

__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// The low and high halves of an f16x2 as f32s.
__device__ __forceinline__ float f16_lo(u32 x) {
    float f;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, l;\n\t}" : "=f"(f) : "r"(x));
    return f;
}
__device__ __forceinline__ float f16_hi(u32 x) {
    float f;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, h;\n\t}" : "=f"(f) : "r"(x));
    return f;
}

// Shared memory of a block: three planes of the block's queries and a plane of 16 keys (every
// non-RoPE dim exactly, the RoPE dims' first parts), rows of P bf16 values padded by 8 so that
// the eight rows an ldmatrix reads start in different banks; the RoPE dims' second and third
// parts; the warps' shares of the 16 x 16 scores; two chunks' packed key rows as loaded.
struct TcLayout {
    int P, RP;                       // row pitches (bf16 values)
    int q, k, kr, part, raw, bytes;  // byte offsets, total
};

__device__ __forceinline__ TcLayout tc_layout(int dh, int nope, int row_bytes) {
    TcLayout l;
    l.P = dh + 8;
    l.RP = dh - nope + 8;
    l.q = 0;
    l.k = l.q + 3 * TC_HEADS * l.P * 2;
    l.kr = l.k + TC_KEYS * l.P * 2;
    l.part = l.kr + 2 * TC_KEYS * l.RP * 2;
    l.raw = l.part + 4 * TC_HEADS * TC_KEYS * 4;
    l.bytes = l.raw + 2 * TC_KEYS * row_bytes;
    return l;
}

// Where key kk of token t's list is: a row of the state (window, then compressed entries) or,
// for a row of this very call, its packed copy.
__device__ __forceinline__ const u8* key_src(const AttnArgs& a, const SeqDesc& s, long p, int nwin,
                                             long kk, int t) {
    long off;
    const u8* r = key_row(a, s, p, nwin, kk, t, &off);
    return r ? r : a.packed + off * a.row.bytes;
}

#define TC_SRC_MAX 128  // key addresses looked up at once

extern "C" __global__ void __launch_bounds__(128) attend_mma(AttnArgs a) {
    pdl_wait();
    extern __shared__ __align__(16) u8 smem[];
    __shared__ const u8* src[TC_SRC_MAX];
    __shared__ int picked;
    const u32 sm = smem_addr(smem);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    int t = a.t0 + blockIdx.x, h0 = blockIdx.y * a.hpb, dh = a.dh, nope = a.row.nope;
    int rb = a.row.bytes;
    TcLayout L = tc_layout(dh, nope, rb);
    const SeqDesc s = a.descs[a.tok_seq[t]];
    long p = a.tok_pos[t];
    int nwin = (int)(p + 1 < a.window ? p + 1 : a.window);
    // The block takes the token's slices z, z + Z, ... (Z = gridDim.z: a decode step's few
    // tokens a block a slice, a prefill's many tokens several slices a block, so that their
    // queries are split once), one chunk of 16 keys after another: chunk c is the (c % cps)-th
    // of slice z + (c / cps) Z. Only the token's last slice can be shorter than `per`.
    long total, per, nsl;
    token_slices(a, t, p, nwin, TC_KEYS_PER_SPLIT, &picked, &total, &per, &nsl);
    int cps = (int)(per / TC_KEYS);
    auto chunk_at = [&](int c, long* sl, long* kb) {
        *sl = blockIdx.z + (long)(c / cps) * gridDim.z;
        *kb = *sl * per + (long)(c % cps) * TC_KEYS;
        return *sl < nsl && *kb < total;
    };

    // The block's threads walk the chunk's keys by items, one a thread and the next a block's
    // width on, so that every thread has as much to do: 16-byte pieces of the raw rows
    // (copying), groups of 16 non-RoPE dims and of 4 RoPE dims (converting).
    int cpr = rb / 16, nq = nope / 16, rq = (dh - nope) / 4;
    WalkStep cpw = walk_step(cpr), nqw = walk_step(nq), rqw = walk_step(rq);
    // Chunk c's packed rows into raw buffer c % 2 (the addresses of up to TC_SRC_MAX keys of a
    // slice looked up together, one a thread).
    auto fetch = [&](int c, long sl, long kb) {
        long k0 = sl * per, k1 = k0 + per < total ? k0 + per : total;
        if ((kb - k0) % TC_SRC_MAX == 0) {
            __syncthreads();
            if (kb + tid < k1 && tid < TC_SRC_MAX) src[tid] = key_src(a, s, p, nwin, kb + tid, t);
            __syncthreads();
        }
        int nk = (int)(k1 - kb < TC_KEYS ? k1 - kb : TC_KEYS), sb = (int)((kb - k0) % TC_SRC_MAX);
        u32 dst = sm + L.raw + (c & 1) * TC_KEYS * rb;
        Walk w = walk_start(cpr);
        for (; w.row < nk; walk_next(w, cpw))
            cp_async16(dst + w.row * rb + 16 * w.col, src[sb + w.row] + 16 * w.col, true);
    };
    {
        long sl, kb;
        if (chunk_at(0, &sl, &kb)) fetch(0, sl, kb);
    }
    cp_commit();

    // A thread splits four dims (d4) of the query rows r0, r0 + rstep, ... (dh divides 512, so
    // that 128 threads cover whole rows).
    int per_row = dh / 4, d4 = 4 * (tid % per_row), r0 = tid / per_row, rstep = blockDim.x / per_row;
    // The queries' three planes (zero rows past the block's heads), all loads in flight first.
    {
        float4 v[TC_HEADS];
#pragma unroll
        for (int u = 0; u < TC_HEADS; u++) {
            int hh = r0 + u * rstep;
            v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (hh < a.hpb && h0 + hh < a.H) v[u] = *(const float4*)(a.q + ((long)t * a.H + h0 + hh) * dh + d4);
        }
#pragma unroll
        for (int u = 0; u < TC_HEADS; u++) {
            int hh = r0 + u * rstep;
            if (hh >= TC_HEADS) break;
            float f[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
            u16 pp[4][3] = {};
            if (hh < a.hpb)
#pragma unroll
                for (int j = 0; j < 4; j++) split3(f[j], pp[j]);
#pragma unroll
            for (int j = 0; j < 3; j++)
                *(uint2*)(smem + L.q + 2 * ((j * TC_HEADS + hh) * L.P + d4)) =
                    make_uint2(pack2(pp[0][j], pp[1][j]), pack2(pp[2][j], pp[3][j]));
        }
    }

    // The warp's scores: dims [d0w, d0w + dq), its non-RoPE ones ending at dn. Its weighted
    // values: non-RoPE tile j < ntn of 8 dims in step warp + 4 (j / 2) of 16, and the two tiles
    // of RoPE step rst.
    int dq = dh / 4, d0w = warp * dq;
    int dn = d0w + dq < nope ? d0w + dq : (nope > d0w ? nope : d0w);
    int ntn = nope / 32, rst = warp + nope / 16;
    float oh[TC_NT_NOPE][4], ol[TC_NT_NOPE][4], rh[2][4], rl[2][4];
    float m[2], l[2];  // heads g and g + 8
    // A slice starts from nothing.
    auto reset = [&]() {
#pragma unroll
        for (int c = 0; c < 4; c++) {
#pragma unroll
            for (int j = 0; j < TC_NT_NOPE; j++) oh[j][c] = ol[j][c] = 0.0f;
#pragma unroll
            for (int j = 0; j < 2; j++) rh[j][c] = rl[j][c] = 0.0f;
        }
        m[0] = m[1] = NEG_INF;
        l[0] = l[1] = 0.0f;
    };
    reset();
    float* part = (float*)(smem + L.part);

    // Slot j's maximum and sum of heads g and g + 8 (by lanes tq = 0 of warp 0).
    long tb = (long)blockIdx.x * a.H;
    auto store_ml = [&](long j, const float* mv, const float* lv) {
        if (warp != 0 || tq != 0) return;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int hh = g + 8 * r, h = h0 + hh;
            if (hh < a.hpb && h < a.H) {
                a.om[(tb + h) * a.S + j] = mv[r];
                a.ol[(tb + h) * a.S + j] = lv[r];
            }
        }
    };
    long sl, kb;
    for (int c = 0; chunk_at(c, &sl, &kb); c++) {
        long k1 = sl * per + per < total ? sl * per + per : total;
        int nk = (int)(k1 - kb < TC_KEYS ? k1 - kb : TC_KEYS);
        // Chunk c has landed, and every warp is done with the previous chunk's planes and
        // raw buffer; chunk c + 1 loads while this one is computed.
        cp_wait<0>();
        __syncthreads();
        {
            long sl1, kb1;
            if (chunk_at(c + 1, &sl1, &kb1)) fetch(c + 1, sl1, kb1);
        }
        cp_commit();
        // The chunk's keys as bf16 parts: 16 non-RoPE dims (one scale block's) or 4 RoPE dims
        // an item; rows past nk zero.
        const u8* raw = smem + L.raw + (c & 1) * TC_KEYS * rb;
        for (Walk w = walk_start(nq); w.row < TC_KEYS; walk_next(w, nqw)) {
            int kk = w.row, d = 16 * w.col;
            u32 o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (kk < nk) {
                const u8* r = raw + kk * rb;
                float sc = e8m0(r[a.row.s_off + d / 64]);
                uint4 q4 = *(const uint4*)(r + d);
                u32 cw[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    u32 lo, hi;
                    e4m3x4_f16(cw[i], lo, hi);
                    // Each value exact in bf16: its upper half.
                    o[2 * i] = __byte_perm(__float_as_uint(f16_lo(lo) * sc), __float_as_uint(f16_hi(lo) * sc), 0x7632);
                    o[2 * i + 1] = __byte_perm(__float_as_uint(f16_lo(hi) * sc), __float_as_uint(f16_hi(hi) * sc), 0x7632);
                }
            }
            uint4* dst = (uint4*)(smem + L.k + 2 * (kk * L.P + d));
            dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
            dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
        }
        for (Walk w = walk_start(rq); w.row < TC_KEYS; walk_next(w, rqw)) {
            int kk = w.row, d4 = nope + 4 * w.col;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (kk < nk) v = *(const float4*)(raw + kk * rb + a.row.r_off + 4 * (d4 - nope));
            float f[4] = {v.x, v.y, v.z, v.w};
            u16 pp[4][3];
#pragma unroll
            for (int j = 0; j < 4; j++) split3(f[j], pp[j]);
            *(uint2*)(smem + L.k + 2 * (kk * L.P + d4)) = make_uint2(pack2(pp[0][0], pp[1][0]), pack2(pp[2][0], pp[3][0]));
#pragma unroll
            for (int j = 1; j < 3; j++)
                *(uint2*)(smem + L.kr + 2 * (((j - 1) * TC_KEYS + kk) * L.RP + d4 - nope)) =
                    make_uint2(pack2(pp[0][j], pp[1][j]), pack2(pp[2][j], pp[3][j]));
        }
        __syncthreads();

        // The warp's share of the 16 x 16 scores: its quarter of the dims, 16 at a time, the
        // non-RoPE dims (keys exact in one plane) apart from the RoPE dims (three). The query
        // parts' products go to accumulators of their own (no MMA waits for another's sum).
        float sh[2][4], s1[2][4], s2[2][4];
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) sh[n][c] = s1[n][c] = s2[n][c] = 0.0f;
        int key = (lane & 7) + ((lane >> 4) << 3), col = ((lane >> 3) & 1) * 8;
        for (int d = d0w; d < dn; d += 16) {
            u32 A[3][4], B[4];
#pragma unroll
            for (int j = 0; j < 3; j++)
                ldsm_x4(A[j], sm + L.q + 2 * ((j * TC_HEADS + (lane & 15)) * L.P + d + (lane >> 4) * 8));
            ldsm_x4(B, sm + L.k + 2 * (key * L.P + d + col));
#pragma unroll
            for (int n = 0; n < 2; n++) {
                mma16816_bf16(sh[n], A[0][0], A[0][1], A[0][2], A[0][3], B[2 * n], B[2 * n + 1]);
                mma16816_bf16(s1[n], A[1][0], A[1][1], A[1][2], A[1][3], B[2 * n], B[2 * n + 1]);
                mma16816_bf16(s2[n], A[2][0], A[2][1], A[2][2], A[2][3], B[2 * n], B[2 * n + 1]);
            }
        }
        for (int d = dn; d < d0w + dq; d += 16) {
            u32 A[3][4], B[3][4];
#pragma unroll
            for (int j = 0; j < 3; j++)
                ldsm_x4(A[j], sm + L.q + 2 * ((j * TC_HEADS + (lane & 15)) * L.P + d + (lane >> 4) * 8));
            ldsm_x4(B[0], sm + L.k + 2 * (key * L.P + d + col));
#pragma unroll
            for (int j = 1; j < 3; j++)
                ldsm_x4(B[j], sm + L.kr + 2 * (((j - 1) * TC_KEYS + key) * L.RP + d - nope + col));
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int qp = 0; qp < 3; qp++)
#pragma unroll
                    for (int kp = 0; kp < 3; kp++) {
                        float* c = qp == 0 && kp == 0 ? sh[n] : (qp == 2 ? s2[n] : s1[n]);
                        mma16816_bf16(c, A[qp][0], A[qp][1], A[qp][2], A[qp][3], B[kp][2 * n], B[kp][2 * n + 1]);
                    }
        }
        // C layout: c0 (head g, key 2tq), c1 (g, 2tq + 1), c2 (g + 8, 2tq), c3 (g + 8, 2tq + 1).
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                part[(warp * TC_HEADS + g + 8 * (c >> 1)) * TC_KEYS + 8 * n + 2 * tq + (c & 1)] = sh[n][c] + (s1[n][c] + s2[n][c]);
        __syncthreads();

        // Every warp: the scores in the same C layout, the running max and sum, and the
        // probabilities as the A operand of the weighted values (three parts).
        float sc[2][4];
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int hh = g + 8 * (c >> 1), kk = 8 * n + 2 * tq + (c & 1);
                float v = part[hh * TC_KEYS + kk];
#pragma unroll
                for (int w = 1; w < 4; w++) v += part[(w * TC_HEADS + hh) * TC_KEYS + kk];
                sc[n][c] = kk < nk ? v * a.scale : NEG_INF;
            }
        float alpha[2];
        u32 P[3][4];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = fmaxf(fmaxf(sc[0][2 * r], sc[0][2 * r + 1]), fmaxf(sc[1][2 * r], sc[1][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float mn = fmaxf(m[r], mx);
            alpha[r] = expf(m[r] - mn);
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int c = 2 * r; c < 2 * r + 2; c++) {
                    sc[n][c] = expf(sc[n][c] - mn);
                    sum += sc[n][c];
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[r] = l[r] * alpha[r] + sum;
            m[r] = mn;
        }
        // A fragment: a0 (head g, keys 2tq..+1), a1 (g + 8, same), a2 (g, 8 + 2tq..), a3 (g + 8).
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u16 x[3], y[3];
            split3(sc[i >> 1][2 * (i & 1)], x);
            split3(sc[i >> 1][2 * (i & 1) + 1], y);
#pragma unroll
            for (int j = 0; j < 3; j++) P[j][i] = pack2(x[j], y[j]);
        }
        // Once the running max settles (most chunks of a long list), every alpha is 1.
        if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f))
#pragma unroll
            for (int c = 0; c < 4; c++) {
#pragma unroll
                for (int j = 0; j < TC_NT_NOPE; j++) {
                    oh[j][c] *= alpha[c >> 1];
                    ol[j][c] *= alpha[c >> 1];
                }
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    rh[j][c] *= alpha[c >> 1];
                    rl[j][c] *= alpha[c >> 1];
                }
            }
        // The weighted values of the warp's dims: its non-RoPE tiles (keys exact in one plane),
        // all fragments loaded, then each plane's MMAs over every tile, so that no MMA waits on
        // the one before it (each accumulator still adds its products in the same order); then
        // its RoPE step (three planes).
        {
            u32 B[TC_NT_NOPE][2];
#pragma unroll
            for (int j = 0; j < TC_NT_NOPE; j++) {
                int jj = j < ntn ? j : 0;  // past the warp's tiles: any row of the plane
                ldsm_x2_trans(B[j], sm + L.k + 2 * ((lane & 15) * L.P + 16 * (warp + 4 * (jj >> 1)) + 8 * (jj & 1)));
            }
#pragma unroll
            for (int j = 0; j < TC_NT_NOPE; j++)
                if (j < ntn) mma16816_bf16(oh[j], P[0][0], P[0][1], P[0][2], P[0][3], B[j][0], B[j][1]);
#pragma unroll
            for (int p = 1; p < 3; p++)
#pragma unroll
                for (int j = 0; j < TC_NT_NOPE; j++)
                    if (j < ntn) mma16816_bf16(ol[j], P[p][0], P[p][1], P[p][2], P[p][3], B[j][0], B[j][1]);
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int d = 16 * rst + 8 * j;
            u32 B[3][2];
            ldsm_x2_trans(B[0], sm + L.k + 2 * ((lane & 15) * L.P + d));
#pragma unroll
            for (int kp = 1; kp < 3; kp++)
                ldsm_x2_trans(B[kp], sm + L.kr + 2 * (((kp - 1) * TC_KEYS + (lane & 15)) * L.RP + d - nope));
#pragma unroll
            for (int pp = 0; pp < 3; pp++)
#pragma unroll
                for (int kp = 0; kp < 3; kp++) {
                    float* c = pp == 0 && kp == 0 ? rh[j] : rl[j];
                    mma16816_bf16(c, P[pp][0], P[pp][1], P[pp][2], P[pp][3], B[kp][0], B[kp][1]);
                }
        }
        if (kb + TC_KEYS < k1) continue;
        // The slice's results: values of the warp's dims, max and sum of each head; then the
        // next slice starts afresh.
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int hh = g + 8 * (c >> 1), h = h0 + hh;
            if (hh >= a.hpb || h >= a.H) continue;
            float* o = a.oo + ((tb + h) * a.S + sl) * dh + 2 * tq + (c & 1);
#pragma unroll
            for (int j = 0; j < TC_NT_NOPE; j++)
                if (j < ntn) o[16 * (warp + 4 * (j >> 1)) + 8 * (j & 1)] = oh[j][c] + ol[j][c];
#pragma unroll
            for (int j = 0; j < 2; j++) o[16 * rst + 8 * j] = rh[j][c] + rl[j][c];
        }
        store_ml(sl, m, l);
        reset();
    }
    // The block's slots past the token's slices: empty (the join skips them). The loop ended
    // at a slice past them, or within the token's last (short) slice.
    const float none_m[2] = {NEG_INF, NEG_INF}, none_l[2] = {0.0f, 0.0f};
    for (long j = sl < nsl ? sl + gridDim.z : sl; j < a.S; j += gridDim.z) store_ml(j, none_m, none_l);
}

// The join of a token's slices for one head and 128 of its dims (grid: tokens, heads, dh / 128;
// 128 threads): out = sum_j w_j o_j / (sum_j w_j l_j + exp(sink - max)), w_j = exp(m_j - max),
// over all S slices of the launch, those past the token's own (empty: m = -inf) skipped. Warp
// w sums the slices j = w mod 4 in order (a lane four dims), and the four sums are added in
// warp order, so a token's result does not depend on S, that is on its batch. Then, as the
// launches after it would: each head's output rotated back (`freqs`), its three bf16 planes for
// the output projection (`planes`, split_act's), and, where the launch has all of the call's
// tokens (`store`), token t's row into its window by block (t, 0, 0): every query has read the
// window by now.
extern "C" __global__ void __launch_bounds__(128) attend_join(AttnArgs a) {
    pdl_wait();
    if (a.store && blockIdx.y == 0 && blockIdx.z == 0)
        store_window_row(a.packed, a.tok_seq, a.tok_pos, a.descs, a.win_off, a.window, a.row.bytes,
                         a.t0 + blockIdx.x);
    __shared__ float wt[128];
    __shared__ float4 part[3][32];
    __shared__ float sh[32];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, h = blockIdx.y;
    long base = ((long)blockIdx.x * a.H + h) * a.S;
    // The first loads at once: thread j's slice max and sum, and the values of its warp's first
    // TC_JOIN_AHEAD slices, whose weights come after. (All 16 slices ahead took 92 registers
    // and 5 blocks an SM, which a prefill's thousands of blocks felt; decode's few did not.)
    int d = blockIdx.z * 128 + 4 * lane;
    bool live = d < a.dh;
    float mj = tid < a.S ? a.om[base + tid] : NEG_INF;
    float lj = tid < a.S ? a.ol[base + tid] : 0.0f;
    const float* oo = a.oo + base * a.dh + d;
    float4 ov[TC_JOIN_AHEAD];
#pragma unroll
    for (int i = 0; i < TC_JOIN_AHEAD; i++)
        if (live && warp + 4 * i < a.S) ov[i] = *(const float4*)(oo + (long)(warp + 4 * i) * a.dh);
    float mx = block_max(mj, sh);
    float wj = mj > NEG_INF ? expf(mj - mx) : 0.0f;
    if (tid < a.S) wt[tid] = wj;
    float den = block_sum(mj > NEG_INF ? lj * wj : 0.0f, sh) + expf(a.sink[h] - mx);
    // Slices j = warp, warp + 4, ... in order; an empty slice (weight 0) is skipped, its values
    // never written.
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    auto add = [&](float4 o, float w) {
        if (w == 0.0f) return;
        acc.x = fmaf(o.x, w, acc.x);
        acc.y = fmaf(o.y, w, acc.y);
        acc.z = fmaf(o.z, w, acc.z);
        acc.w = fmaf(o.w, w, acc.w);
    };
    if (live) {
#pragma unroll
        for (int i = 0; i < TC_JOIN_AHEAD; i++)
            if (warp + 4 * i < a.S) add(ov[i], wt[warp + 4 * i]);
#pragma unroll 4
        for (int j = warp + 4 * TC_JOIN_AHEAD; j < a.S; j += 4) add(*(const float4*)(oo + (long)j * a.dh), wt[j]);
    }
    if (warp > 0) part[warp - 1][lane] = acc;
    __syncthreads();
    if (warp > 0 || !live) return;
#pragma unroll
    for (int w = 0; w < 3; w++) {
        float4 o = part[w][lane];
        acc.x += o.x;
        acc.y += o.y;
        acc.z += o.z;
        acc.w += o.w;
    }
    float o[4] = {acc.x / den, acc.y / den, acc.z / den, acc.w / den};
    int r0 = a.dh - 2 * a.half;
    if (a.freqs && d >= r0) {
        float p = (float)a.tok_pos[a.t0 + blockIdx.x];
        int i = (d - r0) >> 1;
        rotate_pair(o[0], o[1], p, a.freqs[i], 1);
        rotate_pair(o[2], o[3], p, a.freqs[i + 1], 1);
    }
    *(float4*)(a.out + ((long)blockIdx.x * a.H + h) * a.dh + d) = make_float4(o[0], o[1], o[2], o[3]);
    if (!a.planes) return;
    long e = ((long)(a.t0 + blockIdx.x) * a.H + h) * a.dh + d;
#pragma unroll
    for (int p = 0; p < 3; p++) {
        u32 hb[4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
            u16 v;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(o[c]));
            hb[c] = v;
            o[c] -= __uint_as_float((u32)v << 16);
        }
        *(uint2*)(a.planes + p * a.plane_n + e) = make_uint2(hb[0] | (hb[1] << 16), hb[2] | (hb[3] << 16));
    }
}

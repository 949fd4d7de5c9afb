// How fast do the one-token expert passes' access patterns read HBM, without their arithmetic?
// Six experts' up projections (w1 and w3, 2048 x 4096 FP4 each: 48 MiB and their scales), read
// by 768 blocks of two warps, each warp a tile of 16 rows and half of k through a four-stage
// cp.async ring, as `mma_experts_up_f4_x1` does; cold (each launch reads its own region of a
// 4 GiB buffer). Layouts and hints:
//   rows     the checkpoint's layout: a step takes 64 bytes of each of 16 rows (2 KiB apart)
//   rows256  the same with cp.async's L2::256B prefetch-size hint
//   rows128  the same with L2::128B
//   tiled    each tile's step stored contiguously (1 KiB of codes and 64 bytes of scales)
//   stream   a plain grid-stride read of the same bytes (the limit for one launch)
// Built and run on the GPU machine by `tools/device/run.sh pattern`.
#include <cstdio>
#include <cuda_runtime.h>

typedef unsigned int u32;
typedef unsigned char u8;

enum { ROWS = 0, ROWS256 = 1, ROWS128 = 2, TILED = 3 };

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

template <int MODE>
__device__ __forceinline__ void cp16(u32 dst, const void* src) {
    if (MODE == ROWS256)
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src));
    else if (MODE == ROWS128)
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(dst), "l"(src));
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp4(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}

const int ROWS_N = 2048, ROW_B = 2048, SC_B = 128, STEPS = 16, STAGES = 4, STEP_B = 16 * 80 + 64;
const long WEIGHT_B = (long)ROWS_N * ROW_B, SCALES_B = (long)ROWS_N * SC_B, EXPERT_B = 2 * (WEIGHT_B + SCALES_B);

// grid: 6 experts x 128 tiles; block: 2 warps, warp w takes steps [16w, 16w + 16) of 32.
template <int MODE>
__global__ void up_pattern(const u8* base, u32* sink) {
    extern __shared__ __align__(16) u8 ring[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int e = blockIdx.x / 128, tile = blockIdx.x % 128;
    u8* my = ring + warp * STAGES * 2 * STEP_B;
    u32 acc = 0;
    const u8* wt[2];
    const u8* st[2];
    for (int w = 0; w < 2; w++) {
        wt[w] = base + e * EXPERT_B + w * (WEIGHT_B + SCALES_B);
        st[w] = wt[w] + WEIGHT_B;
    }
    auto issue = [&](int step, int stage) {
        int s = warp * STEPS + step;
        for (int w = 0; w < 2; w++) {
            u32 d = smem_addr(my + (stage * 2 + w) * STEP_B);
            if (MODE == TILED) {
                const u8* p = wt[w] + ((long)tile * 32 + s) * 1024;
                cp16<MODE>(d + 16 * lane, p + 16 * lane);
                cp16<MODE>(d + 512 + 16 * lane, p + 512 + 16 * lane);
                if (lane < 16) cp4(d + 1024 + 4 * lane, st[w] + ((long)tile * 32 + s) * 64 + 4 * lane);
            } else {
                const u8* p = wt[w] + (long)(tile * 16 + g) * ROW_B + 64 * s + 16 * t;
                cp16<MODE>(d + g * 80 + 16 * t, p);
                cp16<MODE>(d + (g + 8) * 80 + 16 * t, p + 8 * ROW_B);
                if (lane < 16) cp4(d + 1280 + 4 * lane, st[w] + (long)(tile * 16 + lane) * SC_B + 4 * s);
            }
        }
    };
    for (int s = 0; s < STAGES - 1; s++) {
        issue(s, s);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    for (int i = 0; i < STEPS; i++) {
        asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2) : "memory");
        __syncwarp();
        if (i + STAGES - 1 < STEPS) issue(i + STAGES - 1, (i + STAGES - 1) % STAGES);
        asm volatile("cp.async.commit_group;" ::: "memory");
        const u8* s = my + (i % STAGES) * 2 * STEP_B;
        for (int w = 0; w < 2; w++) acc ^= *(const u32*)(s + w * STEP_B + 4 * lane) ^ *(const u32*)(s + w * STEP_B + 640 + 4 * lane);
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if (acc == 0x12345678u) *sink = acc;
}

__global__ void stream_read(const uint4* p, long n, u32* sink) {
    u32 acc = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        uint4 v;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

int main() {
    const long MB = 1 << 20, BUF = 4096 * MB, REGION = 6 * EXPERT_B, SLOT = 64 * MB;
    const int LAUNCHES = 40, SMEM = 37 * 1024;
    u8* buf;
    u32* sink;
    if (cudaMalloc(&buf, BUF) != cudaSuccess || cudaMalloc(&sink, 4) != cudaSuccess) return 1;
    cudaMemset(buf, 1, BUF);
    int sms;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaFuncSetAttribute(up_pattern<ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    cudaFuncSetAttribute(up_pattern<ROWS256>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    cudaFuncSetAttribute(up_pattern<ROWS128>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    cudaFuncSetAttribute(up_pattern<TILED>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
    const char* names[] = {"rows", "rows256", "rows128", "tiled", "stream"};
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    int slot = 0;
    for (int rep = 0; rep < 3; rep++)
        for (int m = 0; m < 5; m++) {
            float best = 1e9, sum = 0;
            for (int l = 0; l < LAUNCHES; l++) {
                const u8* p = buf + (long)(slot++ % (BUF / SLOT)) * SLOT;
                cudaEventRecord(a);
                if (m == ROWS) up_pattern<ROWS><<<768, 64, SMEM>>>(p, sink);
                if (m == ROWS256) up_pattern<ROWS256><<<768, 64, SMEM>>>(p, sink);
                if (m == ROWS128) up_pattern<ROWS128><<<768, 64, SMEM>>>(p, sink);
                if (m == TILED) up_pattern<TILED><<<768, 64, SMEM>>>(p, sink);
                if (m == 4) stream_read<<<2 * sms, 512>>>((const uint4*)p, REGION / 16, sink);
                cudaEventRecord(b);
                cudaEventSynchronize(b);
                float ms;
                cudaEventElapsedTime(&ms, a, b);
                best = ms < best ? ms : best;
                sum += ms;
            }
            float mean = sum / LAUNCHES;
            printf("%-8s %6.1f MB: mean %6.2f us (%5.0f GB/s), best %6.2f us (%5.0f GB/s)\n", names[m], REGION / 1e6,
                   1e3 * mean, REGION / (mean * 1e-3) / 1e9, 1e3 * best, REGION / (best * 1e-3) / 1e9);
        }
    printf("%s\n", cudaGetErrorString(cudaGetLastError()));
    return 0;
}

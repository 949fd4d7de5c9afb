// How fast does one launch read a 32 MiB weight: cold, again at once (hot), and after it was
// prefetched into L2 (and what does the prefetching kernel itself cost)? Built and run on the
// GPU machine by `tools/device/run.sh probe`.
#include <cstdio>
#include <cuda_runtime.h>

typedef unsigned long long u64;
typedef unsigned int u32;

__global__ void stream_read(const uint4* p, long n, u32* sink) {
    u32 acc = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        uint4 v;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

__global__ void bulk_prefetch(const char* p, long bytes, int piece) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long q = blockIdx.x * (long)blockDim.x + threadIdx.x; q * piece < bytes; q += stride)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + q * piece), "r"(piece) : "memory");
}

__global__ void line_prefetch(const char* p, long bytes) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long q = blockIdx.x * (long)blockDim.x + threadIdx.x; q * 128 < bytes; q += stride)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + q * 128));
}

__global__ void line_prefetch_last(const char* p, long bytes) {
    long stride = (long)gridDim.x * blockDim.x;
    for (long q = blockIdx.x * (long)blockDim.x + threadIdx.x; q * 128 < bytes; q += stride)
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p + q * 128));
}

__global__ void spin(long ns) {
    u64 t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    for (;;) {
        u64 t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        if (t - t0 > (u64)ns) break;
    }
}

int main() {
    const long MB = 1 << 20, W = 32 * MB, F = 256 * MB;
    char *w, *flush;
    u32* sink;
    cudaMalloc(&w, W);
    cudaMalloc(&flush, F);
    cudaMalloc(&sink, 4);
    cudaMemset(w, 1, W);
    cudaMemset(flush, 2, F);
    int sms;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaEvent_t a, b, c;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventCreate(&c);
    auto read = [&](const char* p, long bytes) { stream_read<<<2 * sms, 512>>>((const uint4*)p, bytes / 16, sink); };
    auto cold = [&]() { read(flush, F); };
    const char* names[] = {"cold", "hot (read twice)", "bulk 4K pieces", "bulk 64K pieces", "line prefetch",
                           "line prefetch evict_last", "bulk 4K, no wait"};
    for (int rep = 0; rep < 3; rep++)
        for (int m = 0; m < 7; m++) {
            cold();
            cudaEventRecord(a);
            if (m == 1) read(w, W);
            if (m == 2 || m == 6) bulk_prefetch<<<sms, 64>>>(w, W, 4096);
            if (m == 3) bulk_prefetch<<<sms, 64>>>(w, W, 65536);
            if (m == 4) line_prefetch<<<sms, 256>>>(w, W);
            if (m == 5) line_prefetch_last<<<sms, 256>>>(w, W);
            cudaEventRecord(b);
            if (m != 0 && m != 6) spin<<<1, 32>>>(30000);
            cudaEventRecord(c);
            read(w, W);
            cudaEvent_t d;
            cudaEventCreate(&d);
            cudaEventRecord(d);
            cudaEventSynchronize(d);
            float pre, rd;
            cudaEventElapsedTime(&pre, a, b);
            cudaEventElapsedTime(&rd, c, d);
            printf("%-28s prefetch kernel %7.2f us, then the 32 MiB read %7.2f us (%6.0f GB/s)\n", names[m], 1e3 * pre,
                   1e3 * rd, W / (rd * 1e-3) / 1e9);
            cudaEventDestroy(d);
        }
    printf("%s\n", cudaGetErrorString(cudaGetLastError()));
    return 0;
}

// A kernel tracer for machines without Nsight Systems: loaded by the CUDA driver into any
// program (CUDA_INJECTION64_PATH=libktrace.so), it records every kernel's start, end, stream
// and name through CUPTI's activity API, graph-replayed kernels included, and writes them as
// CSV to $KTRACE_OUT (default ktrace.csv) when the program exits: the columns
// tools/device/timeline.py reads. Built on the GPU machine by tools/device/run.sh timeline:
//   gcc -O2 -shared -fPIC -DKVER=10 -I/usr/local/cuda/include ktrace.c -L/usr/local/cuda/lib64 -lcupti
// KVER: the newest CUpti_ActivityKernel version the toolkit's CUPTI declares.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_SIZE (8 << 20)
#define KIND_(v) CUpti_ActivityKernel##v
#define KIND(v) KIND_(v)
typedef KIND(KVER) Kernel;

static FILE* out;

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *buffer = (uint8_t*)aligned_alloc(8, BUF_SIZE);
    *size = BUF_SIZE;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size,
                                      size_t valid) {
    CUpti_Activity* r = NULL;
    (void)ctx;
    (void)stream;
    (void)size;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            Kernel* k = (Kernel*)r;
            fprintf(out, "%llu,%llu,%u,%u,%u,%u,%s\n", (unsigned long long)k->start,
                    (unsigned long long)(k->end - k->start), k->streamId, k->gridX, k->gridY,
                    k->blockX, k->name ? k->name : "?");
        }
    }
    free(buffer);
}

static void flush(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}

int InitializeInjection(void) {
    const char* path = getenv("KTRACE_OUT");
    out = fopen(path ? path : "ktrace.csv", "w");
    if (!out) return 0;
    fprintf(out, "Start (ns),Duration (ns),Strm,GrdX,GrdY,BlkX,Name\n");
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    atexit(flush);
    return 1;
}

// When does a kernel launched with programmatic dependent launch start? A chain A -> B -> C
// on one stream, each launched with programmatic stream serialization and each waiting
// (`griddepcontrol.wait`, then `launch_dependents`) before its own work, as hadal's kernels do:
// C's blocks may start once every block of B has passed its wait. This prints, for several
// shapes of B and C, run as plain launches and as a recorded graph (with and without a fork to
// a second stream around B), when C's first block started against B's end (negative: C started
// while B ran), and when B's blocks passed their wait.
//
// Built and run by tools/device/run.sh pdl (nvcc on the GPU machine).
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>
#include <cuda_runtime.h>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e = (x);                                                                   \
        if (e != cudaSuccess) {                                                                \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

typedef unsigned long long u64;

__device__ __forceinline__ u64 now() {
    u64 t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// Slots a kernel's blocks fill: [0] first entry, [1] last pass of the wait, [2] last end.
struct Marks {
    u64 entry, waited, end;
};

__device__ __forceinline__ void pdl() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Each block: records its entry, reads `pre` bytes of `w` (as a linear's weights before its
// wait), waits, spins `ns`, records its end. `sink` keeps the reads.
__global__ void work(Marks* m, const float4* w, int pre, int ns, float* sink) {
    __shared__ float s[32];
    u64 t0 = now();
    if (threadIdx.x == 0) atomicMin(&m->entry, t0);
    float4 acc = make_float4(0, 0, 0, 0);
    const float4* p = w + (long)blockIdx.x * (pre / 16);
    for (int i = threadIdx.x; i < pre / 16; i += blockDim.x) {
        float4 v = p[i];
        acc.x += v.x;
        acc.y += v.y;
    }
    pdl();
    u64 t1 = now();
    if (threadIdx.x == 0) atomicMax(&m->waited, t1);
    while (now() - t1 < (u64)ns) {
    }
    if (threadIdx.x < 32) s[threadIdx.x] = acc.x + acc.y;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (s[0] == 12345.0f) *sink = s[1];
        atomicMax(&m->end, now());
    }
}

struct Shape {
    int blocks, threads, pre, ns, cluster, smem;
};

static void launch(cudaStream_t st, const Shape& s, Marks* m, const float4* w, float* sink, bool pdl) {
    cudaLaunchConfig_t c = {};
    c.gridDim = dim3(s.blocks);
    c.blockDim = dim3(s.threads);
    c.dynamicSmemBytes = s.smem;
    c.stream = st;
    cudaLaunchAttribute a[2];
    int n = 0;
    if (pdl) {
        a[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        a[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    if (s.cluster) {
        a[n].id = cudaLaunchAttributeClusterDimension;
        a[n].val.clusterDim.x = s.cluster;
        a[n].val.clusterDim.y = 1;
        a[n].val.clusterDim.z = 1;
        n++;
    }
    c.attrs = a;
    c.numAttrs = n;
    CK(cudaLaunchKernelEx(&c, work, m, w, s.pre, s.ns, sink));
}

int main() {
    CK(cudaFuncSetAttribute(work, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(work, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    float4* w;
    float* sink;
    Marks* m;
    CK(cudaMalloc(&w, 64 << 20));
    CK(cudaMemset(w, 0, 64 << 20));
    CK(cudaMalloc(&sink, 4));
    CK(cudaMalloc(&m, 4 * sizeof(Marks)));
    cudaStream_t st, side;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    cudaEvent_t fork, join;
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));

    const Shape A = {1, 256, 0, 8000, 0, 0};
    struct Case {
        const char* name;
        Shape b, c;
    } cases[] = {
        {"B 1 block 4us; C 1 block", {1, 256, 0, 4000, 0, 0}, {1, 256, 0, 1000, 0, 0}},
        {"B 1 block 4us; C 256 blocks reading 64 KB before the wait", {1, 256, 0, 4000, 0, 0}, {256, 256, 65536, 1000, 0, 0}},
        {"B 64 blocks reading 64 KB, 4us; C 1 block", {64, 256, 65536, 4000, 0, 0}, {1, 256, 0, 1000, 0, 0}},
        {"B 256 blocks reading 128 KB, 4us; C 1 block", {256, 256, 131072, 4000, 0, 0}, {1, 256, 0, 1000, 0, 0}},
        {"B 16 blocks of 512 in a cluster of 16, 4us; C 64 blocks", {16, 512, 0, 4000, 16, 0}, {64, 256, 65536, 1000, 0, 0}},
        {"B 8 blocks 4us; C 256 blocks", {8, 256, 0, 4000, 0, 0}, {256, 256, 65536, 1000, 0, 0}},
        {"B 132 blocks of 200 KB smem, 4us; C 1 block", {132, 256, 0, 4000, 0, 200 * 1024}, {1, 256, 0, 1000, 0, 0}},
    };
    const char* modes[] = {"stream", "graph", "graph, fork before B", "graph, fork after B", "graph, join before B"};
    for (auto& cs : cases) {
        printf("%s\n", cs.name);
        for (int mode = 0; mode < 5; mode++) {
            std::vector<double> early, waited;
            cudaGraphExec_t exec = nullptr;
            auto chain = [&]() {
                launch(st, A, m + 0, w, sink, true);
                if (mode == 2 || mode == 4) {
                    CK(cudaEventRecord(fork, st));
                    CK(cudaStreamWaitEvent(side, fork));
                    launch(side, {1, 32, 0, mode == 4 ? 2000 : 20000, 0, 0}, m + 3, w, sink, true);
                    if (mode == 4) {
                        CK(cudaEventRecord(join, side));
                        CK(cudaStreamWaitEvent(st, join));
                    }
                }
                launch(st, cs.b, m + 1, w, sink, true);
                if (mode == 3) {
                    CK(cudaEventRecord(fork, st));
                    CK(cudaStreamWaitEvent(side, fork));
                    launch(side, {1, 32, 0, 20000, 0, 0}, m + 3, w, sink, true);
                }
                launch(st, cs.c, m + 2, w, sink, true);
                if (mode == 2 || mode == 3) {
                    CK(cudaEventRecord(join, side));
                    CK(cudaStreamWaitEvent(st, join));
                }
            };
            if (mode > 0) {
                cudaGraph_t g;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
                chain();
                CK(cudaStreamEndCapture(st, &g));
                CK(cudaGraphInstantiateWithFlags(&exec, g, cudaGraphInstantiateFlagUseNodePriority));
                CK(cudaGraphDestroy(g));
            }
            for (int rep = 0; rep < 7; rep++) {
                Marks init[4];
                for (auto& x : init) x = {~0ull, 0, 0};
                CK(cudaMemcpy(m, init, sizeof(init), cudaMemcpyHostToDevice));
                CK(cudaDeviceSynchronize());
                if (exec) CK(cudaGraphLaunch(exec, st));
                else chain();
                CK(cudaStreamSynchronize(st));
                CK(cudaDeviceSynchronize());
                Marks r[4];
                CK(cudaMemcpy(r, m, sizeof(r), cudaMemcpyDeviceToHost));
                if (rep < 2) continue;
                early.push_back(((double)r[2].entry - (double)r[1].end) / 1000.0);
                waited.push_back(((double)r[1].waited - (double)r[0].end) / 1000.0);
            }
            std::sort(early.begin(), early.end());
            std::sort(waited.begin(), waited.end());
            printf("  %-22s C's first block %+7.2f us from B's end (min %+7.2f); B's blocks all past the wait %+6.2f us after A's end\n",
                   modes[mode], early[early.size() / 2], early[0], waited[waited.size() / 2]);
            if (exec) CK(cudaGraphExecDestroy(exec));
        }
    }
    return 0;
}

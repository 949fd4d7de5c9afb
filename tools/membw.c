// How steady a machine's memory bandwidth is: one 2 GiB buffer read over and over on every
// core (OpenMP), each line the best of four passes, as `hadal bench --device cpu` measures
// the bandwidth it quotes ratios to. A shared VM's figure moves from second to second with its
// neighbours' traffic (docs/cpu.md), which one measurement a run cannot show.
//
//     gcc -O2 -fopenmp -march=native tools/membw.c -o /tmp/membw && /tmp/membw [lines]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    int lines = argc > 1 ? atoi(argv[1]) : 12;
    size_t n = (1ul << 31) / 8;
    uint64_t* v = malloc(n * 8);
    if (!v) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) v[i] = i;
    double t0 = now();
    for (int r = 0; r < lines; r++) {
        double best = 0;
        uint64_t s = 0;
        for (int p = 0; p < 4; p++) {
            double t = now();
#pragma omp parallel for reduction(+ : s)
            for (size_t i = 0; i < n; i += 8)
                s += v[i] + v[i + 1] + v[i + 2] + v[i + 3] + v[i + 4] + v[i + 5] + v[i + 6] + v[i + 7];
            double bw = n * 8 / (now() - t);
            if (bw > best) best = bw;
        }
        volatile uint64_t sink = s;  // the sums are used, so the reads stay
        (void)sink;
        printf("%6.1f s  %.1f GB/s\n", now() - t0, best / 1e9);
        fflush(stdout);
    }
    return 0;
}

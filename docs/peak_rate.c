// The multiply-add rate of one core in fp32 (vfmadd231ps: 16 a zmm instruction) and in
// bf16 (vdpbf16ps: 32 bf16 pairs into 16 fp32 sums), each over 12 independent zmm
// accumulators so that the rate, not the latency, is timed. docs/speed.md has the figures.
//   gcc -O2 -mavx512f -o peak_rate docs/peak_rate.c && ./peak_rate     (a CPU with avx512_bf16)
#include <stdio.h>
#include <time.h>

#define ITERS 20000000L
#define ONE(op, acc) op " %%zmm30, %%zmm31, %%zmm" #acc "\n\t"
#define TWELVE(op) ONE(op, 0) ONE(op, 1) ONE(op, 2) ONE(op, 3) ONE(op, 4) ONE(op, 5) \
                   ONE(op, 6) ONE(op, 7) ONE(op, 8) ONE(op, 9) ONE(op, 10) ONE(op, 11)
#define LOOP(op) __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31\n"   \
                                  "1:\n\t" TWELVE(op) "dec %0\n\tjnz 1b"                                     \
                                  : "+r"(n) : : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",       \
                                  "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm30", "xmm31")

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// billions of multiply-adds a second
static double rate(int bf16) {
    long n = ITERS;
    double t = seconds();
    if (bf16)
        LOOP("vdpbf16ps");
    else
        LOOP("vfmadd231ps");
    t = seconds() - t;
    return ITERS * 12.0 * (bf16 ? 32 : 16) / t / 1e9;
}

int main(void) {
    rate(0);  // a warm-up: the first round ran fp32 at about half the rate of the later ones
    for (int round = 0; round < 3; round++) {
        double fp32 = rate(0), bf16 = rate(1);
        printf("one core: fp32 vfmadd231ps %.1f G multiply-adds/s, bf16 vdpbf16ps %.1f G multiply-adds/s, "
               "bf16/fp32 %.2f\n", fp32, bf16, bf16 / fp32);
    }
    return 0;
}

/* Throughput of the two AVX-512 dot instructions a CPU thin-layer conv could be built on:
 * VFMADD (_mm512_fmadd_ps: 16 fp32 multiply-adds) and VDPBF16PS (_mm512_dpbf16_ps: 32 bf16
 * multiplies, pairwise summed into 16 fp32 lanes). 24 independent accumulators, so the loop is
 * bound by throughput, not latency; the two loops alternate, 4 rounds.
 *
 *     gcc -O2 -mavx512f -mavx512bf16 benchmarks/cpu_dot_throughput.c -o /tmp/dot && /tmp/dot
 *
 * Why it is here: a bf16 version of csrc/cpu_conv_thin.cpp pays only if VDPBF16PS sustains more
 * FLOP per cycle than the fp32 FMAs the kernel uses now (benchmarks/RESULTS.md has the figures).
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define ACCUMULATORS 24

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((noinline)) static __m512 fma_loop(long iterations, __m512 a, __m512 b) {
  __m512 acc[ACCUMULATORS];
  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_set1_ps(i * 1e-3f);
  for (long k = 0; k < iterations; k++) {
#pragma GCC unroll 24
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < ACCUMULATORS; i++) sum = _mm512_add_ps(sum, acc[i]);
  return sum;
}

__attribute__((noinline)) static __m512 dpbf16_loop(long iterations, __m512bh a, __m512bh b) {
  __m512 acc[ACCUMULATORS];
  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_set1_ps(i * 1e-3f);
  for (long k = 0; k < iterations; k++) {
#pragma GCC unroll 24
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < ACCUMULATORS; i++) sum = _mm512_add_ps(sum, acc[i]);
  return sum;
}

int main(void) {
  const long iterations = 10000000;
  const double instructions = (double)iterations * ACCUMULATORS;
  const __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  const __m512bh abf = _mm512_cvtne2ps_pbh(a, a), bbf = _mm512_cvtne2ps_pbh(b, b);
  for (int round = 0; round < 4; round++) {
    double t0 = seconds();
    __m512 x = fma_loop(iterations, a, b);
    double t1 = seconds();
    __m512 y = dpbf16_loop(iterations, abf, bbf);
    double t2 = seconds();
    float keep[16];
    _mm512_storeu_ps(keep, _mm512_add_ps(x, y)); /* the results are used: nothing is elided */
    double fma = instructions / (t1 - t0) / 1e9, dp = instructions / (t2 - t1) / 1e9;
    printf("one core: fma %.2f G instr/s = %.0f GFLOP/s | dpbf16 %.2f G instr/s = %.0f GFLOP/s"
           " (checksum %g)\n", fma, fma * 32, dp, dp * 64, keep[0]);
  }
  return 0;
}

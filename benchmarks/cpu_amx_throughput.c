/* Throughput and latency of Intel AMX tile products (TDPBF16PS: C[16][16] float32 += A[16][32]
 * bfloat16 x B[32][16] bfloat16, 8192 multiply-adds) on this CPU, as the AMX kernels
 * (csrc/cpu_conv_amx.cpp, csrc/cpu_head_amx.cpp) use them:
 *   - registers only, four independent accumulators (the throughput bound);
 *   - one dependent chain (the latency);
 *   - two A and two B tile loads (from L1) per four products (the kernels' 2 x 2 order).
 *
 *     gcc -O2 -mamx-tile -mamx-bf16 benchmarks/cpu_amx_throughput.c -o /tmp/amx && /tmp/amx
 *
 * Run two copies at once (taskset -c 0 / -c 1) to see whether the two CPUs share a tile unit.
 * Linux only (the process asks for the tile data state with arch_prctl first).
 * Why it is here: it tells whether a bf16 kernel on this machine is bound by its tile products
 * (benchmarks/RESULTS.md: on the development VM a product took 6.6-16.7 ns, against 16 cycles on
 * the hardware).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct __attribute__((aligned(64))) {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

static uint16_t a_tiles[4][16 * 32] __attribute__((aligned(64)));
static uint16_t b_tiles[64][16 * 32] __attribute__((aligned(64)));

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    fprintf(stderr, "no AMX tile permission (no AMX, or not Linux)\n");
    return 1;
  }
  TileConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; i++) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  const long n = 2000000;
  _tile_loadd(0, a_tiles[0], 64);
  _tile_loadd(1, a_tiles[1], 64);
  _tile_loadd(2, b_tiles[0], 64);
  _tile_loadd(3, b_tiles[1], 64);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  double t = seconds();
  for (long i = 0; i < n; i++) {
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  t = seconds() - t;
  printf("registers only, 4 accumulators: %.2f ns per product, %.0f G multiply-adds/s\n",
         t / (4.0 * n) * 1e9, 4.0 * n * 8192 / t / 1e9);
  t = seconds();
  for (long i = 0; i < n; i++) _tile_dpbf16ps(4, 0, 2);
  t = seconds() - t;
  printf("one dependent chain: %.2f ns per product\n", t / n * 1e9);
  t = seconds();
  for (long i = 0; i < n; i++) {
    const int k = (int)(i & 31);
    _tile_loadd(0, a_tiles[k & 3], 64);
    _tile_loadd(1, a_tiles[(k + 1) & 3], 64);
    _tile_loadd(2, b_tiles[k], 64);
    _tile_loadd(3, b_tiles[k + 1], 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  t = seconds() - t;
  printf("2 x 2 with four tile loads per four products: %.2f ns per product\n",
         t / (4.0 * n) * 1e9);
  _tile_release();
  return 0;
}

// hrnet_fast CPU kernels: what the Intel AMX kernels share (cpu_conv_amx.cpp, cpu_head_amx.cpp):
// whether this build, CPU and OS can run tile instructions, the target attribute of the functions
// that use them, and the tile configuration block.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define HF_AMX_COMPILED 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HF_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#else
#define HF_AMX_COMPILED 0
#endif

namespace hf_amx {

#if HF_AMX_COMPILED
// AMX needs CPU support (CPUID.(7,0):EDX bits 22 AMX-BF16 and 24 AMX-TILE, AVX512-BF16 in
// CPUID.(7,1):EAX bit 5) and, on Linux, this process's permission for the tile data state
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); asked once per process (an inline
// function's static is one object across translation units).
inline bool amx_ready_uncached() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1, avx512f = (b >> 16) & 1;
  if (!(tile && bf16 && avx512f)) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

inline bool amx_ready() {
  static const bool ready = amx_ready_uncached();
  return ready;
}

// The 64-byte operand of LDTILECFG: palette 1, then bytes per row and rows of each tile register.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Every tile register full-size (16 rows of 64 bytes): A 16 x 32 bfloat16, B 16 rows of 16
// bfloat16 pairs, C 16 x 16 float32. The kernels' 2 x 2 tile orders use this configuration.
HF_AMX_TARGET inline void configure_full_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}
#else
inline bool amx_ready() { return false; }
#endif

}  // namespace hf_amx

// The 2 x 2 tile order's registers (tile numbers are immediates in the instructions): A tiles 0
// and 1 (two pixel blocks b), B tiles 2 and 3 (two N tiles j), C tile 4 + 2 b + j;
// stmt(C, A, B) for one (b, j).
#define HF_TILE_PAIR(b, j, stmt)        \
  switch ((b) * 2 + (j)) {              \
    case 0: { stmt(4, 0, 2); break; }   \
    case 1: { stmt(5, 0, 3); break; }   \
    case 2: { stmt(6, 1, 2); break; }   \
    default: { stmt(7, 1, 3); break; }  \
  }

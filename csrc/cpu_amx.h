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
#else
inline bool amx_ready() { return false; }
#endif

}  // namespace hf_amx

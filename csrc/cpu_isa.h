// hrnet_fast CPU kernels: which instruction-set variant runs, shared by the kernels that compile
// per-ISA variants (cpu_fuse.cpp, cpu_conv_thin.cpp, cpu_head_f32.cpp).
#pragma once

#include <ATen/Version.h>  // at::get_cpu_capability

#include <string>

namespace hf_isa {

enum class Isa { Default, Avx2, Avx512 };

// torch's own CPU capability ("AVX512", "AVX2", "DEFAULT", ...; it honours ATEN_CPU_CAPABILITY),
// read once per process.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::Avx512;
    if (cap == "AVX2") return Isa::Avx2;
    return Isa::Default;
  }();
  return isa;
}

}  // namespace hf_isa

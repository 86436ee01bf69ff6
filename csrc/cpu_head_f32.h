// hrnet_fast CPU kernel: what the float32 seg head's instruction-set variants share
// (csrc/cpu_head_f32.cpp: the op, its checks and the AVX-512 variant; csrc/cpu_head_f32_avx2.cpp:
// the AVX2 + FMA variant). Both compute every output value by the same sequence of float32
// operations, so their outputs agree to float32 rounding (bit for bit unless the compiler
// contracts a multiply and an add differently; tests/test_cpu_isa_variants.py compares them on
// an AVX-512 CPU).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu_resize.h"

namespace hf_head {

constexpr int kPx = 8;  // AVX-512 pixels per block: one row of taps, one [kPx][Cm] buffer of h

struct HeadF32 {
  const float* x;  // [N, H, W, Ci]
  int64_t N, H, W, ci;
  const float* wp;  // [Ci][cmp], zero past Cm
  const float* bp;  // [cmp], zero past Cm
  int64_t cm, cmp;  // cmp: Cm rounded up to the variant's vector width
  const float* wc;  // [Cm][cop], zero past Co
  const float* bc;  // [cop], zero past Co
  int64_t co, cop;
  std::vector<hf_resize::Source> sources;
  float* out;  // [N, H, W, Co]
};

// Output rows begin .. end - 1 (item = n * H + y) by the AVX2 variant; the caller checked the CPU.
void head_rows_avx2(const HeadF32& p, int64_t begin, int64_t end);

}  // namespace hf_head

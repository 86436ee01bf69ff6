// hrnet_fast CPU kernels: AVX2 vector edges shared by the AVX2 variants (cpu_conv_thin_avx2.cpp,
// cpu_head_f32_avx2.cpp). Include only from x86-64 GCC/Clang code; each function has its target.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define HF_AVX2 __attribute__((target("avx2,fma")))
#define HF_AVX2_INLINE inline __attribute__((always_inline))

namespace hf_avx2 {

constexpr int kLanes = 8;  // float32 lanes of a ymm register

// Lanes 0 .. min(max(n, 0), 8) - 1 set (all bits), the rest clear: AVX2's mask form.
HF_AVX2 HF_AVX2_INLINE __m256i first_lanes(int64_t n) {
  const int k = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, kLanes)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first min(n, 8) values from src, zeros after; the masked load only at an edge.
HF_AVX2 HF_AVX2_INLINE __m256 load_first(const float* src, int64_t n) {
  return n >= kLanes ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, first_lanes(n));
}

// Stores the first min(n, 8) lanes of v. AVX2's masked store is microcoded and slow on AMD Zen
// 2/3 (the 18 -> 18 thin conv spent 38% of its time in row reads and writes with masked stores
// everywhere), so whole vectors take a plain store.
HF_AVX2 HF_AVX2_INLINE void store_first(float* dst, int64_t n, __m256 v) {
  if (n >= kLanes) {
    _mm256_storeu_ps(dst, v);
  } else {
    _mm256_maskstore_ps(dst, first_lanes(n), v);
  }
}

}  // namespace hf_avx2

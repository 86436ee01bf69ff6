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

// Stores the first min(n, 8) lanes of v (none for n <= 0). AVX2's masked store is microcoded and
// slow on AMD Zen 2/3 (the 18 -> 18 thin conv spent 38% of its time in row reads and writes with
// masked stores everywhere), so whole vectors take a plain store and an edge takes at most three
// plain narrow stores (4, 2 and 1 lanes): an 18-channel channels_last pixel ends in 2 lanes.
HF_AVX2 HF_AVX2_INLINE void store_first(float* dst, int64_t n, __m256 v) {
  if (n >= kLanes) {
    _mm256_storeu_ps(dst, v);
    return;
  }
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(dst, part);
    part = _mm256_extractf128_ps(v, 1);
    dst += 4;
    n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), part);
    part = _mm_movehl_ps(part, part);
    dst += 2;
    n -= 2;
  }
  if (n >= 1) _mm_store_ss(dst, part);
}

}  // namespace hf_avx2

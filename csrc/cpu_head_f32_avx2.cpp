// hrnet_fast CPU kernel: the AVX2 + FMA variant of the float32 seg head in one pass (the op, its
// math, its checks and the AVX-512 variant are in csrc/cpu_head_f32.cpp).
//
// Why: as on AVX-512, the 270-channel head map (w18 at 1x3x512x1024: 35 MB float32) is never
// written and read back; on an AMD EPYC (Zen 3, 2 threads) w18's head alone ran 1.11-1.13x faster
// than the unfused head with caches flushed before each call (benchmarks/RESULTS.md).
//
// Blocks of 48 pixels: each projection weight slice (Ci x 16 channels) is loaded from L2 once per
// 48 pixels and then served from L1; with the AVX-512 variant's 8 pixels it came from L2 every 8.
// Register tiles (12 of the 16 ymm registers accumulate): the projection 6 pixels x 2 vectors of
// 8 channels (2 weight loads and 6 broadcasts per input channel; a 4 x 3 tile needs 16 registers
// and GCC then folded the third weight vector into 4 FMAs as memory operands), the classifier
// 4 pixels x 3 vectors (19 classes are 24 lanes: one tile column). Against 8-pixel blocks and
// 4 x 3 tiles everywhere (same process, alternating, Zen 3, 2 threads, inputs in cache): w18's
// head 1.29x, w48's 1.38x, a 33x71 map 1.16x. Weights laid out to multiples of 8 lanes. Per
// output value the same float32 operations in the same order as the AVX-512 variant (see
// csrc/cpu_head_f32.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_head_f32.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include "cpu_avx2.h"

namespace hf_head {
namespace {

using hf_avx2::kLanes;
using hf_avx2::load_first;
using hf_avx2::store_first;
constexpr int kBlockPx = 48;    // pixels per block: one row of taps, one [48][Cm] buffer of h
constexpr int kProjTilePx = 6;  // projection register tile: 6 pixels x 2 vectors
constexpr int kProjVec = 2;
constexpr int kClsTilePx = 4;   // classifier register tile: 4 pixels x 3 vectors
constexpr int kClsVec = 3;
static_assert(kBlockPx % kProjTilePx == 0 && kBlockPx % kClsTilePx == 0,
              "a full block is whole register tiles");

using Tap = hf_resize::PixelTap<float>;

// acc[p][j] = sum over k of rows[p][k] * w[k * wstride + 8 j .. + 8] for TP rows and V vectors.
template <int TP, int VM, int V>
HF_AVX2 HF_AVX2_INLINE void matmul_tile(const float* const* rows, int64_t k_count,
                                          const float* w, int64_t wstride, __m256 acc[TP][VM]) {
  __m256 a[TP][V];  // local accumulators (see the AVX-512 variant: they stay in registers)
  for (int p = 0; p < TP; ++p)
    for (int j = 0; j < V; ++j) a[p][j] = _mm256_setzero_ps();
  const float* r[TP];  // the row pointers in registers, the weight row walked by its stride
  for (int p = 0; p < TP; ++p) r[p] = rows[p];
  for (int64_t k = 0; k < k_count; ++k, w += wstride) {
    __m256 wv[V];
    for (int j = 0; j < V; ++j) wv[j] = _mm256_loadu_ps(w + j * kLanes);
    for (int p = 0; p < TP; ++p) {
      const __m256 b = _mm256_broadcast_ss(r[p] + k);
      for (int j = 0; j < V; ++j) a[p][j] = _mm256_fmadd_ps(b, wv[j], a[p][j]);
    }
  }
  for (int p = 0; p < TP; ++p)
    for (int j = 0; j < V; ++j) acc[p][j] = a[p][j];
}

template <int TP, int VM>
HF_AVX2 HF_AVX2_INLINE void matmul(int v, const float* const* rows, int64_t k_count,
                                     const float* w, int64_t wstride, __m256 acc[TP][VM]) {
  if constexpr (VM >= 3) {
    if (v == 3) return matmul_tile<TP, VM, 3>(rows, k_count, w, wstride, acc);
  }
  if (v == 2) return matmul_tile<TP, VM, 2>(rows, k_count, w, wstride, acc);
  matmul_tile<TP, VM, 1>(rows, k_count, w, wstride, acc);
}

// dst[i] = fma(h0, r0[i], h1 * r1[i]) for one source pixel's Cm values.
HF_AVX2 void blend_pixel(float* dst, const float* r0, const float* r1, float h0, float h1,
                         int64_t cm) {
  const __m256 w0 = _mm256_set1_ps(h0), w1 = _mm256_set1_ps(h1);
  for (int64_t c = 0; c < cm; c += kLanes) {
    const __m256 v = _mm256_fmadd_ps(w0, load_first(r0 + c, cm - c),
                                     _mm256_mul_ps(w1, load_first(r1 + c, cm - c)));
    store_first(dst + c, cm - c, v);
  }
}

}  // namespace

// Output rows begin .. end - 1. A block's last register tile may reach past W: its extra rows read
// zeros (projection) or stale h (classifier) and are never stored.
HF_AVX2 void head_rows_avx2(const HeadF32& p, int64_t begin, int64_t end) {
  constexpr int TP = kProjTilePx, VM = kProjVec, CT = kClsTilePx, CV = kClsVec, BP = kBlockPx;
  const int64_t ci = p.ci, H = p.H, W = p.W, cm = p.cm, cmp = p.cmp;
  const size_t nsrc = p.sources.size();
  std::vector<float> hbuf(static_cast<size_t>(BP * cmp));  // h of one block, [BP][cmp]
  std::vector<float> zeros(static_cast<size_t>(std::max(ci, cmp)), 0.0f);  // rows past W
  hf_resize::RowTaps<float> sources(p.sources, cm);
  std::vector<Tap> taps(BP * std::max<size_t>(nsrc, 1));
  __m256 acc[TP][VM];
  __m256 cacc[CT][CV];
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / H, y = item % H;
    sources.start_row(n, y, blend_pixel);
    const float* xrow = p.x + (n * H + y) * W * ci;
    for (int64_t x0 = 0; x0 < W; x0 += BP) {
      const int valid = static_cast<int>(std::min<int64_t>(BP, W - x0));
      const int tiled = std::max((valid + TP - 1) / TP * TP, (valid + CT - 1) / CT * CT);
      const float* xp[BP + TP];
      const float* hp[BP + TP];
      for (int q = 0; q < tiled; ++q) {
        xp[q] = q < valid ? xrow + (x0 + q) * ci : zeros.data();
        hp[q] = hbuf.data() + std::min(q, BP - 1) * cmp;
      }
      sources.taps(taps.data(), x0, valid);
      // projection tiles, each finished at once into hbuf (zero past Cm)
      for (int64_t v0 = 0; v0 < cmp / kLanes; v0 += VM) {
        const int nv = static_cast<int>(std::min<int64_t>(VM, cmp / kLanes - v0));
        for (int q0 = 0; q0 < valid; q0 += TP) {
          matmul<TP, VM>(nv, xp + q0, ci, p.wp + v0 * kLanes, cmp, acc);
          for (int q = q0; q < std::min(valid, q0 + TP); ++q) {
            const Tap* tap = taps.data() + q * nsrc;
            for (int j = 0; j < nv; ++j) {
              const int64_t ch = (v0 + j) * kLanes;
              __m256 v = _mm256_add_ps(acc[q - q0][j], _mm256_loadu_ps(p.bp + ch));
              for (size_t k = 0; k < nsrc; ++k) {
                const Tap& t = tap[k];
                if (t.t0 != nullptr) {
                  const __m256 a = load_first(t.t0 + ch, cm - ch);
                  const __m256 b = load_first(t.t1 + ch, cm - ch);
                  v = _mm256_add_ps(v, _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(t.w0), a),
                                                     _mm256_mul_ps(_mm256_set1_ps(t.w1), b)));
                } else {
                  v = _mm256_add_ps(v, load_first(t.row + ch, cm - ch));
                }
              }
              _mm256_storeu_ps(hbuf.data() + q * cmp + ch, _mm256_max_ps(zero, v));  // NaN stays
            }
          }
        }
      }
      // classifier tiles over h
      float* out = p.out + ((n * H + y) * W + x0) * p.co;
      for (int64_t v0 = 0; v0 < p.cop / kLanes; v0 += CV) {
        const int nv = static_cast<int>(std::min<int64_t>(CV, p.cop / kLanes - v0));
        for (int q0 = 0; q0 < valid; q0 += CT) {
          matmul<CT, CV>(nv, hp + q0, cm, p.wc + v0 * kLanes, p.cop, cacc);
          for (int q = q0; q < std::min(valid, q0 + CT); ++q)
            for (int j = 0; j < nv; ++j) {
              const int64_t ch = (v0 + j) * kLanes;
              const __m256 v = _mm256_add_ps(cacc[q - q0][j], _mm256_loadu_ps(p.bc + ch));
              store_first(out + q * p.co + ch, p.co - ch, v);
            }
        }
      }
    }
  }
}

}  // namespace hf_head

#else
#include <c10/util/Exception.h>

namespace hf_head {
void head_rows_avx2(const HeadF32&, int64_t, int64_t) {
  TORCH_CHECK(false, "hrnet_fast_cpu::seg_head_f32: built without x86-64 AVX2");
}
}  // namespace hf_head
#endif

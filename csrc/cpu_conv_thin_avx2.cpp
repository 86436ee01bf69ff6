// hrnet_fast CPU kernel: the AVX2 + FMA variant of the thin-layer 3x3 conv (the op, its math, its
// checks and the AVX-512 variant are in csrc/cpu_conv_thin.cpp).
//
// Why a variant: AMD EPYC/Ryzen and older Intel CPUs have no AVX-512, and there oneDNN's fp32
// convolutions of w18's 18/36-channel branches ran at 73-90 GFLOP/s on 2 cores of an AMD EPYC
// (Zen 3), 38-47% of the FMA peak (benchmarks/RESULTS.md); oneDNN vectorises over 8 output
// channels there, so 18 channels take 24 lanes, and it has no fp32 Winograd on AVX2.
//
// Same algorithms, layouts, work split and summation order as the AVX-512 variant, with 8-lane
// vectors: register tiles of 6 output channels x 2 vectors of 8 pixels (direct) or 8 Winograd
// tiles (12 of the 16 ymm registers accumulate; Winograd's 24- and 8-tile blocks, which the
// AVX-512 variant does not have, take 4 x 3 and 12 x 1 tiles, and the transformed weights are in
// panels, see kPanelCo), 8 x 8 register transposes for channels_last rows, AVX2 masked loads and
// gathers for the edges. Every output element is computed by the same
// sequence of float32 operations as in the AVX-512 variant (see csrc/cpu_conv_thin.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_conv_thin.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include "cpu_avx2.h"

namespace hf_thin {
namespace {

using hf_avx2::first_lanes;
using hf_avx2::kLanes;
using hf_avx2::load_first;
using hf_avx2::store_first;
constexpr int kTilePx = 2;   // vectors of pixels (or tiles) per register tile: 6 x 2 accumulators
constexpr int kBlockVecs = kWinoBlock / kLanes;  // vectors per full Winograd block (8)
static_assert(kPeriodPx % kLanes == 0, "a period is whole vectors");
static_assert(kPanelCo % kTileCo == 0 && kPanelCo % 4 == 0,
              "the Winograd register tiles (6, 4 and 12 channels) never straddle two panels");

HF_AVX2 HF_THIN_ALWAYS_INLINE __m256i lane_times(int64_t stride) {
  return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                            _mm256_set1_epi32(static_cast<int>(stride)));
}

HF_AVX2 HF_THIN_ALWAYS_INLINE __m256 masked_gather(const float* base, __m256i offsets, __m256i m) {
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, offsets, _mm256_castsi256_ps(m), 4);
}

// One register tile: CB output channels from co0, R vectors of 8 pixels from x0, written planar to
// orow[co * out_pitch + x]. rows[ky]: the planar input row y + ky - 1 (column x at index x + 1).
template <int CB, int R>
HF_AVX2 HF_THIN_ALWAYS_INLINE void tile(const Problem& p, const float* const* rows, int64_t x0,
                                        int64_t co0, float* orow) {
  __m256 acc[CB][R];
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  const int64_t Ci = p.Ci, Co = p.Co, in_pitch = p.in_pitch;
  const float* wk = p.w + co0;  // walks [ci][ky][kx] in steps of Co
  for (int64_t ci = 0; ci < Ci; ++ci) {
    for (int ky = 0; ky < 3; ++ky) {
      const float* in = rows[ky] + ci * in_pitch + x0;
      for (int kx = 0; kx < 3; ++kx, wk += Co) {
        __m256 v[R];
        for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_ps(in + kx + kLanes * r);
        for (int c = 0; c < CB; ++c) {
          const __m256 wv = _mm256_broadcast_ss(wk + c);
          for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(v[r], wv, acc[c][r]);
        }
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r)
      _mm256_storeu_ps(orow + (co0 + c) * p.out_pitch + x0 + kLanes * r, acc[c][r]);
}

template <int R>
HF_AVX2 HF_THIN_ALWAYS_INLINE void tile_rest(const Problem& p, const float* const* rows, int64_t x0,
                                             int64_t co0, float* orow) {
  with_rest(p.Co - co0, [&](auto cb) HF_AVX2 { tile<decltype(cb)::value, R>(p, rows, x0, co0, orow); });
}

// A whole output row, planar, before bias: 16-pixel blocks, then one 8-pixel block (it may reach
// past W; those lanes read the zero padding and are never written out).
HF_AVX2 void conv_row(const Problem& p, const float* const* rows, float* orow) {
  constexpr int64_t block = kLanes * kTilePx;
  const int64_t full = p.W / block * block;
  const int64_t co_full = p.Co / kTileCo * kTileCo;
  for (int64_t x0 = 0; x0 < full; x0 += block) {
    for (int64_t co = 0; co < co_full; co += kTileCo) tile<kTileCo, kTilePx>(p, rows, x0, co, orow);
    if (co_full < p.Co) tile_rest<kTilePx>(p, rows, x0, co_full, orow);
  }
  for (int64_t x0 = full; x0 < p.W; x0 += kLanes) {
    for (int64_t co = 0; co < co_full; co += kTileCo) tile<kTileCo, 1>(p, rows, x0, co, orow);
    if (co_full < p.Co) tile_rest<1>(p, rows, x0, co_full, orow);
  }
}

// r[i] lane j -> r[j] lane i (an 8 x 8 float transpose in registers, 24 shuffles).
HF_AVX2 HF_THIN_ALWAYS_INLINE void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));          // columns 0 | 4
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));      // 1 | 5
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // 2 | 6
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // 3 | 7
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x31);
  }
}

// Channels c0 .. c0 + 7 of pixels x0 .. x0 + 7 of a row whose channels are adjacent (pixel stride
// sw): r[j] = channel c0 + j across the 8 pixels; channels and pixels past the row (nc, npix) read
// 0 and are never loaded.
HF_AVX2 HF_THIN_ALWAYS_INLINE void load_transposed(const float* row, int64_t sw, int64_t x0,
                                                   int64_t npix, int64_t c0, int64_t nc,
                                                   __m256 r[8]) {
  for (int k = 0; k < 8; ++k)
    r[k] = k < npix ? load_first(row + (x0 + k) * sw + c0, nc) : _mm256_setzero_ps();
  transpose8(r);
}

// Walks a channels_last row of W pixels and C channels in blocks of 8 pixels x 8 channels:
// f(x, c0, nc, r) with r[j] = channel c0 + j across pixels x .. x + 7.
template <typename F>
HF_AVX2 HF_THIN_ALWAYS_INLINE void for_each_transposed(const float* row, int64_t sw, int64_t W,
                                                       int64_t C, F f) {
  for (int64_t x = 0; x < W; x += kLanes) {
    const int64_t npix = std::min<int64_t>(kLanes, W - x);
    for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
      const int64_t nc = std::min<int64_t>(kLanes, C - c0);
      __m256 r[8];
      load_transposed(row, sw, x, npix, c0, nc, r);
      f(x, c0, nc, r);
    }
  }
}

// planar[ci * in_pitch + 1 + x] = src[ci * sc + x * sw].
HF_AVX2 void read_input_row(const Problem& p, const float* src, float* planar) {
  if (p.sc == 1 && p.sw != 1) {  // channels_last: contiguous loads and register transposes
    for_each_transposed(src, p.sw, p.W, p.Ci,
                        [&](int64_t x, int64_t c0, int64_t nc, const __m256* r) HF_AVX2 {
      for (int64_t j = 0; j < nc; ++j) store_first(planar + (c0 + j) * p.in_pitch + 1 + x, p.W - x, r[j]);
    });
    return;
  }
  const __m256i lane_offsets = lane_times(p.sw);
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    float* dst = planar + ci * p.in_pitch + 1;
    const float* row = src + ci * p.sc;
    for (int64_t x = 0; x < p.W; x += kLanes) {
      const __m256i m = first_lanes(p.W - x);
      const __m256 v = p.sw == 1 ? load_first(row + x, p.W - x)
                                 : masked_gather(row + x * p.sw, lane_offsets, m);
      store_first(dst + x, p.W - x, v);
    }
  }
}

// ------------------------------------------------------------------ Winograd F(2x2, 3x3)
// See the AVX-512 variant for the transforms and the deinterleaved row layout (a half: columns
// -1, 1, 3, ...; b half: columns 0, 2, 4, ...).
HF_AVX2 HF_THIN_ALWAYS_INLINE float* half_a(const Problem& p, float* slot, int64_t ci) {
  return slot + (2 * ci) * p.half_pitch;
}

// Even and odd lanes of the 16 values lo (0-7) and hi (8-15): lo0 lo2 .. hi6 and lo1 lo3 .. hi7.
HF_AVX2 HF_THIN_ALWAYS_INLINE __m256 even_lanes(__m256 lo, __m256 hi) {
  const __m256 s = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));  // 0 2 8 10 | 4 6 12 14
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), _MM_SHUFFLE(3, 1, 2, 0)));
}

HF_AVX2 HF_THIN_ALWAYS_INLINE __m256 odd_lanes(__m256 lo, __m256 hi) {
  const __m256 s = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), _MM_SHUFFLE(3, 1, 2, 0)));
}

HF_AVX2 void read_input_row_wino(const Problem& p, const float* src, float* slot) {
  const __m256i two_pixels = lane_times(2 * p.sw);
  const int64_t evens = (p.W + 1) / 2, odds = p.W / 2;
  if (p.sc == 1 && p.sw != 1) {  // channels_last: 16 pixels as two register transposes, then split
    for (int64_t t = 0; t < evens; t += kLanes) {
      const int64_t x = 2 * t, n_lo = std::min<int64_t>(kLanes, p.W - x);
      const int64_t n_hi = std::max<int64_t>(0, std::min<int64_t>(kLanes, p.W - x - kLanes));
      for (int64_t c0 = 0; c0 < p.Ci; c0 += kLanes) {
        const int64_t nc = std::min<int64_t>(kLanes, p.Ci - c0);
        __m256 lo[8], hi[8];
        load_transposed(src, p.sw, x, n_lo, c0, nc, lo);
        load_transposed(src, p.sw, x + kLanes, n_hi, c0, nc, hi);
        for (int64_t j = 0; j < nc; ++j) {
          float* a = half_a(p, slot, c0 + j);
          store_first(a + p.half_pitch + t, evens - t, even_lanes(lo[j], hi[j]));
          store_first(a + t + 1, odds - t, odd_lanes(lo[j], hi[j]));
        }
      }
    }
    return;
  }
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    float* a = half_a(p, slot, ci);  // a[t + 1] = column 2t + 1
    float* b = a + p.half_pitch;      // b[t] = column 2t
    const float* row = src + ci * p.sc;
    for (int64_t t = 0; t < evens; t += kLanes) {
      const __m256i me = first_lanes(evens - t), mo = first_lanes(odds - t);
      __m256 even, odd;
      if (p.sw == 1) {
        const __m256 lo = load_first(row + 2 * t, p.W - 2 * t);
        const __m256 hi = load_first(row + 2 * t + kLanes, p.W - 2 * t - kLanes);
        even = even_lanes(lo, hi);
        odd = odd_lanes(lo, hi);
      } else {
        even = masked_gather(row + 2 * t * p.sw, two_pixels, me);
        odd = masked_gather(row + (2 * t + 1) * p.sw, two_pixels, mo);
      }
      store_first(b + t, evens - t, even);
      store_first(a + t + 1, odds - t, odd);
    }
  }
}

// Floats between two positions of a V or M block of R vectors of tiles over C channels
// ([pos][c][8 R]): one cache line more than the data. Unpadded, C * 8 R floats is a multiple of
// 4 KB for 64 tiles and C a multiple of 16 (64 channels: 16 KB), so the input transform's 16
// stores and the output transform's 16 loads of one tile vector all fell in one 8-way L1 set.
// The line of padding made 48- and 64-channel convs 1.08-1.20x and 256 -> 18 1.17-1.25x faster on
// a Zen 3 (same process, alternating; 18/36/72/144 channels unchanged within 2%).
constexpr int64_t kPosPad = 16;
HF_THIN_ALWAYS_INLINE int64_t pos_stride(int64_t C, int R) { return C * kLanes * R + kPosPad; }

// V for R vectors of 8 tiles from t0, every input channel: vbuf[p][ci][8 R].
template <int R>
HF_AVX2 void input_transform(const Problem& p, float* const* rows, int64_t t0, float* vbuf) {
  const int64_t vstride = pos_stride(p.Ci, R);
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    for (int r = 0; r < R; ++r) {
      const int64_t t = t0 + kLanes * r;
      __m256 row_t[4][4];
      for (int i = 0; i < 4; ++i) {
        const float* a = half_a(p, rows[i], ci);
        const float* b = a + p.half_pitch;
        const __m256 d0 = _mm256_loadu_ps(a + t), d1 = _mm256_loadu_ps(b + t);
        const __m256 d2 = _mm256_loadu_ps(a + t + 1), d3 = _mm256_loadu_ps(b + t + 1);
        row_t[i][0] = _mm256_sub_ps(d0, d2);
        row_t[i][1] = _mm256_add_ps(d1, d2);
        row_t[i][2] = _mm256_sub_ps(d2, d1);
        row_t[i][3] = _mm256_sub_ps(d1, d3);
      }
      float* v = vbuf + ci * kLanes * R + kLanes * r;
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(v + (0 * 4 + j) * vstride, _mm256_sub_ps(row_t[0][j], row_t[2][j]));
        _mm256_storeu_ps(v + (1 * 4 + j) * vstride, _mm256_add_ps(row_t[1][j], row_t[2][j]));
        _mm256_storeu_ps(v + (2 * 4 + j) * vstride, _mm256_sub_ps(row_t[2][j], row_t[1][j]));
        _mm256_storeu_ps(v + (3 * 4 + j) * vstride, _mm256_sub_ps(row_t[1][j], row_t[3][j]));
      }
    }
  }
}

// M[pos] for CB output channels from co0 and RB vectors of tiles from vector r0 of a block of R
// vectors: mbuf[pos][co][8 R]. u: this position's weights in panels (kPanelCo); the CB channels lie
// in one panel.
template <int CB, int RB, int R>
HF_AVX2 HF_THIN_ALWAYS_INLINE void wino_gemm(const Problem& p, const float* v, const float* u,
                                             int64_t co0, int r0, float* m) {
  __m256 acc[CB][RB];
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < RB; ++r) acc[c][r] = _mm256_setzero_ps();
  // pointers walked by their strides: GCC otherwise reloads Co from p and recomputes every
  // broadcast address per input channel (30 instructions around 12 FMAs)
  const int64_t Ci = p.Ci;
  int64_t ustride;
  const float* vp = v + kLanes * r0;
  const float* up = u + panel_offset(Ci, p.Co, 0, co0, &ustride);
  for (int64_t ci = 0; ci < Ci; ++ci, vp += kLanes * R, up += ustride) {
    __m256 vv[RB];
    for (int r = 0; r < RB; ++r) vv[r] = _mm256_loadu_ps(vp + kLanes * r);
    for (int c = 0; c < CB; ++c) {
      const __m256 uc = _mm256_broadcast_ss(up + c);
      for (int r = 0; r < RB; ++r) acc[c][r] = _mm256_fmadd_ps(vv[r], uc, acc[c][r]);
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < RB; ++r)
      _mm256_storeu_ps(m + (co0 + c) * kLanes * R + kLanes * (r0 + r), acc[c][r]);
}

// Y = A^T M A for 8 tiles of one output channel (mp: their M at position 0, positions mstride
// apart): y[i][j] = output row y + i, columns 2t + j of the 8 tiles t.
HF_AVX2 HF_THIN_ALWAYS_INLINE void inverse_transform(const float* mp, int64_t mstride,
                                                     __m256 y[2][2]) {
  __m256 m[16];
  for (int pos = 0; pos < kWinoPos; ++pos) m[pos] = _mm256_loadu_ps(mp + pos * mstride);
  __m256 s[4], d[4];  // A^T over the rows of M: s = rows 0+1+2, d = rows 1-2-3
  for (int j = 0; j < 4; ++j) {
    s[j] = _mm256_add_ps(_mm256_add_ps(m[j], m[4 + j]), m[8 + j]);
    d[j] = _mm256_sub_ps(_mm256_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
  }
  y[0][0] = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]);
  y[0][1] = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
  y[1][0] = _mm256_add_ps(_mm256_add_ps(d[0], d[1]), d[2]);
  y[1][1] = _mm256_sub_ps(_mm256_sub_ps(d[1], d[2]), d[3]);
}

// y (inverse_transform) as 16 consecutive columns of the planar rows o0 and o1: tiles 0-3 and 4-7
// interleaved, by unpacking within 128-bit halves and then joining the halves.
HF_AVX2 HF_THIN_ALWAYS_INLINE void store_interleaved(const __m256 y[2][2], float* o0, float* o1) {
  float* o[2] = {o0, o1};
  for (int i = 0; i < 2; ++i) {
    const __m256 lo = _mm256_unpacklo_ps(y[i][0], y[i][1]), hi = _mm256_unpackhi_ps(y[i][0], y[i][1]);
    _mm256_storeu_ps(o[i], _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(o[i] + kLanes, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// Y = A^T M A for every output channel into the planar output rows orow0 (row y) and orow1
// (row y + 1), columns 2t and 2t + 1 interleaved.
template <int R>
HF_AVX2 void output_transform(const Problem& p, const float* mbuf, int64_t t0, float* orow0,
                              float* orow1) {
  const int64_t mstride = pos_stride(p.Co, R);
  for (int64_t co = 0; co < p.Co; ++co) {
    for (int r = 0; r < R; ++r) {
      __m256 y[2][2];
      inverse_transform(mbuf + co * kLanes * R + kLanes * r, mstride, y);
      const int64_t x = 2 * (t0 + kLanes * r);
      store_interleaved(y, orow0 + co * p.out_pitch + x, orow1 + co * p.out_pitch + x);
    }
  }
}

// Where a row pair's output goes in the row-pair format (rows_pitch, cpu_conv_thin.h), and its
// residual read from that format: rows y and y + 1 (null past the image or when not used).
struct RowsIO {
  float* out[2] = {nullptr, nullptr};
  const float* res[2] = {nullptr, nullptr};
};

// Y = A^T M A as output_transform, then the epilogue in registers: (Y + bias) + residual (the
// row-pair residual io.res), ReLU; the same operations in the same order as the row writes
// below. Stored in the row-pair format (p.out_rows: even columns to the b halves, odd columns to
// the a halves, lanes past the row's columns as 0) or interleaved into the planar rows as
// output_transform does (then written out without an epilogue).
template <int R>
HF_AVX2 void output_transform_epilogue(const Problem& p, const float* mbuf, int64_t t0,
                                       float* orow0, float* orow1, const RowsIO& io) {
  const int64_t mstride = pos_stride(p.Co, R);
  const int64_t evens = (p.W + 1) / 2, odds = p.W / 2, hp = p.half_pitch;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t co = 0; co < p.Co; ++co) {
    const __m256 b = _mm256_set1_ps(p.bias != nullptr ? p.bias[co] : 0.0f);
    const int64_t a_half = 2 * co * hp;  // channel co's a half in a row-pair row
    for (int r = 0; r < R; ++r) {
      const int64_t t = t0 + kLanes * r;
      __m256 y[2][2];  // [output row][column parity]
      inverse_transform(mbuf + co * kLanes * R + kLanes * r, mstride, y);
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          __m256 v = _mm256_add_ps(y[i][j], b);
          if (io.res[i] != nullptr) {  // even columns in the b half at t, odd in the a half at t + 1
            v = _mm256_add_ps(v, _mm256_loadu_ps(io.res[i] + a_half + (j == 0 ? hp + t : t + 1)));
          }
          if (p.relu) v = _mm256_max_ps(zero, v);  // max(0, NaN) is NaN
          y[i][j] = v;
        }
      }
      if (p.out_rows) {
        const __m256 even_valid = _mm256_castsi256_ps(first_lanes(evens - t));
        const __m256 odd_valid = _mm256_castsi256_ps(first_lanes(odds - t));
        for (int i = 0; i < 2; ++i) {
          if (io.out[i] == nullptr) continue;
          float* o = io.out[i] + a_half;
          _mm256_storeu_ps(o + hp + t, _mm256_and_ps(y[i][0], even_valid));
          _mm256_storeu_ps(o + t + 1, _mm256_and_ps(y[i][1], odd_valid));
        }
        continue;
      }
      store_interleaved(y, orow0 + co * p.out_pitch + 2 * t, orow1 + co * p.out_pitch + 2 * t);
    }
  }
}

// The entries of a row-pair output row that no tile writes: a[0] (column -1) and everything past
// the computed tiles, zero as the format requires.
HF_AVX2 void finish_rows_row(const Problem& p, float* row) {
  const int64_t hp = p.half_pitch, lanes = (p.tiles + kLanes - 1) / kLanes * kLanes;
  for (int64_t co = 0; co < p.Co; ++co) {
    float* a = row + 2 * co * hp;
    a[0] = 0.0f;
    std::fill(a + lanes + 1, a + hp, 0.0f);
    std::fill(a + hp + lanes, a + 2 * hp, 0.0f);
  }
}

// The products of one position in whole register tiles of CB output channels x RB vectors of
// tiles, from channel co0 as far as whole tiles go; returns the first channel left over.
template <int CB, int RB, int R>
HF_AVX2 HF_THIN_ALWAYS_INLINE int64_t wino_channels(const Problem& p, const float* v,
                                                    const float* u, int64_t co0, int r0, float* m) {
  const int64_t full = co0 + (p.Co - co0) / CB * CB;
  for (int64_t co = co0; co < full; co += CB) wino_gemm<CB, RB, R>(p, v, u, co, r0, m);
  return full;
}

// The products of one position for all output channels. Register tiles by block width (same
// process, alternating, Zen 3, 2 threads; every output element sums the same products in the same
// order whatever the tile): 6 channels x 2 vectors for R = 2, 4 and 8; 4 x 3 for R = 3, which made
// the 17-24 leftover tiles of a row one block instead of 16 + 8 (w32 pose's 32 channels at 8x64x48
// 1.14-1.25x, 256 -> 32 there 1.16-1.18x, 144 channels at 2x20x44 1.26x); 12 x 1 for R = 1 (6 x
// 1's six accumulators likely leave the FMA latency exposed; 144 channels at 30x15 1.12x, 64 at
// 8x32x16 1.09x). 4 x 3 for two thirds of a full block, or 4 x 3 + 12 x 1 for R = 4, lost
// (0.87-1.02x).
template <int R>
HF_AVX2 void wino_position(const Problem& p, const float* v, const float* u, float* m) {
  if constexpr (R == 3) {
    const int64_t co = wino_channels<4, 3, R>(p, v, u, 0, 0, m);
    with_rest(p.Co - co,
              [&](auto cb) HF_AVX2 { wino_gemm<decltype(cb)::value, 3, R>(p, v, u, co, 0, m); });
  } else if constexpr (R == 1) {
    const int64_t co12 = wino_channels<2 * kTileCo, 1, R>(p, v, u, 0, 0, m);
    const int64_t co = wino_channels<kTileCo, 1, R>(p, v, u, co12, 0, m);
    with_rest(p.Co - co,
              [&](auto cb) HF_AVX2 { wino_gemm<decltype(cb)::value, 1, R>(p, v, u, co, 0, m); });
  } else {
    for (int r0 = 0; r0 < R; r0 += kTilePx) {
      const int64_t co = wino_channels<kTileCo, kTilePx, R>(p, v, u, 0, r0, m);
      with_rest(p.Co - co, [&](auto cb) HF_AVX2 {
        wino_gemm<decltype(cb)::value, kTilePx, R>(p, v, u, co, r0, m);
      });
    }
  }
}

// One block of 8 R tiles: V for every input channel, then per position the products for every
// output channel, then Y.
template <int R>
HF_AVX2 void wino_block(const Problem& p, float* const* rows, int64_t t0, float* vbuf,
                        float* mbuf, float* orow0, float* orow1, const RowsIO* io) {
  input_transform<R>(p, rows, t0, vbuf);
  for (int pos = 0; pos < kWinoPos; ++pos) {
    wino_position<R>(p, vbuf + pos * pos_stride(p.Ci, R), p.u + pos * p.Ci * p.Co,
                     mbuf + pos * pos_stride(p.Co, R));
  }
  if (io != nullptr) {
    output_transform_epilogue<R>(p, mbuf, t0, orow0, orow1, *io);
  } else {
    output_transform<R>(p, mbuf, t0, orow0, orow1);
  }
}

// Two planar output rows (y, y + 1) before bias: blocks of 64 tiles, then blocks of 32, 24, 16 or 8
// tiles, so that the lanes computed are the tiles rounded up to 8 (the last block may reach past
// the row's tiles, never past the caller's pitches, which cover whole blocks of 64). Every block
// streams all 16 transformed weight matrices, yet smaller blocks still beat one with idle lanes
// (same process, 17-24 tiles as 16 + 8 against 32: 18-256 channels 1.12-1.27x), and an 8-tile
// block is the slowest per tile: 33-40 leftover tiles run as 24 + 16, not 32 + 8 (64 channels at
// 64x76 1.09x, 144 at 2x20x72 1.07x, 18-72 channels 1.01-1.03x).
HF_AVX2 void wino_rows(const Problem& p, float* const* rows, float* vbuf, float* mbuf,
                       float* orow0, float* orow1, const RowsIO* io = nullptr) {
  const int64_t full = p.tiles / kWinoBlock * kWinoBlock;
  int64_t t0 = 0;
  for (; t0 < full; t0 += kWinoBlock) wino_block<kBlockVecs>(p, rows, t0, vbuf, mbuf, orow0, orow1, io);
  while (t0 < p.tiles) {
    const int64_t vecs = (p.tiles - t0 + kLanes - 1) / kLanes;  // 1 .. 8
    if (vecs == 4 || vecs > 5) {
      wino_block<4>(p, rows, t0, vbuf, mbuf, orow0, orow1, io);
      t0 += 4 * kLanes;
    } else if (vecs >= 3) {
      wino_block<3>(p, rows, t0, vbuf, mbuf, orow0, orow1, io);
      t0 += 3 * kLanes;
    } else if (vecs == 2) {
      wino_block<2>(p, rows, t0, vbuf, mbuf, orow0, orow1, io);
      t0 += 2 * kLanes;
    } else {
      wino_block<1>(p, rows, t0, vbuf, mbuf, orow0, orow1, io);
      t0 += kLanes;
    }
  }
}

// out row = act(planar row + bias + residual row), channels_last: W * Co floats, gathered from the
// planar row one period (16 pixels, 2 Co vectors) at a time.
HF_AVX2 void write_row_channels_last_gathered(const Problem& p, const float* orow,
                                              const Period& period, const float* res, float* out) {
  const int64_t total = p.W * p.Co;
  const bool res_dense = p.rc == 1 && p.rw == p.Co;
  const __m256 zero = _mm256_setzero_ps();
  const int64_t vectors = kPeriodPx / kLanes * p.Co;  // per period
  int64_t f = 0;
  for (int64_t k = 0; f < total; ++k) {
    const float* src = orow + kPeriodPx * k;
    const float* res_period = res != nullptr ? res + kPeriodPx * k * p.rw : nullptr;
    for (int64_t j = 0; j < vectors && f < total; ++j, f += kLanes) {
      const __m256i m = first_lanes(total - f);
      const __m256i idx = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(period.planar_index.data() + kLanes * j));
      __m256 v = masked_gather(src, idx, m);
      v = _mm256_add_ps(v, _mm256_loadu_ps(period.bias.data() + kLanes * j));
      if (res != nullptr) {
        v = _mm256_add_ps(v, res_dense ? load_first(res + f, total - f)
                                       : masked_gather(res_period,
                                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                           period.residual_index.data() + kLanes * j)),
                                                       m));
      }
      if (p.relu) v = _mm256_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
      store_first(out + f, total - f, v);
    }
  }
}

// out row = act(planar row + bias + residual row), channels_last, by 8 x 8 register transposes.
HF_AVX2 void write_row_channels_last(const Problem& p, const float* orow, const Period& period,
                                     const float* res, float* out) {
  const bool res_planar = res != nullptr && p.rw == 1;
  if (res != nullptr && !res_planar && p.rc != 1) {
    write_row_channels_last_gathered(p, orow, period, res, out);
    return;
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t x = 0; x < p.W; x += kLanes) {
    const int64_t npix = std::min<int64_t>(kLanes, p.W - x);
    for (int64_t c0 = 0; c0 < p.Co; c0 += kLanes) {
      const int64_t nc = std::min<int64_t>(kLanes, p.Co - c0);
      __m256 r[8];
      for (int64_t j = 0; j < 8; ++j) {
        if (j >= nc) {
          r[j] = zero;
          continue;
        }
        r[j] = _mm256_loadu_ps(orow + (c0 + j) * p.out_pitch + x);
        if (res_planar) r[j] = _mm256_add_ps(r[j], load_first(res + (c0 + j) * p.rc + x, npix));
      }
      transpose8(r);  // r[k]: pixel x + k, channels c0 ..
      const __m256 b = p.bias != nullptr ? load_first(p.bias + c0, nc) : zero;
      for (int64_t k = 0; k < npix; ++k) {
        __m256 v = _mm256_add_ps(r[k], b);
        if (res != nullptr && !res_planar) {
          v = _mm256_add_ps(v, load_first(res + (x + k) * p.rw + c0, nc));
        }
        if (p.relu) v = _mm256_max_ps(zero, v);
        store_first(out + (x + k) * p.Co + c0, nc, v);
      }
    }
  }
}

// out row = act(planar row + bias + residual row), planar: channel co's W floats at co * H * W.
HF_AVX2 void write_row_planar(const Problem& p, const float* orow, const float* res, float* out) {
  const __m256 zero = _mm256_setzero_ps();
  const int64_t plane = p.H * p.W;
  if (res != nullptr && p.rw != 1 && p.rc == 1) {
    for_each_transposed(res, p.rw, p.W, p.Co,
                        [&](int64_t x, int64_t c0, int64_t nc, const __m256* r) HF_AVX2 {
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t co = c0 + j;
        const __m256 b = _mm256_set1_ps(p.bias != nullptr ? p.bias[co] : 0.0f);
        __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(orow + co * p.out_pitch + x), b), r[j]);
        if (p.relu) v = _mm256_max_ps(zero, v);
        store_first(out + co * plane + x, p.W - x, v);
      }
    });
    return;
  }
  const __m256i res_offsets = lane_times(p.rw);
  for (int64_t co = 0; co < p.Co; ++co) {
    const __m256 b = _mm256_set1_ps(p.bias != nullptr ? p.bias[co] : 0.0f);
    const float* src = orow + co * p.out_pitch;
    const float* r = res != nullptr ? res + co * p.rc : nullptr;
    float* dst = out + co * plane;
    for (int64_t x = 0; x < p.W; x += kLanes) {
      const __m256i m = first_lanes(p.W - x);
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(src + x), b);
      if (r != nullptr) {
        v = _mm256_add_ps(v, p.rw == 1 ? load_first(r + x, p.W - x)
                                       : masked_gather(r + x * p.rw, res_offsets, m));
      }
      if (p.relu) v = _mm256_max_ps(zero, v);
      store_first(dst + x, p.W - x, v);
    }
  }
}

void write_rows(const Problem& p, const float* orow, int64_t n, int64_t y, const Period& period) {
  const float* res = p.res != nullptr ? p.res + n * p.rn + y * p.rh : nullptr;
  if (p.out_channels_last) {
    write_row_channels_last(p, orow, period, res, p.out + (n * p.H + y) * p.W * p.Co);
  } else {
    write_row_planar(p, orow, res, p.out + n * p.Co * p.H * p.W + y * p.W);
  }
}

// This thread's Winograd buffers for p: ``nslots`` input-row slots of 2 Ci half-rows (zeroed: their
// padding columns must read 0), then the V and M blocks and two planar output rows.
struct WinoScratch {
  float* slots;
  int64_t slot;  // floats per slot
  float *vbuf, *mbuf, *orow0, *orow1;
};

WinoScratch wino_scratch(const Problem& p, int nslots) {
  const int64_t vsize = kWinoPos * pos_stride(p.Ci, kBlockVecs);
  const int64_t msize = kWinoPos * pos_stride(p.Co, kBlockVecs);
  WinoScratch w;
  w.slot = 2 * p.Ci * p.half_pitch;
  w.slots = thread_scratch(nslots * w.slot, vsize + msize + 2 * p.Co * p.out_pitch);
  w.vbuf = w.slots + nslots * w.slot;
  w.mbuf = w.vbuf + vsize;
  w.orow0 = w.mbuf + msize;
  w.orow1 = w.orow0 + p.Co * p.out_pitch;
  return w;
}

// Output rows y and y + 1 (if inside the image) of image n from the planar rows orow0 / orow1.
void write_row_pair(const Problem& p, const float* orow0, const float* orow1, int64_t n,
                    int64_t y, const Period& period) {
  write_rows(p, orow0, n, y, period);
  if (y + 1 < p.H) write_rows(p, orow1, n, y + 1, period);
}

void run_winograd(const Problem& p, const Period& period) {
  const int64_t pairs = (p.H + 1) / 2;
  // With a row-pair output or residual the output transform applies the epilogue; a strided
  // output is then written from the planar rows without one (``plain``).
  const bool epilogue = p.out_rows || p.res_rows;
  Problem plain = p;
  plain.bias = nullptr;
  plain.res = nullptr;
  plain.relu = false;
  const Period plain_period = epilogue && !p.out_rows ? make_period(plain) : Period();
  const int64_t x_row = 2 * p.Ci * p.half_pitch, o_row = 2 * p.Co * p.half_pitch;
  at::parallel_for(0, p.N * pairs, 1, [&](int64_t begin, int64_t end) {
    // Four deinterleaved input rows (slot = row % 4) and a zero row; a row-pair input needs only
    // the zero row (its rows are read where they are).
    const int nslots = p.x_rows ? 1 : 5;
    const WinoScratch w = wino_scratch(p, nslots);
    float* zero_row = w.slots + (nslots - 1) * w.slot;
    int64_t slot_tag[4] = {-1, -1, -1, -1};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / pairs, y = 2 * (t % pairs);
      float* rows[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t yi = y + i - 1;
        if (p.x_rows) {
          rows[i] = yi < 0 || yi >= p.H ? zero_row
                                        : const_cast<float*>(p.x) + (n * p.H + yi) * x_row;
        } else {
          rows[i] = ring_row<4>(p, n, yi, w.slots, w.slot, zero_row, slot_tag, read_input_row_wino);
        }
      }
      if (!epilogue) {
        wino_rows(p, rows, w.vbuf, w.mbuf, w.orow0, w.orow1);
        write_row_pair(p, w.orow0, w.orow1, n, y, period);
        continue;
      }
      RowsIO io;
      for (int i = 0; i < 2 && y + i < p.H; ++i) {
        const int64_t k = n * p.H + y + i;
        if (p.out_rows) io.out[i] = p.out + k * o_row;
        if (p.res_rows) io.res[i] = p.res + k * o_row;
      }
      wino_rows(p, rows, w.vbuf, w.mbuf, w.orow0, w.orow1, &io);
      if (p.out_rows) {
        for (int i = 0; i < 2; ++i)
          if (io.out[i] != nullptr) finish_rows_row(p, io.out[i]);
      } else {
        write_row_pair(plain, w.orow0, w.orow1, n, y, plain_period);
      }
    }
  });
}

// Row pairs per packed Winograd row, or 1. Narrow rows (pose crops: 3-12 tiles) fill few lanes
// and stream all 16 transformed weight matrices for those few tiles; g row pairs' tiles side by
// side (each pair's tiles followed by one junk tile that straddles two pairs) in one row of at most
// 64 tiles fill more lanes and read the weights once per g pairs. Packed when the largest g (at
// most an even share of the row pairs per thread) fills a larger share of the lanes with real
// tiles; then g is the one of 2 .. largest that computes the fewest lanes on the busiest thread
// (packed rows per thread x lanes per row; ties to the larger g). The largest alone left the last
// packed row mostly junk: 128 channels at 8x16x12 ran 9 pairs per row, 8 rows of 64 lanes, where
// 8 pairs take 8 rows of 56 (1.18x; 192 at 4x24x18 1.15x, 72 at 8x16x12 1.12x, 64 at 8x32x24
// 1.04x, 144 and 256 at 8x8x6 unchanged; same process, alternating, Zen 3, 2 threads).
// torch_cpu.winograd_rows (Python) computes the same g for the row rule.
int64_t packed_pairs(const Problem& p) {
  const int64_t items = p.N * ((p.H + 1) / 2);
  const auto lanes = [](int64_t tiles) { return (tiles + kLanes - 1) / kLanes * kLanes; };
  const int64_t stride = p.tiles + 1, threads = std::max(1, at::get_num_threads());
  const int64_t g = std::min<int64_t>(kWinoBlock / stride, (items + threads - 1) / threads);
  if (g < 2 || g * p.tiles * lanes(p.tiles) <= p.tiles * lanes(g * stride - 1)) return 1;
  const auto busiest = [&](int64_t k) {
    const int64_t rows = (items + k - 1) / k;
    return (rows + threads - 1) / threads * lanes(k * stride - 1);
  };
  int64_t best = g;
  for (int64_t k = g - 1; k >= 2; --k) {
    if (busiest(k) < busiest(best)) best = k;
  }
  return best;
}

// Zeros one packed segment of a packed input row: both halves of every channel over its
// ``stride`` tiles (rows above or below the image, or past the last row pair).
HF_AVX2 void zero_segment(const Problem& v, float* segment, int64_t stride) {
  for (int64_t ci = 0; ci < v.Ci; ++ci) {
    float* a = half_a(v, segment, ci);
    std::fill(a, a + stride, 0.0f);
    std::fill(a + v.half_pitch, a + v.half_pitch + stride, 0.0f);
  }
}

// run_winograd over packed rows: row pair t of the flattened (image, pair) order goes to group
// t / g, segment t % g, whose tiles start at tile (t % g) * (tiles + 1) of the packed row. Every
// segment has its own zero column -1 (its first a-half value, never written) and its zero columns
// past W, as a row of its own would.
void run_winograd_packed(const Problem& p, int64_t g) {
  const int64_t pairs = (p.H + 1) / 2, items = p.N * pairs, stride = p.tiles + 1;
  Problem v = p;  // the packed row's pitches; W, H and everything else as p
  v.tiles = g * stride - 1;
  const int64_t covered = (v.tiles + kWinoBlock - 1) / kWinoBlock * kWinoBlock;
  v.half_pitch = covered + 2 * kLanes;
  v.out_pitch = 2 * covered + kLanes;
  const Period period = make_period(v);
  at::parallel_for(0, (items + g - 1) / g, 1, [&](int64_t begin, int64_t end) {
    const WinoScratch w = wino_scratch(v, 4);  // the packed row's four input rows
    float* rows[4] = {w.slots, w.slots + w.slot, w.slots + 2 * w.slot, w.slots + 3 * w.slot};
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t s = 0; s < g; ++s) {
        const int64_t t = k * g + s, n = t / pairs, y = 2 * (t % pairs);
        for (int i = 0; i < 4; ++i) {
          float* segment = rows[i] + s * stride;
          const int64_t yi = y + i - 1;
          if (t < items && yi >= 0 && yi < p.H) {
            read_input_row_wino(v, p.x + n * p.sn + yi * p.sh, segment);
          } else {
            zero_segment(v, segment, stride);
          }
        }
      }
      wino_rows(v, rows, w.vbuf, w.mbuf, w.orow0, w.orow1);
      for (int64_t s = 0; s < g && k * g + s < items; ++s) {
        const int64_t t = k * g + s;
        write_row_pair(v, w.orow0 + 2 * s * stride, w.orow1 + 2 * s * stride, t / pairs,
                       2 * (t % pairs), period);
      }
    }
  });
}

}  // namespace

void run_avx2(const Problem& p) {
  if (p.u != nullptr) {
    const int64_t g = p.x_rows || p.res_rows || p.out_rows ? 1 : packed_pairs(p);
    if (g > 1) {
      run_winograd_packed(p, g);
    } else {
      run_winograd(p, make_period(p));
    }
    return;
  }
  const Period period = make_period(p);
  const int64_t plane = p.Ci * p.in_pitch;
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    // Three planar input rows (slot = row % 3), a zero row, the planar output row.
    float* scratch = thread_scratch(4 * plane, p.Co * p.out_pitch);
    float* zero_row = scratch + 3 * plane;
    float* orow = scratch + 4 * plane;
    int64_t slot_tag[3] = {-1, -1, -1};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / p.H, y = t % p.H;
      const float* rows[3];
      for (int ky = 0; ky < 3; ++ky) {
        rows[ky] = ring_row<3>(p, n, y + ky - 1, scratch, plane, zero_row, slot_tag, read_input_row);
      }
      conv_row(p, rows, orow);
      write_rows(p, orow, n, y, period);
    }
  });
}

void rows_from_avx2(const Problem& p, float* out) {
  const int64_t row = 2 * p.Ci * p.half_pitch;
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      read_input_row_wino(p, p.x + (k / p.H) * p.sn + (k % p.H) * p.sh, out + k * row);
    }
  });
}

}  // namespace hf_thin

#else
#include <c10/util/Exception.h>

namespace hf_thin {
void run_avx2(const Problem&) { TORCH_CHECK(false, "hrnet_fast_cpu::conv3x3_thin: built without x86-64 AVX2"); }
void rows_from_avx2(const Problem&, float*) {
  TORCH_CHECK(false, "hrnet_fast_cpu::conv3x3_thin_rows_from: built without x86-64 AVX2");
}
}  // namespace hf_thin
#endif

// hrnet_fast CPU kernel: 3x3 stride-1 convolutions of thin layers (w18's 18 to 144 channels), direct
// or Winograd F(2x2, 3x3).
//
//   hrnet_fast_cpu::conv3x3_thin_pack(Tensor weight, bool winograd) -> Tensor
//     weight [Co, Ci, 3, 3] float32 -> direct [Ci][3][3][Co], or Winograd U = G g G^T as
//     [16][Ci][Co] (computed in double, rounded once; on AVX2 each position's Ci x Co matrix in
//     panels of 12 output channels, see kPanelCo). Callers keep it while the weight is unchanged.
//   hrnet_fast_cpu::conv3x3_thin(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, bool relu,
//                                bool channels_last) -> Tensor
//     out = act(conv2d(x, weight, bias, stride=1, padding=1) + residual), a new dense tensor,
//     channels_last or (channels_last=False) contiguous NCHW ("planar"); the packing picks the
//     algorithm.
//   hrnet_fast_cpu::conv3x3_thin_into(Tensor(a!) residual, Tensor x, Tensor packed, Tensor? bias,
//                                     bool relu) -> ()
//     the same with the result written over ``residual`` (dense, either layout). It returns
//     nothing: torch.compile's functionalisation takes no custom op returning an alias.
//   act = ReLU if relu (NaN propagates), else identity.
//   hrnet_fast_cpu::conv3x3_thin_rows_from(Tensor x) -> Tensor
//   hrnet_fast_cpu::conv3x3_thin_rows(Tensor x, Tensor packed, Tensor? bias, Tensor? residual,
//                                     bool relu, int width, bool out_rows) -> Tensor
//   hrnet_fast_cpu::conv3x3_thin_rows_into(Tensor(a!) residual, Tensor x, Tensor packed,
//                                          Tensor? bias, bool relu, int width) -> ()
//     the row-pair format (AVX2 variant, Winograd weights; hf_thin::rows_pitch in
//     cpu_conv_thin.h): x into it; the conv with x strided or row-pair, the residual row-pair or
//     none, the result a new row-pair tensor (out_rows) or channels_last one, or written over the
//     row-pair residual. A branch chain keeps its intermediates in it (TorchCPU._blocks_rows).
//
// Why: oneDNN's convolutions vectorise over output channels, 16 float32 lanes, so an 18-channel
// layer runs 32 lanes of which 14 are padding (measured 123-155 GFLOP/s against 240-316 for 64
// channels, 2 cores). Here the 16 lanes are 16 pixels (direct) or 16 2x2 tiles (Winograd) of one
// output row, so no lane is wasted for any channel count. Input rows are copied once into planar
// rows (channel-major, zero-padded columns; from channels_last by register transposes of 16
// pixels x 16 channels, from NCHW by plain copies); each output row is accumulated planar and then
// written in the output's layout. A chain of these convs (a branch's residual blocks) keeps its
// intermediates planar, so only its first input and last output change layout
// (hrnet_fast/backends/torch_cpu.py: TorchCPU.blocks).
//
// Tensors: CPU float32. x [N, Ci, H, W] and residual [N, Co, H, W] with any strides (channel
// stride 1 is read by transposes, pixel stride 1 by copies, anything else by gathers;
// channels_last, NCHW and channel slices all fit); packed from conv3x3_thin_pack; bias [Co]. The
// output is a new dense tensor (conv3x3_thin) or ``residual`` (conv3x3_thin_into, which must then
// be dense and share no memory with x). Needs AVX-512 or AVX2 (torch's own CPU capability, which
// honours ATEN_CPU_CAPABILITY; the AVX2 variant, with 8-lane vectors and the same operations in
// the same order, is csrc/cpu_conv_thin_avx2.cpp; what the two share is in csrc/cpu_conv_thin.h);
// elsewhere it raises and callers keep oneDNN.
//
// Numerics, per output element, float32 throughout (taps outside the image read 0):
//   direct:   acc = 0;  for ci, ky, kx: acc = fma(x[ci][y+ky-1][x+kx-1], w[co][ci][ky][kx], acc)
//   Winograd: per 2x2 output tile, V = B^T d B (4x4 input tile, adds only), M = sum_ci U V
//             (fma over ci), Y = A^T M A (adds only); see the Winograd section below
//   then acc += bias;  acc += residual;  out = act(acc)
// Both differ from oneDNN's summation order, so results agree with F.conv2d to float32 rounding
// (about 1e-7 relative), not bit for bit. The transforms multiply by no explicit zero, so a NaN
// input reaches exactly the outputs whose 3x3 window holds it, as in F.conv2d.
//
// Work: at::parallel_for over output rows (direct) or row pairs (Winograd); a thread keeps the last
// three (four) planar input rows, so each input row is transposed about once, in scratch kept
// across calls. Register tile: 6 output channels x 64 pixels or tiles (24 zmm accumulators);
// channel and pixel remainders take smaller tiles.
#include <ATen/Parallel.h>
#include <ATen/Version.h>  // at::get_cpu_capability
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_conv_thin.h"
#include "cpu_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HF_THIN_X86 1
#include <immintrin.h>
#define HF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define HF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HF_THIN_X86 0
#endif

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::conv3x3_thin: ";
constexpr int kLanes = 16;     // float32 lanes of a zmm register: pixels per vector
constexpr int kTilePx = 4;     // vectors of pixels per register tile (64 pixels)
static_assert(kLanes * kTilePx == hf_thin::kWinoBlock, "a Winograd block is one register tile row");
static_assert(kLanes == hf_thin::kPeriodPx, "a gathered write's period is one vector of pixels");

using hf_thin::kTileCo;
using hf_thin::kWinoPos;
using hf_thin::Period;
using hf_thin::Problem;
using hf_thin::ring_row;
using hf_thin::thread_scratch;
using hf_thin::with_rest;

#if HF_THIN_X86
// One register tile: CB output channels from co0, R vectors of 16 pixels from x0, written planar
// to orow[co * out_pitch + x]. rows[ky]: the planar input row y + ky - 1 (column x at index x + 1).
template <int CB, int R>
HF_AVX512 HF_ALWAYS_INLINE void tile(const Problem& p, const float* const* rows, int64_t x0,
                                     int64_t co0, float* orow) {
  __m512 acc[CB][R];
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  const int64_t Co = p.Co;
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    for (int ky = 0; ky < 3; ++ky) {
      const float* in = rows[ky] + ci * p.in_pitch + x0;
      const float* wk = p.w + (ci * 3 + ky) * 3 * Co + co0;
      for (int kx = 0; kx < 3; ++kx) {
        __m512 v[R];
        for (int r = 0; r < R; ++r) v[r] = _mm512_loadu_ps(in + kx + kLanes * r);
        for (int c = 0; c < CB; ++c) {
          const __m512 wv = _mm512_set1_ps(wk[kx * Co + c]);
          for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(v[r], wv, acc[c][r]);
        }
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(orow + (co0 + c) * p.out_pitch + x0 + kLanes * r, acc[c][r]);
}

// The channel remainder (Co % kTileCo channels from co0) of one pixel block.
template <int R>
HF_AVX512 HF_ALWAYS_INLINE void tile_rest(const Problem& p, const float* const* rows, int64_t x0,
                                          int64_t co0, float* orow) {
  with_rest(p.Co - co0, [&](auto cb) HF_AVX512 { tile<decltype(cb)::value, R>(p, rows, x0, co0, orow); });
}

// A whole output row, planar, before bias: full 64-pixel blocks, then 16-pixel blocks (the last
// one may reach past W; those lanes read the zero padding and are never written out).
HF_AVX512 void conv_row(const Problem& p, const float* const* rows, float* orow) {
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

HF_AVX512 HF_ALWAYS_INLINE __mmask16 first_lanes(int64_t n) {  // the first min(max(n, 0), 16)
  return n >= kLanes ? static_cast<__mmask16>(0xffff)
                     : static_cast<__mmask16>(n > 0 ? (1u << n) - 1u : 0u);
}

HF_AVX512 HF_ALWAYS_INLINE __m512i lane_times(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// r[i] lane j -> r[j] lane i (a 16x16 float transpose in registers, 64 shuffles).
HF_AVX512 HF_ALWAYS_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Channels c0 .. c0 + 15 of pixels x0 .. x0 + 15 of a row whose channels are adjacent (channel
// stride 1, pixel stride sw): r[j] = channel c0 + j across the 16 pixels; channels and pixels
// past the row (nc, npix) read 0 and are never loaded. One contiguous load per pixel and a
// transpose: about twice as fast as 16 gathers (measured on a 256-channel input row).
HF_AVX512 HF_ALWAYS_INLINE void load_transposed(const float* row, int64_t sw, int64_t x0,
                                                int64_t npix, int64_t c0, int64_t nc,
                                                __m512 r[16]) {
  const __mmask16 m = first_lanes(nc);
  for (int k = 0; k < 16; ++k)
    r[k] = k < npix ? _mm512_maskz_loadu_ps(m, row + (x0 + k) * sw + c0) : _mm512_setzero_ps();
  transpose16(r);
}

// Walks a channels_last row of W pixels and C channels (pixel stride sw) in blocks of 16 pixels x
// 16 channels, read by load_transposed: f(x, lanes of the valid pixels, c0, nc, r) with r[j] =
// channel c0 + j across pixels x .. x + 15.
template <typename F>
HF_AVX512 HF_ALWAYS_INLINE void for_each_transposed(const float* row, int64_t sw, int64_t W,
                                                    int64_t C, F f) {
  for (int64_t x = 0; x < W; x += kLanes) {
    const int64_t npix = std::min<int64_t>(kLanes, W - x);
    const __mmask16 m = first_lanes(npix);
    for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
      const int64_t nc = std::min<int64_t>(kLanes, C - c0);
      __m512 r[16];
      load_transposed(row, sw, x, npix, c0, nc, r);
      f(x, m, c0, nc, r);
    }
  }
}

// planar[ci * in_pitch + 1 + x] = src[ci * sc + x * sw]: a copy per channel where pixels are
// adjacent (NCHW), else a gather per 16 pixels (channels_last).
HF_AVX512 void read_input_row(const Problem& p, const float* src, float* planar) {
  if (p.sc == 1 && p.sw != 1) {  // channels_last: contiguous loads and register transposes
    for_each_transposed(src, p.sw, p.W, p.Ci,
                        [&](int64_t x, __mmask16 m, int64_t c0, int64_t nc, const __m512* r) HF_AVX512 {
      for (int64_t j = 0; j < nc; ++j) _mm512_mask_storeu_ps(planar + (c0 + j) * p.in_pitch + 1 + x, m, r[j]);
    });
    return;
  }
  const __m512i lane_offsets = lane_times(p.sw);
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    float* dst = planar + ci * p.in_pitch + 1;
    const float* row = src + ci * p.sc;
    for (int64_t x = 0; x < p.W; x += kLanes) {
      const __mmask16 m = first_lanes(p.W - x);
      const __m512 v = p.sw == 1 ? _mm512_maskz_loadu_ps(m, row + x)
                                 : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lane_offsets,
                                                            row + x * p.sw, 4);
      _mm512_mask_storeu_ps(dst + x, m, v);
    }
  }
}

// ------------------------------------------------------------------ Winograd F(2x2, 3x3)
// Output tile 2x2 from an input tile 4x4 (rows y-1..y+2, columns 2t-1..2t+2):
//   V = B^T d B,  M[p] = sum_ci U[p][ci][co] * V[p][ci]  (p = 4i + j),  Y = A^T M A
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
//   U = G g G^T with G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] (computed in double, rounded once).
// Planar input rows are stored deinterleaved: per channel, the "a" half holds columns -1, 1, 3, ...
// (index t: column 2t - 1) and the "b" half columns 0, 2, 4, ... (index t: column 2t), so the four
// columns of 16 consecutive tiles are four contiguous loads: a[t], b[t], a[t+1], b[t+1].
// a/b halves of channel ci in a deinterleaved slot.
HF_AVX512 HF_ALWAYS_INLINE float* half_a(const Problem& p, float* slot, int64_t ci) {
  return slot + (2 * ci) * p.half_pitch;
}

HF_AVX512 void read_input_row_wino(const Problem& p, const float* src, float* slot) {
  const __m512i pick_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i pick_odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i two_pixels = lane_times(2 * p.sw);
  const int64_t evens = (p.W + 1) / 2, odds = p.W / 2;
  if (p.sc == 1 && p.sw != 1) {  // channels_last: 32 pixels as two register transposes, then split
    for (int64_t t = 0; t < evens; t += kLanes) {
      const __mmask16 me = first_lanes(evens - t), mo = first_lanes(odds - t);
      const int64_t x = 2 * t, n_lo = std::min<int64_t>(kLanes, p.W - x);
      const int64_t n_hi = std::max<int64_t>(0, std::min<int64_t>(kLanes, p.W - x - kLanes));
      for (int64_t c0 = 0; c0 < p.Ci; c0 += kLanes) {
        const int64_t nc = std::min<int64_t>(kLanes, p.Ci - c0);
        __m512 lo[16], hi[16];
        load_transposed(src, p.sw, x, n_lo, c0, nc, lo);
        load_transposed(src, p.sw, x + kLanes, n_hi, c0, nc, hi);
        for (int64_t j = 0; j < nc; ++j) {
          float* a = half_a(p, slot, c0 + j);
          _mm512_mask_storeu_ps(a + p.half_pitch + t, me, _mm512_permutex2var_ps(lo[j], pick_even, hi[j]));
          _mm512_mask_storeu_ps(a + t + 1, mo, _mm512_permutex2var_ps(lo[j], pick_odd, hi[j]));
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
      const __mmask16 me = first_lanes(evens - t), mo = first_lanes(odds - t);
      __m512 even, odd;
      if (p.sw == 1) {
        const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(p.W - 2 * t), row + 2 * t);
        const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(p.W - 2 * t - kLanes), row + 2 * t + kLanes);
        even = _mm512_permutex2var_ps(lo, pick_even, hi);
        odd = _mm512_permutex2var_ps(lo, pick_odd, hi);
      } else {
        even = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), me, two_pixels, row + 2 * t * p.sw, 4);
        odd = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mo, two_pixels, row + (2 * t + 1) * p.sw, 4);
      }
      _mm512_mask_storeu_ps(b + t, me, even);
      _mm512_mask_storeu_ps(a + t + 1, mo, odd);
    }
  }
}

// V for R vectors of 16 tiles from t0, every input channel: vbuf[p][ci][16 R].
template <int R>
HF_AVX512 void input_transform(const Problem& p, float* const* rows, int64_t t0, float* vbuf) {
  const int64_t vstride = p.Ci * kLanes * R;  // floats per position
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    for (int r = 0; r < R; ++r) {
      const int64_t t = t0 + kLanes * r;
      __m512 d[4][4], row_t[4][4];
      for (int i = 0; i < 4; ++i) {
        const float* a = half_a(p, rows[i], ci);
        const float* b = a + p.half_pitch;
        d[i][0] = _mm512_loadu_ps(a + t);
        d[i][1] = _mm512_loadu_ps(b + t);
        d[i][2] = _mm512_loadu_ps(a + t + 1);
        d[i][3] = _mm512_loadu_ps(b + t + 1);
        row_t[i][0] = _mm512_sub_ps(d[i][0], d[i][2]);
        row_t[i][1] = _mm512_add_ps(d[i][1], d[i][2]);
        row_t[i][2] = _mm512_sub_ps(d[i][2], d[i][1]);
        row_t[i][3] = _mm512_sub_ps(d[i][1], d[i][3]);
      }
      float* v = vbuf + ci * kLanes * R + kLanes * r;
      for (int j = 0; j < 4; ++j) {
        _mm512_storeu_ps(v + (0 * 4 + j) * vstride, _mm512_sub_ps(row_t[0][j], row_t[2][j]));
        _mm512_storeu_ps(v + (1 * 4 + j) * vstride, _mm512_add_ps(row_t[1][j], row_t[2][j]));
        _mm512_storeu_ps(v + (2 * 4 + j) * vstride, _mm512_sub_ps(row_t[2][j], row_t[1][j]));
        _mm512_storeu_ps(v + (3 * 4 + j) * vstride, _mm512_sub_ps(row_t[1][j], row_t[3][j]));
      }
    }
  }
}

// M[pos] for CB output channels from co0 and R vectors of tiles: mbuf[pos][co][16 R].
template <int CB, int R>
HF_AVX512 HF_ALWAYS_INLINE void wino_gemm(const Problem& p, const float* v, const float* u,
                                          int64_t co0, float* m) {
  __m512 acc[CB][R];
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t ci = 0; ci < p.Ci; ++ci) {
    __m512 vv[R];
    for (int r = 0; r < R; ++r) vv[r] = _mm512_loadu_ps(v + ci * kLanes * R + kLanes * r);
    for (int c = 0; c < CB; ++c) {
      const __m512 uc = _mm512_set1_ps(u[ci * p.Co + co0 + c]);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(vv[r], uc, acc[c][r]);
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(m + (co0 + c) * kLanes * R + kLanes * r, acc[c][r]);
}

// Y = A^T M A for every output channel into the planar output rows orow0 (row y) and orow1
// (row y + 1), columns 2t and 2t + 1 interleaved.
template <int R>
HF_AVX512 void output_transform(const Problem& p, const float* mbuf, int64_t t0, float* orow0,
                                float* orow1) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t mstride = p.Co * kLanes * R;  // floats per position
  for (int64_t co = 0; co < p.Co; ++co) {
    for (int r = 0; r < R; ++r) {
      const float* mp = mbuf + co * kLanes * R + kLanes * r;
      __m512 m[16];
      for (int pos = 0; pos < kWinoPos; ++pos) m[pos] = _mm512_loadu_ps(mp + pos * mstride);
      __m512 s[4], d[4];  // A^T over the rows of M: s = rows 0+1+2, d = rows 1-2-3
      for (int j = 0; j < 4; ++j) {
        s[j] = _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]);
        d[j] = _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]);
      }
      const __m512 y00 = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]);
      const __m512 y01 = _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]);
      const __m512 y10 = _mm512_add_ps(_mm512_add_ps(d[0], d[1]), d[2]);
      const __m512 y11 = _mm512_sub_ps(_mm512_sub_ps(d[1], d[2]), d[3]);
      const int64_t x = 2 * (t0 + kLanes * r);
      float* o0 = orow0 + co * p.out_pitch + x;
      float* o1 = orow1 + co * p.out_pitch + x;
      _mm512_storeu_ps(o0, _mm512_permutex2var_ps(y00, lo_idx, y01));
      _mm512_storeu_ps(o0 + kLanes, _mm512_permutex2var_ps(y00, hi_idx, y01));
      _mm512_storeu_ps(o1, _mm512_permutex2var_ps(y10, lo_idx, y11));
      _mm512_storeu_ps(o1 + kLanes, _mm512_permutex2var_ps(y10, hi_idx, y11));
    }
  }
}

// One block of 16 R tiles: V for every input channel, then per position the products for every
// output channel (V[pos] stays in L1 across the output channel tiles), then Y.
template <int R>
HF_AVX512 void wino_block(const Problem& p, float* const* rows, int64_t t0, float* vbuf,
                          float* mbuf, float* orow0, float* orow1) {
  input_transform<R>(p, rows, t0, vbuf);
  const int64_t co_full = p.Co / kTileCo * kTileCo;
  for (int pos = 0; pos < kWinoPos; ++pos) {
    const float* v = vbuf + pos * p.Ci * kLanes * R;
    const float* u = p.u + pos * p.Ci * p.Co;
    float* m = mbuf + pos * p.Co * kLanes * R;
    for (int64_t co = 0; co < co_full; co += kTileCo) wino_gemm<kTileCo, R>(p, v, u, co, m);
    with_rest(p.Co - co_full,
              [&](auto cb) HF_AVX512 { wino_gemm<decltype(cb)::value, R>(p, v, u, co_full, m); });
  }
  output_transform<R>(p, mbuf, t0, orow0, orow1);
}

// Two planar output rows (y, y + 1) before bias, from the four deinterleaved input rows.
HF_AVX512 void wino_rows(const Problem& p, float* const* rows, float* vbuf, float* mbuf,
                         float* orow0, float* orow1) {
  constexpr int64_t block = kLanes * kTilePx;
  const int64_t full = p.tiles / block * block;
  for (int64_t t0 = 0; t0 < full; t0 += block) wino_block<kTilePx>(p, rows, t0, vbuf, mbuf, orow0, orow1);
  int64_t t0 = full;
  if (p.tiles - t0 > kLanes) {  // 17-63 tiles left: one block of 32 (w18's 72 channels: 32 tiles)
    wino_block<2>(p, rows, t0, vbuf, mbuf, orow0, orow1);
    t0 += 2 * kLanes;
  }
  for (; t0 < p.tiles; t0 += kLanes) wino_block<1>(p, rows, t0, vbuf, mbuf, orow0, orow1);
}

// out row = act(planar row + bias + residual row), channels_last: W * Co floats, gathered from the
// planar row one period at a time; the residual is loaded directly when it is dense channels_last.
HF_AVX512 void write_row_channels_last_gathered(const Problem& p, const float* orow,
                                                const Period& period, const float* res, float* out) {
  const int64_t total = p.W * p.Co;
  const bool res_dense = p.rc == 1 && p.rw == p.Co;
  const __m512 zero = _mm512_setzero_ps();
  int64_t f = 0;
  for (int64_t k = 0; f < total; ++k) {
    const float* src = orow + kLanes * k;
    const float* res_period = res != nullptr ? res + kLanes * k * p.rw : nullptr;
    for (int64_t j = 0; j < p.Co && f < total; ++j, f += kLanes) {
      const __mmask16 m = first_lanes(total - f);
      const __m512i idx = _mm512_loadu_si512(period.planar_index.data() + kLanes * j);
      __m512 v = _mm512_mask_i32gather_ps(zero, m, idx, src, 4);
      v = _mm512_add_ps(v, _mm512_loadu_ps(period.bias.data() + kLanes * j));
      if (res != nullptr) {
        v = _mm512_add_ps(v, res_dense ? _mm512_maskz_loadu_ps(m, res + f)
                                       : _mm512_mask_i32gather_ps(
                                             zero, m,
                                             _mm512_loadu_si512(period.residual_index.data() + kLanes * j),
                                             res_period, 4));
      }
      if (p.relu) v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
      _mm512_mask_storeu_ps(out + f, m, v);
    }
  }
}

// out row = act(planar row + bias + residual row), channels_last, by register transposes of 16
// channels x 16 pixels: a planar residual (pixel stride 1) is added before the transpose, a
// channels_last one (channel stride 1) after it; any other residual takes the gathers above.
HF_AVX512 void write_row_channels_last(const Problem& p, const float* orow, const Period& period,
                                       const float* res, float* out) {
  const bool res_planar = res != nullptr && p.rw == 1;
  if (res != nullptr && !res_planar && p.rc != 1) {
    write_row_channels_last_gathered(p, orow, period, res, out);
    return;
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t x = 0; x < p.W; x += kLanes) {
    const int64_t npix = std::min<int64_t>(kLanes, p.W - x);
    const __mmask16 mp = first_lanes(npix);
    for (int64_t c0 = 0; c0 < p.Co; c0 += kLanes) {
      const int64_t nc = std::min<int64_t>(kLanes, p.Co - c0);
      const __mmask16 mc = first_lanes(nc);
      __m512 r[16];
      for (int64_t j = 0; j < 16; ++j) {
        if (j >= nc) {
          r[j] = zero;
          continue;
        }
        r[j] = _mm512_loadu_ps(orow + (c0 + j) * p.out_pitch + x);
        if (res_planar) r[j] = _mm512_add_ps(r[j], _mm512_maskz_loadu_ps(mp, res + (c0 + j) * p.rc + x));
      }
      transpose16(r);  // r[k]: pixel x + k, channels c0 ..
      const __m512 b = p.bias != nullptr ? _mm512_maskz_loadu_ps(mc, p.bias + c0) : zero;
      for (int64_t k = 0; k < npix; ++k) {
        __m512 v = _mm512_add_ps(r[k], b);
        if (res != nullptr && !res_planar) {
          v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mc, res + (x + k) * p.rw + c0));
        }
        if (p.relu) v = _mm512_max_ps(zero, v);
        _mm512_mask_storeu_ps(out + (x + k) * p.Co + c0, mc, v);
      }
    }
  }
}

// out row = act(planar row + bias + residual row), planar: channel co's W floats at co * H * W.
// A channels_last residual (channel stride 1) is read by register transposes, any other
// non-planar one by gathers.
HF_AVX512 void write_row_planar(const Problem& p, const float* orow, const float* res, float* out) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = p.H * p.W;
  if (res != nullptr && p.rw != 1 && p.rc == 1) {
    for_each_transposed(res, p.rw, p.W, p.Co,
                        [&](int64_t x, __mmask16 m, int64_t c0, int64_t nc, const __m512* r) HF_AVX512 {
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t co = c0 + j;
        const __m512 b = _mm512_set1_ps(p.bias != nullptr ? p.bias[co] : 0.0f);
        __m512 v = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(orow + co * p.out_pitch + x), b), r[j]);
        if (p.relu) v = _mm512_max_ps(zero, v);
        _mm512_mask_storeu_ps(out + co * plane + x, m, v);
      }
    });
    return;
  }
  const __m512i res_offsets = lane_times(p.rw);
  for (int64_t co = 0; co < p.Co; ++co) {
    const __m512 b = _mm512_set1_ps(p.bias != nullptr ? p.bias[co] : 0.0f);
    const float* src = orow + co * p.out_pitch;
    const float* r = res != nullptr ? res + co * p.rc : nullptr;
    float* dst = out + co * plane;
    for (int64_t x = 0; x < p.W; x += kLanes) {
      const __mmask16 m = first_lanes(p.W - x);
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(src + x), b);
      if (r != nullptr) {
        v = _mm512_add_ps(v, p.rw == 1 ? _mm512_maskz_loadu_ps(m, r + x)
                                       : _mm512_mask_i32gather_ps(zero, m, res_offsets, r + x * p.rw, 4));
      }
      if (p.relu) v = _mm512_max_ps(zero, v);
      _mm512_mask_storeu_ps(dst + x, m, v);
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

void run_winograd(const Problem& p, const Period& period) {
  const int64_t pairs = (p.H + 1) / 2;
  const int64_t slot = 2 * p.Ci * p.half_pitch;
  const int64_t vsize = kWinoPos * p.Ci * kLanes * kTilePx;
  const int64_t msize = kWinoPos * p.Co * kLanes * kTilePx;
  at::parallel_for(0, p.N * pairs, 1, [&](int64_t begin, int64_t end) {
    // Four deinterleaved input rows (slot = row % 4), a zero row, V and M blocks, two output rows.
    float* scratch = thread_scratch(5 * slot, vsize + msize + 2 * p.Co * p.out_pitch);
    float* zero_row = scratch + 4 * slot;
    float* vbuf = zero_row + slot;
    float* mbuf = vbuf + vsize;
    float* orow0 = mbuf + msize;
    float* orow1 = orow0 + p.Co * p.out_pitch;
    int64_t slot_tag[4] = {-1, -1, -1, -1};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / pairs, y = 2 * (t % pairs);
      float* rows[4];
      for (int i = 0; i < 4; ++i) {
        rows[i] = ring_row<4>(p, n, y + i - 1, scratch, slot, zero_row, slot_tag,
                              read_input_row_wino);
      }
      wino_rows(p, rows, vbuf, mbuf, orow0, orow1);
      write_rows(p, orow0, n, y, period);
      if (y + 1 < p.H) write_rows(p, orow1, n, y + 1, period);
    }
  });
}

void run_avx512(const Problem& p) {
  const int64_t Co = p.Co;
  const Period period = hf_thin::make_period(p);
  if (p.u != nullptr) {
    run_winograd(p, period);
    return;
  }
  const int64_t plane = p.Ci * p.in_pitch;
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    // Three planar input rows (slot = row % 3), a zero row for the padding above and below, and
    // the planar output row. Zero-initialised: the padding columns are never written.
    float* scratch = thread_scratch(4 * plane, Co * p.out_pitch);
    float* zero_row = scratch + 3 * plane;
    float* orow = scratch + 4 * plane;
    int64_t slot_tag[3] = {-1, -1, -1};  // which (n * H + row) each slot holds
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / p.H, y = t % p.H;
      const float* rows[3];
      for (int ky = 0; ky < 3; ++ky) {
        rows[ky] = ring_row<3>(p, n, y + ky - 1, scratch, plane, zero_row, slot_tag,
                               read_input_row);
      }
      conv_row(p, rows, orow);
      write_rows(p, orow, n, y, period);
    }
  });
}
#endif

using hf_isa::Isa;

// Which variant runs here (torch's CPU capability); none without x86-64.
bool thin_supported() { return HF_THIN_X86 && hf_isa::cpu_isa() != Isa::Default; }

void run(const Problem& p) {
#if HF_THIN_X86
  if (hf_isa::cpu_isa() == Isa::Avx512) return run_avx512(p);
  if (hf_isa::cpu_isa() == Isa::Avx2) return hf_thin::run_avx2(p);
#endif
  TORCH_CHECK(false, kOp, "needs x86-64 AVX2 or AVX-512");
}

// Gathers take 32-bit element offsets: 16 pixels (and, for the residual, Co channels) of a row.
bool gather_offsets_fit(int64_t channels, int64_t channel_stride, int64_t pixel_stride) {
  return (channels - 1) * channel_stride + (kLanes - 1) * pixel_stride < (int64_t{1} << 31);
}

// The packed weight's algorithm and widths: direct [Ci][3][3][Co] or Winograd [16][Ci][Co].
struct Packed {
  bool winograd;
  int64_t ci, co;
};

Packed packed_shape(const at::Tensor& packed) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  ((packed.dim() == 4 && packed.size(1) == 3 && packed.size(2) == 3) ||
                   (packed.dim() == 3 && packed.size(0) == kWinoPos)),
              kOp, "packed must come from conv3x3_thin_pack (float32 [Ci, 3, 3, Co] or [16, Ci, Co], "
              "contiguous, on the CPU), got ", packed.scalar_type(), " ", packed.sizes());
  const bool wino = packed.dim() == 3;
  return {wino, wino ? packed.size(1) : packed.size(0), wino ? packed.size(2) : packed.size(3)};
}

void check_args(const at::Tensor& x, const Packed& w, const c10::optional<at::Tensor>& bias,
                const at::Tensor* residual) {
  TORCH_CHECK(thin_supported(), kOp, "needs AVX2 or AVX-512 (torch reports CPU capability ",
              at::get_cpu_capability(), ")");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, kOp,
              "x must be a 4-d float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(gather_offsets_fit(1, 0, 2 * x.stride(3)), kOp, "x's pixel stride ", x.stride(3),
              " is too large for 32-bit gather offsets");
  TORCH_CHECK(w.ci == x.size(1), kOp, "the packed weight takes ", w.ci, " input channels, x has ",
              x.size(1));
  const int64_t co = w.co;
  TORCH_CHECK(co > 0 && x.size(1) > 0, kOp, "empty channel dimension");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == co,
                kOp, "bias must be float32 [", co, "] on the CPU, got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  if (residual != nullptr) {
    const auto& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat && r.dim() == 4 &&
                    r.size(0) == x.size(0) && r.size(1) == co && r.size(2) == x.size(2) &&
                    r.size(3) == x.size(3),
                kOp, "residual must be float32 [", x.size(0), ", ", co, ", ", x.size(2), ", ",
                x.size(3), "] on the CPU, got ", r.scalar_type(), " ", r.sizes());
    TORCH_CHECK(gather_offsets_fit(co, r.stride(1), r.stride(3)), kOp, "residual's strides ",
                r.strides(), " are too large for 32-bit gather offsets");
  }
}

// U = G g G^T per (co, ci), in double, stored [16][Ci][Co] float32.
at::Tensor winograd_weights(const at::Tensor& weight) {
  const at::Tensor g = weight.to(at::kDouble).contiguous();
  const int64_t co_n = g.size(0), ci_n = g.size(1);
  at::Tensor u = at::empty({kWinoPos, ci_n, co_n}, weight.options().dtype(at::kFloat));
  const double* gp = g.data_ptr<double>();
  float* up = u.data_ptr<float>();
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  for (int64_t co = 0; co < co_n; ++co) {
    for (int64_t ci = 0; ci < ci_n; ++ci) {
      const double* k = gp + (co * ci_n + ci) * 9;
      double gk[4][3];
      for (int i = 0; i < 4; ++i)
        for (int l = 0; l < 3; ++l) gk[i][l] = G[i][0] * k[l] + G[i][1] * k[3 + l] + G[i][2] * k[6 + l];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          up[((i * 4 + j) * ci_n + ci) * co_n + co] =
              static_cast<float>(gk[i][0] * G[j][0] + gk[i][1] * G[j][1] + gk[i][2] * G[j][2]);
    }
  }
  return u;
}

// [16][Ci][Co] -> each position's matrix in the AVX2 variant's panels (kPanelCo, cpu_conv_thin.h).
at::Tensor panelled(const at::Tensor& u) {
  const int64_t ci_n = u.size(1), co_n = u.size(2);
  at::Tensor out = at::empty(u.sizes(), u.options());
  const float* src = u.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t pos = 0; pos < kWinoPos; ++pos) {
    const float* s = src + pos * ci_n * co_n;
    float* d = dst + pos * ci_n * co_n;
    for (int64_t ci = 0; ci < ci_n; ++ci) {
      for (int64_t co = 0; co < co_n; ++co) {
        int64_t stride;
        d[hf_thin::panel_offset(ci_n, co_n, ci, co, &stride)] = s[ci * co_n + co];
      }
    }
  }
  return out;
}

at::Tensor conv3x3_thin_pack(const at::Tensor& weight, bool winograd) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(2) == 3 && weight.size(3) == 3 && weight.size(0) > 0 && weight.size(1) > 0,
              "hrnet_fast_cpu::conv3x3_thin_pack: weight must be float32 [Co, Ci, 3, 3] on the CPU, "
              "got ", weight.scalar_type(), " ", weight.sizes());
  if (!winograd) return weight.permute({1, 2, 3, 0}).contiguous();
  at::Tensor u = winograd_weights(weight);
#if HF_THIN_X86
  if (hf_isa::cpu_isa() == Isa::Avx2) u = panelled(u);
#endif
  return u;
}

// The Problem of a conv of x (strided [N, Ci, H, W], or with x_rows a row-pair tensor of height
// H and width W) with the packed weight, bias b (contiguous, or undefined for none) and output
// out: everything but the residual and the output layout, which the callers set.
Problem describe_conv(const at::Tensor& x, bool x_rows, int64_t H, int64_t W,
                      const at::Tensor& packed, const Packed& w, const at::Tensor& b, bool relu,
                      at::Tensor& out) {
  Problem p;
  p.N = x.size(0);
  p.Ci = w.ci;
  p.H = H;
  p.W = W;
  p.Co = w.co;
  p.x = x.data_ptr<float>();
  p.sn = x_rows ? 0 : x.stride(0);
  p.sc = x_rows ? 0 : x.stride(1);
  p.sh = x_rows ? 0 : x.stride(2);
  p.sw = x_rows ? 0 : x.stride(3);
  p.w = w.winograd ? nullptr : packed.data_ptr<float>();
  p.u = w.winograd ? packed.data_ptr<float>() : nullptr;
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.res = nullptr;
  p.rn = p.rc = p.rh = p.rw = 0;
  p.out = out.data_ptr<float>();
  p.out_channels_last = true;
  p.relu = relu;
  const int64_t w16 = (p.W + kLanes - 1) / kLanes * kLanes;
  p.in_pitch = w16 + 2 * kLanes;  // 1 left pad + W + right pads covering a tile's overreach
  p.out_pitch = w16 + kLanes;
  p.tiles = (p.W + 1) / 2;
  if (w.winograd) {  // blocks of up to 64 tiles; the last may reach past W (zero input, not written)
    const int64_t block = hf_thin::kWinoBlock;
    const int64_t covered = (p.tiles + block - 1) / block * block;
    p.half_pitch = covered + 2 * kLanes;
    p.out_pitch = 2 * covered + kLanes;
  }
  return p;
}

at::Tensor compute(const at::Tensor& x, const at::Tensor& packed, const Packed& w,
                   const c10::optional<at::Tensor>& bias, const at::Tensor* residual, bool relu,
                   at::Tensor out, bool out_channels_last) {
  if (out.numel() == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Problem p = describe_conv(x, false, x.size(2), x.size(3), packed, w, b, relu, out);
  if (residual != nullptr) {
    p.res = residual->data_ptr<float>();
    p.rn = residual->stride(0);
    p.rc = residual->stride(1);
    p.rh = residual->stride(2);
    p.rw = residual->stride(3);
  }
  p.out_channels_last = out_channels_last;
  run(p);
  return out;
}

at::Tensor conv3x3_thin(const at::Tensor& x, const at::Tensor& packed,
                        const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& residual, bool relu, bool channels_last) {
  const Packed w = packed_shape(packed);
  check_args(x, w, bias, residual.has_value() ? &*residual : nullptr);
  at::Tensor out = at::empty({x.size(0), w.co, x.size(2), x.size(3)},
                             x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  return compute(x, packed, w, bias, residual.has_value() ? &*residual : nullptr, relu, out,
                 channels_last);
}

void conv3x3_thin_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, bool relu) {
  const Packed w = packed_shape(packed);
  check_args(x, w, bias, &residual);
  const bool channels_last = residual.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || residual.is_contiguous(), kOp,
              "residual (written in place) must be dense channels_last or NCHW, got strides ",
              residual.strides());
  // Rows are written while later rows are still read: the result may not share x's memory.
  TORCH_CHECK(!residual.storage().is_alias_of(x.storage()), kOp,
              "residual (written in place) must not share memory with x");
  compute(x, packed, w, bias, &residual, relu, residual, channels_last);
}

// ------------------------------------------------------------------ the row-pair format
// A branch chain's intermediates in the layout the AVX2 Winograd kernel reads its input rows in
// (hf_thin::rows_pitch, cpu_conv_thin.h): a conv reading one copies nothing, a conv writing one
// stores each tile's two columns where they go with the epilogue applied in registers.
constexpr const char* kRowsOp = "hrnet_fast_cpu::conv3x3_thin_rows: ";

void check_rows_supported() {
  TORCH_CHECK(HF_THIN_X86 && hf_isa::cpu_isa() == Isa::Avx2, kRowsOp,
              "the row-pair format is the AVX2 variant's (torch reports CPU capability ",
              at::get_cpu_capability(), ")");
}

// A row-pair tensor of a [N, C, H, W] tensor: float32 [N, H, C, 2, rows_pitch(W)], contiguous.
void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t pitch = hf_thin::rows_pitch(W);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 5 &&
                  t.is_contiguous() && t.size(0) == N && t.size(1) == H && t.size(2) == C &&
                  t.size(3) == 2 && t.size(4) == pitch,
              kRowsOp, name, " must be a contiguous float32 CPU row-pair tensor [", N, ", ", H, ", ",
              C, ", 2, ", pitch, "] (width ", W, "), got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
}

void check_strided_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, op,
              "x must be a 4-d float32 CPU tensor or a row-pair tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(gather_offsets_fit(1, 0, 2 * x.stride(3)), op, "x's pixel stride ", x.stride(3),
              " is too large for 32-bit gather offsets");
}

at::Tensor conv3x3_thin_rows_from(const at::Tensor& x) {
  constexpr const char* op = "hrnet_fast_cpu::conv3x3_thin_rows_from: ";
  check_rows_supported();
  check_strided_input(x, op);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::zeros({N, H, C, 2, hf_thin::rows_pitch(W)},
                             x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 || W == 0) return out;
  Problem p;
  p.N = N;
  p.H = H;
  p.W = W;
  p.Ci = C;
  p.Co = C;
  p.x = x.data_ptr<float>();
  p.sn = x.stride(0);
  p.sc = x.stride(1);
  p.sh = x.stride(2);
  p.sw = x.stride(3);
  p.half_pitch = hf_thin::rows_pitch(W);
  hf_thin::rows_from_avx2(p, out.data_ptr<float>());
  return out;
}

// out (a row-pair tensor, or a new channels_last [N, Co, H, W] one) = act(conv(x) + bias +
// residual) with x strided or row-pair and the residual row-pair or none.
void compute_rows(const at::Tensor& x, bool x_rows, int64_t H, int64_t W,
                  const at::Tensor& packed, const Packed& w, const c10::optional<at::Tensor>& bias,
                  const at::Tensor* residual, bool relu, at::Tensor& out, bool out_rows) {
  if (out.numel() == 0 || W == 0) return;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Problem p = describe_conv(x, x_rows, H, W, packed, w, b, relu, out);
  p.res = residual != nullptr ? residual->data_ptr<float>() : nullptr;  // row-pair
  p.out_channels_last = !out_rows;
  p.x_rows = x_rows;
  p.res_rows = residual != nullptr;
  p.out_rows = out_rows;
  p.half_pitch = hf_thin::rows_pitch(W);
  hf_thin::run_avx2(p);
}

// The checks both row-pair conv ops share; returns x's height (x strided or row-pair).
int64_t check_rows_conv(const at::Tensor& x, const Packed& w, const c10::optional<at::Tensor>& bias,
                        const at::Tensor* residual, int64_t width) {
  check_rows_supported();
  TORCH_CHECK(w.winograd, kRowsOp,
              "the row-pair format takes Winograd weights (conv3x3_thin_pack(weight, winograd=True))");
  int64_t H;
  if (x.dim() == 5) {
    H = x.size(1);
    TORCH_CHECK(width >= 0, kRowsOp, "width must be >= 0, got ", width);
    check_rows(x, "x", x.size(0), w.ci, H, width);
  } else {
    check_strided_input(x, kRowsOp);
    H = x.size(2);
    TORCH_CHECK(width == x.size(3), kRowsOp, "width ", width, " does not match x's ", x.size(3));
    TORCH_CHECK(w.ci == x.size(1), kRowsOp, "the packed weight takes ", w.ci,
                " input channels, x has ", x.size(1));
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == w.co,
                kRowsOp, "bias must be float32 [", w.co, "] on the CPU, got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  if (residual != nullptr) check_rows(*residual, "residual", x.size(0), w.co, H, width);
  return H;
}

at::Tensor conv3x3_thin_rows(const at::Tensor& x, const at::Tensor& packed,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& residual, bool relu, int64_t width,
                             bool out_rows) {
  const Packed w = packed_shape(packed);
  const at::Tensor* res = residual.has_value() ? &*residual : nullptr;
  const int64_t H = check_rows_conv(x, w, bias, res, width);
  const int64_t N = x.size(0);
  at::Tensor out = out_rows ? at::empty({N, H, w.co, 2, hf_thin::rows_pitch(width)},
                                        x.options().memory_format(at::MemoryFormat::Contiguous))
                            : at::empty({N, w.co, H, width},
                                        x.options().memory_format(at::MemoryFormat::ChannelsLast));
  compute_rows(x, x.dim() == 5, H, width, packed, w, bias, res, relu, out, out_rows);
  return out;
}

void conv3x3_thin_rows_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& packed,
                            const c10::optional<at::Tensor>& bias, bool relu, int64_t width) {
  const Packed w = packed_shape(packed);
  const int64_t H = check_rows_conv(x, w, bias, &residual, width);
  // Rows are written while later rows are still read: the result may not share x's memory.
  TORCH_CHECK(!residual.storage().is_alias_of(x.storage()), kRowsOp,
              "residual (written in place) must not share memory with x");
  compute_rows(x, x.dim() == 5, H, width, packed, w, bias, &residual, relu, residual, true);
}

}  // namespace

// ------------------------------------------------------------------ shared by the variants
namespace hf_thin {

Period make_period(const Problem& p) {
  const int64_t n = int64_t{kPeriodPx} * p.Co;
  Period period;
  period.planar_index.resize(n);
  period.residual_index.resize(n);
  period.bias.resize(n);
  for (int64_t f = 0; f < n; ++f) {
    const int64_t co = f % p.Co, x = f / p.Co;
    period.planar_index[f] = static_cast<int32_t>(co * p.out_pitch + x);
    period.residual_index[f] = static_cast<int32_t>(co * p.rc + x * p.rw);
    period.bias[f] = p.bias != nullptr ? p.bias[co] : 0.0f;
  }
  return period;
}

// This thread's scratch, kept across calls (torch's threads persist; a fresh 0.1-1 MB allocation
// per call cost 20-200 us in page faults and zeroing): ``zeroed`` floats set to zero (input rows,
// whose padding columns must read 0), then ``more`` floats as they are (written before read).
float* thread_scratch(int64_t zeroed, int64_t more) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < zeroed + more) buffer.resize(zeroed + more);
  std::fill(buffer.begin(), buffer.begin() + zeroed, 0.0f);
  return buffer.data();
}

}  // namespace hf_thin

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def("conv3x3_thin_pack(Tensor weight, bool winograd) -> Tensor");
  m.def(
      "conv3x3_thin(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, bool relu, "
      "bool channels_last=True) -> Tensor");
  m.def(
      "conv3x3_thin_into(Tensor(a!) residual, Tensor x, Tensor packed, Tensor? bias, bool relu) "
      "-> ()");
  m.def("conv3x3_thin_rows_from(Tensor x) -> Tensor");
  m.def(
      "conv3x3_thin_rows(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, bool relu, "
      "int width, bool out_rows) -> Tensor");
  m.def(
      "conv3x3_thin_rows_into(Tensor(a!) residual, Tensor x, Tensor packed, Tensor? bias, "
      "bool relu, int width) -> ()");
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) {
  m.impl("conv3x3_thin_pack", &conv3x3_thin_pack);
  m.impl("conv3x3_thin", &conv3x3_thin);
  m.impl("conv3x3_thin_into", &conv3x3_thin_into);
  m.impl("conv3x3_thin_rows_from", &conv3x3_thin_rows_from);
  m.impl("conv3x3_thin_rows", &conv3x3_thin_rows);
  m.impl("conv3x3_thin_rows_into", &conv3x3_thin_rows_into);
}

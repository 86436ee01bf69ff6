// hrnet_fast CPU kernel: what the thin-layer conv's instruction-set variants share
// (csrc/cpu_conv_thin.cpp: the op, its checks and the AVX-512 variant; csrc/cpu_conv_thin_avx2.cpp:
// the AVX2 + FMA variant). Both compute the same math in the same summation order (see the op's
// header comment), so their outputs agree to float32 rounding (bit for bit unless the compiler
// contracts a multiply and an add differently; tests/test_cpu_isa_variants.py compares them on
// an AVX-512 CPU); only the vector width differs.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#define HF_THIN_ALWAYS_INLINE inline __attribute__((always_inline))

namespace hf_thin {

constexpr int kTileCo = 6;      // output channels per register tile
constexpr int kWinoPos = 16;    // Winograd F(2x2, 3x3): positions of a 4x4 transformed tile
constexpr int kPeriodPx = 16;   // pixels per period of the gathered channels_last write's tables
constexpr int kWinoBlock = 64;  // Winograd tiles per block (the caller's pitches cover whole blocks)

// The AVX2 variant's Winograd weights: each position's Ci x Co matrix as panels of kPanelCo output
// channels, panel k = channels [12k, 12k + w_k) with w_k = min(12, Co - 12k), stored [ci][w_k] at
// 12k * Ci; a register tile of 4, 6 or 12 channels (its start a multiple of its width, or the last
// channels) lies in one panel and reads it as a contiguous stream. The row-major [Ci][Co] form
// made a tile's Ci broadcasts Co * 4 bytes apart: for Co a multiple of 64 those lines fall in a few
// L1 sets and come from L2 every time. Panels against [Ci][Co], same process, alternating, Zen 3,
// 2 threads: 256 channels at 8x8x6 1.38x, 384 at 16x32 1.34x, 144 at 16x32 1.19x, 192 at 32x64
// 1.16x, 96 at 64x128 1.07x, 18-64 channels 0.98-1.03x; whole models 1.035x (w18 seg 512x1024) to
// 1.07x (w48 seg, w32 pose). The AVX-512 variant reads [Ci][Co] (not measured there, so not
// changed). conv3x3_thin_pack writes the order of the variant this process runs.
constexpr int kPanelCo = 12;
// Offset of (ci, co0) in a panelled Ci x Co matrix, and that panel's row length (ci stride).
HF_THIN_ALWAYS_INLINE int64_t panel_offset(int64_t Ci, int64_t Co, int64_t ci, int64_t co0,
                                           int64_t* stride) {
  const int64_t first = co0 / kPanelCo * kPanelCo;
  *stride = Co - first < kPanelCo ? Co - first : kPanelCo;
  return first * Ci + ci * *stride + (co0 - first);
}

struct Problem {
  int64_t N, H, W, Ci, Co;
  const float* x;
  int64_t sn, sc, sh, sw;      // x's element strides
  const float* w;              // packed [Ci][3][3][Co]
  const float* bias;           // [Co] or null
  const float* res;            // [N, Co, H, W] or null
  int64_t rn, rc, rh, rw;      // residual's element strides
  float* out;                  // dense [N, Co, H, W] (may be res)
  bool out_channels_last;      // else planar (contiguous NCHW)
  bool relu;
  int64_t in_pitch;    // floats per planar input channel row: 1 + W + zero padding
  int64_t out_pitch;   // floats per planar output channel row
  // Winograd F(2x2, 3x3)
  const float* u;      // transformed weights [16][Ci][Co] (AVX2: panels, see kPanelCo)
  int64_t tiles;       // 2-pixel tiles per row: ceil(W / 2)
  int64_t half_pitch;  // floats per half (even or odd columns) of a planar input channel row
  // The row-pair format ("rows", AVX2 Winograd only; see rows_pitch): x, the residual and the
  // output may each be a rows tensor instead of a strided [N, C, H, W] one.
  bool x_rows = false, res_rows = false, out_rows = false;
};

// The row-pair format: a thin chain's intermediates stored as the AVX2 Winograd kernel reads its
// input rows, so that a conv reading one copies nothing and a conv writing one stores its two
// output columns of each tile where they go (no interleaving, no planar row, no separate pass for
// bias, residual and ReLU). A [N, C, H, W] tensor in this format is float32 [N, H, C, 2, pitch]:
// for row y and channel c an "a" half (a[0] = 0 for column -1, a[t + 1] = column 2t + 1) then a
// "b" half (b[t] = column 2t), every other entry 0. pitch = W's tiles rounded up to 8, plus 8:
// the Winograd blocks compute the tiles rounded up to 8 (wino_rows) and read one entry past them.
HF_THIN_ALWAYS_INLINE int64_t rows_pitch(int64_t W) {
  const int64_t tiles = (W + 1) / 2;
  return (tiles + 7) / 8 * 8 + 8;
}

// Index tables of one channels_last output period (kPeriodPx pixels, Co * kPeriodPx flat
// positions f = x * Co + co): where position f sits in the planar row (co * out_pitch + x) and in
// the residual row (co * rc + x * rw), and its bias.
struct Period {
  std::vector<int32_t> planar_index, residual_index;
  std::vector<float> bias;
};
Period make_period(const Problem& p);

// This thread's scratch, kept across calls: ``zeroed`` floats set to zero, then ``more`` floats
// as they are (written before read).
float* thread_scratch(int64_t zeroed, int64_t more);

// Calls f(std::integral_constant<int, k>{}) for k = n in 1 .. kTileCo - 1: the channel remainder
// (Co % kTileCo channels) of a tile, which takes a register tile of its own width.
template <typename F>
HF_THIN_ALWAYS_INLINE void with_rest(int64_t n, F f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: break;
  }
}
static_assert(kTileCo == 6, "with_rest covers remainders 1 .. 5");

// Input row yi of image n from a ring of K slots of ``slot`` floats in scratch: read (by ``read``)
// only when its slot holds another row; rows outside the image are the zero row.
template <int K, typename Read>
HF_THIN_ALWAYS_INLINE float* ring_row(const Problem& p, int64_t n, int64_t yi, float* scratch,
                                      int64_t slot, float* zero_row, int64_t* tags, Read read) {
  if (yi < 0 || yi >= p.H) return zero_row;
  const int64_t k = yi % K;
  float* row = scratch + k * slot;
  if (tags[k] != n * p.H + yi) {
    read(p, p.x + n * p.sn + yi * p.sh, row);
    tags[k] = n * p.H + yi;
  }
  return row;
}

// The AVX2 + FMA variant (csrc/cpu_conv_thin_avx2.cpp); the caller checked the CPU.
void run_avx2(const Problem& p);
// x (strided [N, C, H, W], as p.x / p.sn .. p.sw) into the rows tensor ``out`` (p.half_pitch =
// rows_pitch(W), zero-filled by the caller).
void rows_from_avx2(const Problem& p, float* out);

}  // namespace hf_thin

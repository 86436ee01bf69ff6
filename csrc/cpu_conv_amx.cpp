// hrnet_fast CPU kernel: bfloat16 convolutions, 3x3 (padding 1) or 1x1 (padding 0), stride 1 or
// 2, on Intel AMX tiles (the thin layers of the bfloat16 CPU engine).
//
//   hrnet_fast_cpu::conv_amx_pack(Tensor weight) -> Tensor
//     weight [Co, Ci, k, k], k 3 or 1 (any float dtype; Ci even, at most 512 for 3x3) -> bfloat16
//     B tiles, see "Packing" below. The conv takes Ci <= 512; wider 1x1 packings are for the seg
//     head (cpu_head_amx.cpp), whose classifier reads the 270 to 960 head channels.
//   hrnet_fast_cpu::conv_amx(Tensor x, Tensor packed, int[] weight_size, Tensor? bias,
//                            Tensor? residual, bool relu, int stride=1,
//                            int[] relu_ranges=[]) -> Tensor
//     weight_size: the packed weight's [Co, Ci] (the packing pads both), checked against x; the
//     kernel size k is the packed weight's first dimension.
//     out = act(conv2d(x, weight, bias, stride, padding=k / 2) + residual), a new channels_last
//     bfloat16 tensor [N, Co, (H - 1) / stride + 1, (W - 1) / stride + 1]; stride 1 or 2.
//     act = ReLU if relu (NaN propagates), else identity; with relu_ranges ([start, end) pairs)
//     the ReLU acts on those output channels only (a batched stride-2 conv's branches).
//   hrnet_fast_cpu::conv_amx_into(Tensor(a!) residual, Tensor x, Tensor packed, int[] weight_size,
//                                 Tensor? bias, bool relu, int stride=1, int[] relu_ranges=[])
//     the same with the residual written in place (it may not share memory with x).
//
// Why: through torch, each oneDNN convolution costs 150-170 us of host work per call in bfloat16
// (ideep builds the primitive descriptor on every call; 282 calls, 47 ms of a 149 ms w18 forward
// at 512x1024, 2 cores), and oneDNN's AMX kernels pad each tap's K = Ci to a multiple of 32
// (18 channels use 56% of a tile). Here the K of one tile row is a whole row of the 3x3 window,
// 3 * Ci contiguous values of a channels_last input (pixels x-1, x, x+1), so 18 channels fill
// 54 of 64 K slots, and the host work per call is a few microseconds. Stride 2 keeps that: output
// pixel x's window row is input pixels 2x - 1 to 2x + 1, still 3 Ci contiguous values, and the A
// tile's rows are 2 Ci values apart instead of Ci. A 1x1 conv is the same with one window row of
// Ci values.
//
// Tensors: x [N, Ci, H, W] bfloat16, dense channels_last; residual [N, Co, Ho, Wo] bfloat16 dense
// channels_last; bias [Co] float32 contiguous; Ci even (the K tail of a tile holds whole bf16
// pairs). Needs AMX-BF16 and AVX512-BF16 (checked at run time, with the kernel's permission to use
// the tile registers); elsewhere it raises and callers keep oneDNN.
//
// Numerics, per output element: products of bfloat16 values summed in float32 by the AMX unit
// (the order within a tile is the hardware's; across tiles: window rows, then K tiles), then
//   acc += bias (float32);  acc += float(residual);  out = bf16_round_nearest_even(act(acc)).
// Taps outside the image contribute nothing (edge blocks are staged with zeros), and no value
// outside a pixel's k x k window is ever loaded, so a NaN input reaches exactly the outputs whose
// window holds it.
//
// Packing: for window row dy (k), N tile nt (16 output channels, zero past Co), K tile kt (32 of
// the Kd = k * Ci values k = dx * Ci + c, zero past Kd): a 16 x 32 bfloat16 tile in AMX's pair
// layout, B[kp][n][e] = weight[16 nt + n][c][dy][dx] with k = 32 kt + 2 kp + e. Shape
// [k, NT, KT, 16, 16, 2].
//
// Work: at::parallel_for over output rows. A block is 16 pixels of a row. Two orders:
//   * N-major (up to 64 outputs, run_rows): for each group of up to four N tiles, one block's
//     window rows' K tiles accumulate into four C tiles. Tile registers: 0 A (full K), 1 A
//     (K tail, its own shape), 2 B (full K), 3 B (K tail), 4-7 C.
//   * 2 x 2 (above 64 outputs, run_rows_square): two blocks x two N tiles per pass, all tiles
//     full-K (each block's K tail staged with zeros); 0, 1 A, 2, 3 B, 4-7 C.
// Either way the C tiles go to a 4 KiB buffer and the epilogue runs with AVX-512 (bias, residual,
// ReLU, rounding to bfloat16, masked stores). In the N-major order with 16 to 64 outputs the tiles
// are stored densely ([pixel][Co], epilogue_dense) and the epilogue walks the block's contiguous
// output 16 values at a time (w18 bf16 engine 1.06-1.10x, w18_small_v2 1.02-1.04x against the
// per-tile epilogue, same-process A/B); otherwise per 16-channel tile with masked stores of Co.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_amx.h"

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::conv_amx: ";
constexpr int kRows = 16;   // pixels per block = A and C tile rows
constexpr int kK = 32;      // bf16 values per full K tile
constexpr int kN = 16;      // output channels per N tile
constexpr int kGroup = 4;   // C tiles, N tiles per pass
constexpr int64_t kMaxCi = 512;  // bounds the edge-block staging buffers (kMaxSegment pixels)

using hf_amx::amx_ready;

#if HF_AMX_COMPILED
using hf_amx::TileConfig;

struct Problem {
  const uint16_t* x;    // [N, H, W, Ci] bf16 bits
  const uint16_t* b;    // packed B tiles
  const float* bias;    // [Co] or null
  const float* bias_rep;  // [kRows * Co]: bias[i % Co], the dense epilogue's bias; or null
  // The ReLU's floor per channel, 0 where it acts and -inf elsewhere, when it covers only some
  // channels (batched stride-2 convs), else null: [Co] for the per-tile epilogue, [kRows * Co]
  // (floor[i % Co]) for the dense one (per_pixel).
  const float* floor_rep;
  const uint16_t* res;  // [N, H, W, Co] or null
  uint16_t* out;        // [N, H, W, Co]
  int64_t N, H, W, ci, co, kd, kt, nt, tail;  // tail: K values in the last K tile (0: none)
  int64_t s, Ho, Wo;  // stride (1 or 2); H, W are the input's size, Ho, Wo the output's
  int64_t k, pad;     // kernel size 3 (padding 1) or 1 (padding 0)
  bool relu;
};

// Tile numbers are immediates in the instructions: one case per C tile.
#define HF_FOR_C(i, stmt)     \
  switch (i) {                \
    case 0: { stmt(4); break; } \
    case 1: { stmt(5); break; } \
    case 2: { stmt(6); break; } \
    default: { stmt(7); break; } \
  }

HF_AMX_TARGET void configure(const Problem& p) {
  TileConfig cfg;
  const int tail = p.tail ? p.tail : kK;
  cfg.colsb[0] = kK * 2;      cfg.rows[0] = kRows;
  cfg.colsb[1] = tail * 2;    cfg.rows[1] = kRows;
  cfg.colsb[2] = kN * 4;      cfg.rows[2] = kK / 2;
  cfg.colsb[3] = kN * 4;      cfg.rows[3] = tail / 2;
  for (int t = 4; t < 8; ++t) {
    cfg.colsb[t] = kN * 4;
    cfg.rows[t] = kRows;
  }
  _tile_loadconfig(&cfg);
}

// Epilogue of one block: C tiles of N group g (cbuf[t][pixel][16]) -> out.
HF_AMX_TARGET void epilogue(const Problem& p, const float* cbuf, int groups, int64_t n0,
                            int64_t pix, int valid) {
  const __m512 zero = _mm512_setzero_ps();
  for (int t = 0; t < groups; ++t) {
    const int64_t ch = (n0 + t) * kN;
    const int count = static_cast<int>(std::min<int64_t>(kN, p.co - ch));
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
    const __m512 bias = p.bias != nullptr ? _mm512_maskz_loadu_ps(mask, p.bias + ch) : zero;
    for (int r = 0; r < valid; ++r) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(cbuf + (t * kRows + r) * kN), bias);
      const int64_t at = (pix + r) * p.co + ch;
      if (p.res != nullptr) {
        const __m256i rb = _mm256_maskz_loadu_epi16(mask, p.res + at);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16)));
      }
      if (p.floor_rep != nullptr)
        v = _mm512_max_ps(_mm512_maskz_loadu_ps(mask, p.floor_rep + ch), v);
      else if (p.relu)
        v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
      const __m256bh o = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(p.out + at, mask, reinterpret_cast<__m256i>(o));
    }
  }
}

// Dense epilogue of one block (N-major order, Co >= 16): the C tiles were stored at column 16 t
// with a row stride of Co floats, last tile first, so cbuf holds the block's [pixel][Co] sums
// densely (a tile's columns past Co land on the next pixel's first channels, which tile 0, stored
// last, overwrites). The block's output is contiguous too, so this walks valid * Co values in
// 16-lane steps: 18 steps for Co = 18 where the per-tile epilogue takes 32 (its second tile holds 2
// channels).
HF_AMX_TARGET void epilogue_dense(const Problem& p, const float* cbuf, int64_t pix, int valid) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t total = valid * p.co;
  const uint16_t* res = p.res != nullptr ? p.res + pix * p.co : nullptr;
  uint16_t* out = p.out + pix * p.co;
  for (int64_t i = 0; i < total; i += kN) {
    const int64_t left = total - i;
    const __mmask16 mask = left >= kN ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << left) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(mask, cbuf + i);
    if (p.bias_rep != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias_rep + i));
    if (res != nullptr) {
      const __m256i rb = _mm256_maskz_loadu_epi16(mask, res + i);
      v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16)));
    }
    if (p.floor_rep != nullptr)
      v = _mm512_max_ps(_mm512_maskz_loadu_ps(mask, p.floor_rep + i), v);  // NaN stays NaN
    else if (p.relu)
      v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
    const __m256bh o = _mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(out + i, mask, reinterpret_cast<__m256i>(o));
  }
}

// Input pixels one block's window row spans: s (kRows - 1) + k, from pixel s xb - pad.
constexpr int64_t kMaxSegment = 2 * (kRows - 1) + 3;

// Stages the input pixels an edge block reads, s xb - pad to s (xb + 15) - pad + k - 1, as one
// contiguous run of pixels (Ci values each): the row's pixels that some valid output's window
// holds, zeros for the rest (outside the image, or read only by rows past `valid`). The block then
// reads it exactly as an interior block reads the row (A-tile rows s Ci values apart). One or two
// copies per block and window row (a staged [16][3 Ci] window block took 48 small copies: 23-27%
// of an 18- or 36-channel conv's time at w18's sizes).
HF_AMX_TARGET const uint16_t* stage_segment(const Problem& p, const uint16_t* row, int64_t xb,
                                            int valid, uint16_t* seg) {
  const int64_t ci = p.ci, first = p.s * xb - p.pad, span = p.s * (kRows - 1) + p.k;
  const int64_t lo = std::max<int64_t>(first, 0);
  const int64_t hi = std::min<int64_t>(p.s * (xb + valid - 1) - p.pad + p.k, p.W);  // exclusive
  std::memset(seg, 0, (lo - first) * ci * 2);
  std::memcpy(seg + (lo - first) * ci, row + lo * ci, (hi - lo) * ci * 2);
  std::memset(seg + (hi - first) * ci, 0, (first + span - hi) * ci * 2);
  return seg;
}

// Whether the 16 output pixels from xb read only input pixels inside the row (no staging): input
// pixels s xb - pad to s (xb + 15) - pad + k - 1. Such a block is always a full one.
inline bool interior_block(const Problem& p, int64_t xb) {
  return p.s * xb - p.pad >= 0 && p.s * (xb + kRows - 1) - p.pad + p.k - 1 <= p.W - 1;
}

// Up to four N tiles (the N-major order's range) all groups are one pass, so the dense epilogue
// sees every channel of a block; below 16 outputs a row stride of Co floats would overlap a
// tile's own rows.
inline bool dense_epilogue(int64_t co, int64_t nt) { return co >= kN && nt <= kGroup; }

HF_AMX_TARGET void run_rows(const Problem& p, int64_t begin, int64_t end) {
  configure(p);
  // + kN: the dense layout's last tile writes up to 15 columns past pixel 15's Co values
  alignas(64) float cbuf[kGroup * kRows * kN + kN];
  const bool dense = dense_epilogue(p.co, p.nt);
  alignas(64) uint16_t segment[kMaxSegment * kMaxCi];  // an edge block's pixels (stage_segment)
  const int64_t ci = p.ci, W = p.W, H = p.H, s = p.s, Ho = p.Ho, Wo = p.Wo;
  const int64_t full_k = p.tail ? p.kt - 1 : p.kt;
  const int64_t tile_elems = kK / 2 * kN * 2;  // one packed B tile, bf16 values
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / Ho, y = item % Ho;
    for (int64_t x0 = 0; x0 < Wo; x0 += kRows) {
      const int valid = static_cast<int>(std::min<int64_t>(kRows, Wo - x0));
      const bool interior = interior_block(p, x0);
      for (int64_t g0 = 0; g0 < p.nt; g0 += kGroup) {
        const int groups = static_cast<int>(std::min<int64_t>(kGroup, p.nt - g0));
        for (int t = 0; t < groups; ++t) {
#define HF_ZERO(T) _tile_zero(T)
          HF_FOR_C(t, HF_ZERO)
        }
        for (int dy = 0; dy < p.k; ++dy) {
          const int64_t yy = s * y + dy - p.pad;
          if (yy < 0 || yy >= H) continue;
          const uint16_t* row = p.x + (n * H + yy) * W * ci;
          const uint16_t* a;
          int64_t stride;
          if (interior) {
            a = row + (s * x0 - p.pad) * ci;
            stride = s * ci * 2;
          } else {
            a = stage_segment(p, row, x0, valid, segment);
            stride = s * ci * 2;
          }
          const uint16_t* bt = p.b + (dy * p.nt + g0) * p.kt * tile_elems;
          for (int64_t k = 0; k < full_k; ++k) {
            _tile_loadd(0, a + k * kK, stride);
            for (int t = 0; t < groups; ++t) {
              _tile_loadd(2, bt + (t * p.kt + k) * tile_elems, kN * 4);
#define HF_DP_FULL(T) _tile_dpbf16ps(T, 0, 2)
              HF_FOR_C(t, HF_DP_FULL)
            }
          }
          if (p.tail) {
            _tile_loadd(1, a + full_k * kK, stride);
            for (int t = 0; t < groups; ++t) {
              _tile_loadd(3, bt + (t * p.kt + full_k) * tile_elems, kN * 4);
#define HF_DP_TAIL(T) _tile_dpbf16ps(T, 1, 3)
              HF_FOR_C(t, HF_DP_TAIL)
            }
          }
        }
        if (dense) {
          for (int t = groups - 1; t >= 0; --t) {
#define HF_STORE_DENSE(T) _tile_stored(T, cbuf + t * kN, p.co * 4)
            HF_FOR_C(t, HF_STORE_DENSE)
          }
          epilogue_dense(p, cbuf, (n * Ho + y) * Wo + x0, valid);
          continue;
        }
        for (int t = 0; t < groups; ++t) {
#define HF_STORE(T) _tile_stored(T, cbuf + t * kRows * kN, kN * 4)
          HF_FOR_C(t, HF_STORE)
        }
        epilogue(p, cbuf, groups, g0, (n * Ho + y) * Wo + x0, valid);
      }
    }
  }
  _tile_release();
}
#undef HF_ZERO
#undef HF_DP_FULL
#undef HF_DP_TAIL
#undef HF_STORE
#undef HF_STORE_DENSE

// 2 x 2 blocking for wide layers: four C tiles hold two 16-pixel blocks x two N tiles, so each K
// step loads two A and two B tiles for four products (the N-major order above: one A and up to
// four B tiles, with a chain of products into one C tile when a group has a single N tile). All
// tiles are full 32-wide K: the K tail of each block and window row is staged, zero-padded, with
// masked AVX-512 loads (the B tiles are zero past Kd), so no value outside a window is read.
// Tile registers: 0, 1 A (blocks), 2, 3 B (N tiles), 4 + 2 b + j C.
HF_AMX_TARGET void run_rows_square(const Problem& p, int64_t begin, int64_t end) {
  hf_amx::configure_full_tiles();
  alignas(64) float cbuf[4 * kRows * kN];
  const int64_t ci = p.ci, W = p.W, H = p.H, s = p.s, Ho = p.Ho, Wo = p.Wo;
  const int64_t full_k = p.tail ? p.kt - 1 : p.kt;
  const int64_t tile_elems = kK / 2 * kN * 2;
  const __mmask32 tail_mask = p.tail ? static_cast<__mmask32>((1ull << p.tail) - 1) : 0;
  // per block and window row: an edge block's pixels (stage_segment), and the staged K tail
  // [16][32]
  std::vector<uint16_t> segments(static_cast<size_t>(2 * 3 * kMaxSegment * ci));
  alignas(64) uint16_t tails[2][3][kRows * kK];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / Ho, y = item % Ho;
    bool row_ok[3];
    for (int dy = 0; dy < 3; ++dy)
      row_ok[dy] = dy < p.k && s * y + dy - p.pad >= 0 && s * y + dy - p.pad < H;
    for (int64_t x0 = 0; x0 < Wo; x0 += 2 * kRows) {
      const int blocks = Wo - x0 > kRows ? 2 : 1;
      const uint16_t* a[2][3];
      const uint16_t* at[2][3];  // the K tail tile's rows
      int64_t stride[2][3], tail_stride[2][3];
      int valid[2];
      for (int b = 0; b < blocks; ++b) {
        const int64_t xb = x0 + b * kRows;
        valid[b] = static_cast<int>(std::min<int64_t>(kRows, Wo - xb));
        const bool interior = interior_block(p, xb);
        for (int dy = 0; dy < 3; ++dy) {
          if (!row_ok[dy]) continue;
          const uint16_t* row = p.x + (n * H + s * y + dy - p.pad) * W * ci;
          a[b][dy] = interior ? row + (s * xb - p.pad) * ci
                              : stage_segment(p, row, xb, valid[b],
                                              segments.data() + (b * 3 + dy) * kMaxSegment * ci);
          stride[b][dy] = s * ci * 2;
          if (p.tail) {
            uint16_t* t = tails[b][dy];
            const uint16_t* src = a[b][dy] + full_k * kK;
            for (int r = 0; r < kRows; ++r)
              _mm512_store_si512(t + r * kK,
                                 _mm512_maskz_loadu_epi16(tail_mask, src + r * s * ci));
            at[b][dy] = t;
            tail_stride[b][dy] = kK * 2;
          }
        }
      }
      for (int64_t n0 = 0; n0 < p.nt; n0 += 2) {
        const int ntiles = p.nt - n0 >= 2 ? 2 : 1;
        for (int b = 0; b < blocks; ++b)
          for (int j = 0; j < ntiles; ++j) {
#define HF_ZERO2(C, A, B) _tile_zero(C)
            HF_TILE_PAIR(b, j, HF_ZERO2)
          }
        for (int dy = 0; dy < 3; ++dy) {
          if (!row_ok[dy]) continue;
          const uint16_t* bt = p.b + (dy * p.nt + n0) * p.kt * tile_elems;
          for (int64_t k = 0; k < p.kt; ++k) {
            const bool tail = k == full_k;
            if (tail) {
              _tile_loadd(0, at[0][dy], tail_stride[0][dy]);
              if (blocks == 2) _tile_loadd(1, at[1][dy], tail_stride[1][dy]);
            } else {
              _tile_loadd(0, a[0][dy] + k * kK, stride[0][dy]);
              if (blocks == 2) _tile_loadd(1, a[1][dy] + k * kK, stride[1][dy]);
            }
            _tile_loadd(2, bt + k * tile_elems, kN * 4);
            if (ntiles == 2) _tile_loadd(3, bt + (p.kt + k) * tile_elems, kN * 4);
            for (int b = 0; b < blocks; ++b)
              for (int j = 0; j < ntiles; ++j) {
#define HF_DP2(C, A, B) _tile_dpbf16ps(C, A, B)
                HF_TILE_PAIR(b, j, HF_DP2)
              }
          }
        }
        for (int b = 0; b < blocks; ++b) {
          for (int j = 0; j < ntiles; ++j) {
#define HF_STORE2(C, A, B) _tile_stored(C, cbuf + (b * 2 + j) * kRows * kN, kN * 4)
            HF_TILE_PAIR(b, j, HF_STORE2)
          }
          epilogue(p, cbuf + b * 2 * kRows * kN, ntiles, n0, (n * Ho + y) * Wo + x0 + b * kRows,
                   valid[b]);
        }
      }
    }
  }
  _tile_release();
}
#undef HF_ZERO2
#undef HF_DP2
#undef HF_STORE2
#undef HF_ZERO
#undef HF_DP_FULL
#undef HF_DP_TAIL
#undef HF_STORE
#undef HF_FOR_C

// A per-channel vector repeated for a block's 16 pixels: value i is per_channel[i % Co], as the
// dense epilogue walks a block's [pixel][Co] output.
std::vector<float> per_pixel(const std::vector<float>& per_channel) {
  std::vector<float> rep;
  rep.reserve(kRows * per_channel.size());
  for (int r = 0; r < kRows; ++r) rep.insert(rep.end(), per_channel.begin(), per_channel.end());
  return rep;
}
#endif

at::Tensor conv_amx_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_floating_point() && weight.dim() == 4 &&
                  (weight.size(2) == 3 || weight.size(2) == 1) &&
                  weight.size(3) == weight.size(2) && weight.size(0) > 0 &&
                  weight.size(1) > 0 && weight.size(1) % 2 == 0 &&
                  (weight.size(2) == 1 || weight.size(1) <= kMaxCi),
              "hrnet_fast_cpu::conv_amx_pack: weight must be [Co, Ci, 3, 3] (Ci at most ", kMaxCi,
              ") or [Co, Ci, 1, 1] on the CPU with Ci even, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t co = weight.size(0), ci = weight.size(1), ks = weight.size(2), kd = ks * ci;
  const int64_t nt = (co + kN - 1) / kN, kt = (kd + kK - 1) / kK;
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const float* src = w.data_ptr<float>();
  at::Tensor packed = at::zeros({ks, nt, kt, kK / 2, kN, 2}, weight.options().dtype(at::kFloat));
  float* dst = packed.data_ptr<float>();
  for (int64_t dy = 0; dy < ks; ++dy)
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t k = 0; k < kd; ++k) {
        const int64_t dx = k / ci, c = k % ci, kb = k / kK, kp = (k % kK) / 2, e = k % 2;
        for (int64_t j = 0; j < kN && t * kN + j < co; ++j)
          dst[((((dy * nt + t) * kt + kb) * (kK / 2) + kp) * kN + j) * 2 + e] =
              src[(((t * kN + j) * ci + c) * ks + dy) * ks + dx];
      }
  return packed.to(at::kBFloat16);
}

// Checks the arguments and runs the kernel into `into` (the residual, written in place) or, when
// `into` is null, into a new tensor; returns the output.
at::Tensor run_conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef weight_size,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, bool relu, int64_t stride,
                    at::IntArrayRef relu_ranges, const at::Tensor* into) {
  TORCH_CHECK(amx_ready(), kOp, "this CPU (or its kernel) does not offer AMX-BF16 tiles");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              kOp, "x must be a dense channels_last bfloat16 CPU tensor [N, Ci, H, W], got ",
              x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  const int64_t ci = x.size(1);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 &&
                  packed.dim() == 6 && (packed.size(0) == 3 || packed.size(0) == 1) &&
                  packed.size(3) == kK / 2 &&
                  packed.size(4) == kN && packed.size(5) == 2 && packed.is_contiguous(),
              kOp, "packed must come from conv_amx_pack, got ", packed.sizes());
  TORCH_CHECK(weight_size.size() == 2, kOp, "weight_size must be [Co, Ci]");
  TORCH_CHECK(weight_size[1] == ci, kOp, "the packed weight takes ", weight_size[1],
              " input channels, x has ", ci);
  const int64_t ks = packed.size(0);  // kernel size: 3 (padding 1) or 1 (padding 0)
  TORCH_CHECK(ci % 2 == 0 && ci <= kMaxCi && packed.size(2) == (ks * ci + kK - 1) / kK, kOp,
              "the packed weight does not take ", ci, " input channels");
  const int64_t nt = packed.size(1);
  const int64_t co = weight_size[0];
  TORCH_CHECK(co > nt * kN - kN && co <= nt * kN, kOp, "weight_size has ", co, " outputs",
              "; the packed weight has ", nt * kN - kN + 1, " to ", nt * kN);
  TORCH_CHECK(stride == 1 || stride == 2, kOp, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK(relu_ranges.size() % 2 == 0 && (relu_ranges.empty() || relu), kOp,
              "relu_ranges must be [start, end) pairs of channels, with relu set");
  for (size_t i = 0; i < relu_ranges.size(); i += 2)
    TORCH_CHECK(0 <= relu_ranges[i] && relu_ranges[i] <= relu_ranges[i + 1] &&
                    relu_ranges[i + 1] <= co,
                kOp, "relu range [", relu_ranges[i], ", ", relu_ranges[i + 1],
                ") is not inside the ", co, " output channels");
  // 3x3 with padding 1 and 1x1 without: (H + 2 pad - k) / s + 1 = (H - 1) / s + 1
  const int64_t ho = (x.size(2) - 1) / stride + 1, wo = (x.size(3) - 1) / stride + 1;
  at::Tensor bias_f32;  // the epilogue reads float32 (a no-op for the engine's float32 bias)
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->numel() == co, kOp,
                "bias must be a CPU tensor [", co, "], got ", bias->sizes());
    bias_f32 = bias->to(at::kFloat).contiguous();
  }
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kBFloat16 && r.dim() == 4 &&
                    r.size(0) == x.size(0) && r.size(1) == co && r.size(2) == ho &&
                    r.size(3) == wo && r.is_contiguous(at::MemoryFormat::ChannelsLast),
                kOp, "residual must be a dense channels_last bfloat16 tensor [", x.size(0), ", ",
                co, ", ", ho, ", ", wo, "], got ", r.scalar_type(), " ", r.sizes());
  }
  if (into != nullptr) {
    // Each output element is written right after its own residual element is read, but x is read
    // throughout: the two may not share memory.
    TORCH_CHECK(!into->storage().is_alias_of(x.storage()), kOp,
                "residual (written in place) must not share memory with x");
  }
  at::Tensor out = into != nullptr
                       ? *into
                       : at::empty({x.size(0), co, ho, wo},
                                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if HF_AMX_COMPILED
  Problem p;
  p.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  p.b = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  p.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  // Only the dense epilogue reads the bias repeated per pixel; the per-tile one reads p.bias.
  const bool dense = dense_epilogue(co, nt);
  std::vector<float> bias_rep;
  if (p.bias != nullptr && dense) bias_rep = per_pixel(std::vector<float>(p.bias, p.bias + co));
  p.bias_rep = bias_rep.empty() ? nullptr : bias_rep.data();
  std::vector<float> floor_rep;
  if (!relu_ranges.empty()) {
    std::vector<float> floor(static_cast<size_t>(co), -std::numeric_limits<float>::infinity());
    for (size_t i = 0; i < relu_ranges.size(); i += 2)
      std::fill(floor.begin() + relu_ranges[i], floor.begin() + relu_ranges[i + 1], 0.0f);
    floor_rep = dense ? per_pixel(floor) : std::move(floor);
  }
  p.floor_rep = floor_rep.empty() ? nullptr : floor_rep.data();
  p.res = residual.has_value() ? reinterpret_cast<const uint16_t*>(residual->data_ptr()) : nullptr;
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.N = x.size(0);
  p.H = x.size(2);
  p.W = x.size(3);
  p.ci = ci;
  p.co = co;
  p.k = ks;
  p.pad = ks / 2;
  p.kd = ks * ci;
  p.kt = packed.size(2);
  p.nt = nt;
  p.tail = p.kd % kK;
  p.relu = relu;
  p.s = stride;
  p.Ho = ho;
  p.Wo = wo;
  // Above four N tiles the N-major order re-reads each A tile per group of four and ends on a
  // group of one or two (a chain of dependent products); the 2 x 2 order measured 1.05-1.28x
  // oneDNN there (72, 80, 88, 96, 120, 128, 144 outputs), the N-major 0.75-1.08x. Up to four N
  // tiles the N-major order is faster (18 -> 18: 1.46-1.56x against the 2 x 2 order's 1.00-1.06x).
  const bool square = p.nt > kGroup;
  at::parallel_for(0, p.N * p.Ho, 1, [&](int64_t begin, int64_t end) {
    if (square)
      run_rows_square(p, begin, end);
    else
      run_rows(p, begin, end);
  });
#endif
  return out;
}

at::Tensor conv_amx(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef weight_size,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, bool relu, int64_t stride,
                    at::IntArrayRef relu_ranges) {
  return run_conv(x, packed, weight_size, bias, residual, relu, stride, relu_ranges, nullptr);
}

// The residual is the output: no new tensor, and its cache lines are read before they are written
// (a new tensor's lines are fetched for ownership first). 3x3 residual convs 1.01-1.13x (w18's
// 18 -> 18 1.06x, layer1's 64 -> 64 1.13x) against a new tensor.
void conv_amx_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& packed,
                   at::IntArrayRef weight_size, const c10::optional<at::Tensor>& bias, bool relu,
                   int64_t stride, at::IntArrayRef relu_ranges) {
  run_conv(x, packed, weight_size, bias, residual, relu, stride, relu_ranges, &residual);
}

bool amx_available() { return amx_ready(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def("conv_amx_pack(Tensor weight) -> Tensor");
  m.def(
      "conv_amx(Tensor x, Tensor packed, int[] weight_size, Tensor? bias, Tensor? residual, "
      "bool relu, int stride=1, int[] relu_ranges=[]) -> Tensor");
  m.def(
      "conv_amx_into(Tensor(a!) residual, Tensor x, Tensor packed, int[] weight_size, Tensor? bias, "
      "bool relu, int stride=1, int[] relu_ranges=[]) -> ()");
  m.def("amx_available() -> bool", &amx_available);
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) {
  m.impl("conv_amx_pack", &conv_amx_pack);
  m.impl("conv_amx", &conv_amx);
  m.impl("conv_amx_into", &conv_amx_into);
}

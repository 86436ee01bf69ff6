// hrnet_fast CPU kernel: the bfloat16 segmentation head in one pass on Intel AMX tiles.
//
//   hrnet_fast_cpu::seg_head_amx(Tensor x, Tensor proj, int[] proj_size, Tensor? proj_bias,
//                                Tensor[] contributions, str mode, bool align_corners,
//                                Tensor cls, int[] cls_size, Tensor? cls_bias) -> Tensor
//     h   = relu(conv1x1(x, Wp) + bp + sum_k resize(contributions[k], x.shape[-2:]))
//     out = conv1x1(h, Wc) + bc
//     proj = conv_amx_pack(Wp) with Wp [Cm, Ci, 1, 1] and proj_size = [Cm, Ci]; cls =
//     conv_amx_pack(Wc) with Wc [Co, Cm, 1, 1] and cls_size = [Co, Cm]. resize: mode "nearest"
//     (legacy) or "bilinear" (align_corners honoured), as F.interpolate(size=...); a contribution
//     at x's size is added as it is.
//
// This is the CPU engine's seg head (hrnet_fast/engine.py, run_seg_head): x is branch 0 and the
// narrow branches resized and concatenated (w18: 126 channels), the contributions are the wide
// branches projected at their own resolution (w18: branch 3, 270 channels at 1/32), Cm is the head
// width (w18: 270) and Co the classes. Why one pass: the head map h (w18 at 1x3x512x1024: 270 x
// 128 x 256, 17.7 MB in bfloat16) never reaches memory. Unfused it is written by the projection,
// read and written by the fuse step and read by the classifier, and oneDNN's memory-bound 1x1
// projection was the largest single item of the w18 bf16 forward (11 of 173 ms, profiled).
//
// Tensors: x [N, Ci, H, W] bfloat16, dense channels_last, Ci even; contributions [N, Cm, h_k, w_k]
// bfloat16 with channel stride 1 (other strides are read), h_k <= H, w_k <= W; biases [Cm] and [Co]
// (read as float32) or None. The output is a new channels_last bfloat16 tensor [N, Co, H, W].
// Needs AMX-BF16 and AVX512-BF16 (checked at run time); elsewhere it raises and the engine keeps
// the unfused head.
//
// Numerics, per pixel: a = sum over Ci of bfloat16 products, in float32 (AMX); a += bp; for each
// contribution a += its resized value (float32, the formulas of csrc/cpu_fuse.cpp); h =
// bf16_round_nearest_even(relu(a)) (NaN propagates); out = bf16_round_nearest_even(sum over Cm of
// h * Wc in float32 + bc). h is rounded once (the unfused head rounds the projection to bfloat16,
// then the fused sum). No value outside a pixel's own inputs and its resize taps is read, so a NaN
// reaches exactly the pixels that read it.
//
// Work: at::parallel_for over output rows. Per row, each bilinear contribution's two source rows
// are blended once (float32). Per pair of 16-pixel blocks: for each pair of 16-channel N tiles, the
// projection's four C tiles (two blocks x two N tiles) go to a 4 KiB buffer and the AVX-512
// epilogue adds bias and resized contributions, applies the ReLU and writes those 32 channels of h
// to abuf [16][32 KT] bfloat16 per block (zero past Cm, so the classifier's K tiles are all full:
// its packed weight is zero there too); then the classifier's tiles, in the same 2 x 2 order, and
// its epilogue write out. Tile registers: 0, 1 A (blocks), 2, 3 B (N tiles), 4-7 C. On this
// project's 2-vCPU development VM a tile product took 6.6-16.7 ns (the host shares the unit; 16
// cycles on the hardware), and w18's head needs 5.4 products per pixel: it is AMX-bound there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_amx.h"
#include "cpu_resize.h"

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::seg_head_amx: ";
constexpr int kRows = 16;   // pixels per block = A and C tile rows
constexpr int kK = 32;      // bf16 values per full K tile
constexpr int kN = 16;      // output channels per N tile
constexpr int64_t kTileElems = kK / 2 * kN * 2;  // bf16 values of one packed B tile

using hf_amx::amx_ready;
using hf_resize::Source;

// One packed 1x1 weight ([1, NT, KT, 16, 16, 2]) and what the kernel reads with it.
struct Matmul {
  const uint16_t* b;
  const float* bias;  // [outputs] or null
  int64_t outputs, nt, kt, tail;  // tail: K values in the last K tile (0: all full)
};

struct HeadProblem {
  const uint16_t* x;  // [N, H, W, Ci]
  int64_t N, H, W, ci;
  Matmul proj, cls;   // proj: Ci -> Cm, cls: Cm -> Co
  std::vector<Source> sources;
  uint16_t* out;      // [N, H, W, Co]
};

#if HF_AMX_COMPILED
// One N pair (tiles n0 and n0 + 1, or n0 alone at the end) of two 16-pixel blocks: sum over m's K
// tiles of A (a[b]: the block's first pixel, rows a_stride values apart; a_tail[b]: its K tail
// staged zero-padded to 32 values per row, when m has a tail) times the B tiles, stored at column
// 16 j of dst[b] (dst_stride floats per row). Two blocks x two N tiles: each B tile serves 32
// pixels, each A tile two N tiles, and four independent accumulation chains cover a product's
// latency (a dependent chain ran 1.2-1.6x slower per product than four chains on the development
// VM; benchmarks/cpu_amx_throughput.c). Tile registers: HF_TILE_PAIR (csrc/cpu_amx.h).
HF_AMX_TARGET void pair_tiles(const Matmul& m, const uint16_t* const a[2],
                              const uint16_t* const a_tail[2], int blocks, int64_t a_stride,
                              int64_t n0, float* const dst[2], int64_t dst_stride) {
  const int64_t full_k = m.tail ? m.kt - 1 : m.kt;
  const int ntiles = m.nt - n0 >= 2 ? 2 : 1;
  for (int b = 0; b < blocks; ++b)
    for (int j = 0; j < ntiles; ++j) {
#define HF_ZERO2(C, A, B) _tile_zero(C)
      HF_TILE_PAIR(b, j, HF_ZERO2)
    }
  const uint16_t* bt = m.b + n0 * m.kt * kTileElems;
  for (int64_t k = 0; k < m.kt; ++k) {
    if (k < full_k) {
      _tile_loadd(0, a[0] + k * kK, a_stride * 2);
      if (blocks == 2) _tile_loadd(1, a[1] + k * kK, a_stride * 2);
    } else {
      _tile_loadd(0, a_tail[0], kK * 2);
      if (blocks == 2) _tile_loadd(1, a_tail[1], kK * 2);
    }
    _tile_loadd(2, bt + k * kTileElems, kN * 4);
    if (ntiles == 2) _tile_loadd(3, bt + (m.kt + k) * kTileElems, kN * 4);
    for (int b = 0; b < blocks; ++b)
      for (int j = 0; j < ntiles; ++j) {
#define HF_DP2(C, A, B) _tile_dpbf16ps(C, A, B)
        HF_TILE_PAIR(b, j, HF_DP2)
      }
  }
  for (int b = 0; b < blocks; ++b)
    for (int j = 0; j < ntiles; ++j) {
#define HF_STORE2(C, A, B) _tile_stored(C, dst[b] + j * kN, dst_stride * 4)
      HF_TILE_PAIR(b, j, HF_STORE2)
    }
}
#undef HF_ZERO2
#undef HF_DP2
#undef HF_STORE2

HF_AMX_TARGET inline __mmask16 lanes_below(int64_t left) {
  return left >= kN ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

HF_AMX_TARGET inline __m512 load_bf16(__mmask16 mask, const uint16_t* p) {
  const __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// dst[i] = fma(h0, r0[i], h1 * r1[i]) for one source pixel's Cm values (bfloat16 in, float32
// out); the fused multiply-add is explicit so the rounding does not depend on inlining.
HF_AMX_TARGET void blend_pixel(float* dst, const uint16_t* r0, const uint16_t* r1, float h0,
                               float h1, int64_t cm) {
  const __m512 w0 = _mm512_set1_ps(h0), w1 = _mm512_set1_ps(h1);
  for (int64_t c = 0; c < cm; c += kN) {
    const __mmask16 mask = lanes_below(cm - c);
    const __m512 v = _mm512_fmadd_ps(w0, load_bf16(mask, r0 + c),
                                     _mm512_mul_ps(w1, load_bf16(mask, r1 + c)));
    _mm512_mask_storeu_ps(dst + c, mask, v);
  }
}

using Tap = hf_resize::PixelTap<uint16_t>;

// Head channels [c0, c0 + count) (count <= 32) of one block's valid pixels: the projection's sums
// (sums: [16][32] float32, channel c0 at column 0) + bias + the resized contributions, ReLU,
// rounded to bfloat16 into abuf (astride values per pixel; columns past Cm are never written and
// stay zero).
HF_AMX_TARGET void head_slice(const HeadProblem& p, const Tap* taps, size_t nsrc,
                              const float* sums, uint16_t* abuf, int64_t astride, int64_t c0,
                              int64_t count, int valid) {
  const float* bias = p.proj.bias;
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < valid; ++r) {
    const Tap* tap = taps + r * nsrc;
    for (int64_t i = 0; i < count; i += kN) {
      const int64_t c = c0 + i;
      const __mmask16 mask = lanes_below(count - i);
      __m512 v = _mm512_maskz_loadu_ps(mask, sums + r * 2 * kN + i);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c));
      for (size_t k = 0; k < nsrc; ++k) {
        const Tap& t = tap[k];
        if (t.t0 != nullptr) {
          const __m512 v0 = _mm512_maskz_loadu_ps(mask, t.t0 + c);
          const __m512 v1 = _mm512_maskz_loadu_ps(mask, t.t1 + c);
          v = _mm512_add_ps(v, _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(t.w0), v0),
                                             _mm512_mul_ps(_mm512_set1_ps(t.w1), v1)));
        } else {
          v = _mm512_add_ps(v, load_bf16(mask, t.row + c));
        }
      }
      v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
      const __m256bh o = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(abuf + r * astride + c, mask, reinterpret_cast<__m256i>(o));
    }
  }
}

// The classifier's sums of one block (sums: [16][cstride] float32) + bias -> out's pixels from pix.
HF_AMX_TARGET void classifier_epilogue(const HeadProblem& p, const float* sums, int64_t cstride,
                                       int64_t pix, int valid) {
  const int64_t co = p.cls.outputs;
  for (int r = 0; r < valid; ++r) {
    for (int64_t c = 0; c < co; c += kN) {
      const __mmask16 mask = lanes_below(co - c);
      __m512 v = _mm512_maskz_loadu_ps(mask, sums + r * cstride + c);
      if (p.cls.bias != nullptr)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.cls.bias + c));
      const __m256bh o = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(p.out + (pix + r) * co + c, mask, reinterpret_cast<__m256i>(o));
    }
  }
}

HF_AMX_TARGET void head_rows(const HeadProblem& p, int64_t begin, int64_t end) {
  hf_amx::configure_full_tiles();
  const int64_t ci = p.ci, H = p.H, W = p.W, cm = p.proj.outputs;
  const int64_t astride = p.cls.kt * kK;   // bf16 values per pixel in abuf (>= Cm, zero past it)
  const int64_t cstride = p.cls.nt * kN;   // floats per pixel of the classifier's sums
  const size_t nsrc = p.sources.size();
  std::vector<uint16_t> abufs(static_cast<size_t>(2 * kRows * astride), 0);
  const uint16_t* const abuf[2] = {abufs.data(), abufs.data() + kRows * astride};
  std::vector<float> csums(static_cast<size_t>(2 * kRows * cstride));
  // a partial block's pixels (rows past it would read past the tensor), and each block's K tail
  std::vector<uint16_t> stage(static_cast<size_t>(kRows * ci), 0);
  alignas(64) uint16_t tails[2][kRows * kK];
  alignas(64) float sums[2][kRows * 2 * kN];  // one N pair of the projection, per block
  float* const sum_ptr[2] = {sums[0], sums[1]};
  const int64_t full_k = p.proj.tail ? p.proj.kt - 1 : p.proj.kt;
  const __mmask32 tail_mask = p.proj.tail ? static_cast<__mmask32>((1ull << p.proj.tail) - 1) : 0;
  hf_resize::RowTaps<uint16_t> sources(p.sources, cm);
  std::vector<Tap> taps(2 * kRows * std::max<size_t>(nsrc, 1));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / H, y = item % H;
    sources.start_row(n, y, blend_pixel);
    const uint16_t* xrow = p.x + (n * H + y) * W * ci;
    for (int64_t x0 = 0; x0 < W; x0 += 2 * kRows) {
      const int blocks = W - x0 > kRows ? 2 : 1;
      const uint16_t* a[2] = {nullptr, nullptr};
      const uint16_t* a_tail[2] = {nullptr, nullptr};
      int valid[2] = {0, 0};
      for (int b = 0; b < blocks; ++b) {
        const int64_t xb = x0 + b * kRows;
        valid[b] = static_cast<int>(std::min<int64_t>(kRows, W - xb));
        a[b] = xrow + xb * ci;
        if (valid[b] < kRows) {
          std::memcpy(stage.data(), a[b], static_cast<size_t>(valid[b] * ci) * 2);
          a[b] = stage.data();
        }
        if (p.proj.tail) {
          const uint16_t* src = a[b] + full_k * kK;
          for (int r = 0; r < kRows; ++r)
            _mm512_store_si512(tails[b] + r * kK,
                               _mm512_maskz_loadu_epi16(tail_mask, src + r * ci));
          a_tail[b] = tails[b];
        }
        sources.taps(taps.data() + b * kRows * nsrc, xb, valid[b]);
      }
      // Projection and head epilogue per N pair, so the sums stay in L1 (4 KiB) and h goes
      // straight to abuf: no [32][Cm] float32 buffer (35 KiB for w18) beside the streaming weights.
      for (int64_t n0 = 0; n0 < p.proj.nt; n0 += 2) {
        pair_tiles(p.proj, a, a_tail, blocks, ci, n0, sum_ptr, 2 * kN);
        const int64_t c0 = n0 * kN, count = std::min<int64_t>(2 * kN, cm - c0);
        for (int b = 0; b < blocks; ++b)
          head_slice(p, taps.data() + b * kRows * nsrc, nsrc, sums[b], abufs.data() +
                     b * kRows * astride, astride, c0, count, valid[b]);
      }
      for (int64_t n0 = 0; n0 < p.cls.nt; n0 += 2) {
        float* const dst[2] = {csums.data() + n0 * kN, csums.data() + kRows * cstride + n0 * kN};
        pair_tiles(p.cls, abuf, nullptr, blocks, astride, n0, dst, cstride);
      }
      for (int b = 0; b < blocks; ++b)
        classifier_epilogue(p, csums.data() + b * kRows * cstride, cstride,
                            (n * H + y) * W + x0 + b * kRows, valid[b]);
    }
  }
  _tile_release();
}
#endif

// A packed 1x1 weight from conv_amx_pack for [outputs, inputs], checked; bias read as float32
// into `bias_f32`.
Matmul check_matmul(const at::Tensor& packed, at::IntArrayRef size,
                    const c10::optional<at::Tensor>& bias, const char* what, int64_t inputs,
                    at::Tensor& bias_f32) {
  TORCH_CHECK(size.size() == 2 && size[0] > 0, kOp, what, "_size must be [outputs, inputs]");
  TORCH_CHECK(size[1] == inputs, kOp, "the packed ", what, " weight takes ", size[1],
              " input channels, its input has ", inputs);
  const int64_t nt = (size[0] + kN - 1) / kN, kt = (inputs + kK - 1) / kK;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 &&
                  packed.dim() == 6 && packed.size(0) == 1 && packed.size(1) == nt &&
                  packed.size(2) == kt && packed.size(3) == kK / 2 && packed.size(4) == kN &&
                  packed.size(5) == 2 && packed.is_contiguous(),
              kOp, what, " must be conv_amx_pack of a [", size[0], ", ", inputs,
              ", 1, 1] weight, got ", packed.scalar_type(), " ", packed.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->numel() == size[0], kOp,
                what, "_bias must be a CPU tensor [", size[0], "], got ", bias->sizes());
    bias_f32 = bias->to(at::kFloat).contiguous();
  }
  Matmul m;
  m.b = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  m.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  m.outputs = size[0];
  m.nt = nt;
  m.kt = kt;
  m.tail = inputs % kK;
  return m;
}

at::Tensor seg_head_amx(const at::Tensor& x, const at::Tensor& proj, at::IntArrayRef proj_size,
                        const c10::optional<at::Tensor>& proj_bias, at::TensorList contributions,
                        c10::string_view mode, bool align_corners, const at::Tensor& cls,
                        at::IntArrayRef cls_size, const c10::optional<at::Tensor>& cls_bias) {
  TORCH_CHECK(amx_ready(), kOp, "this CPU (or its kernel) does not offer AMX-BF16 tiles");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.size(1) % 2 == 0,
              kOp, "x must be a dense channels_last bfloat16 CPU tensor [N, Ci, H, W] with Ci "
              "even, got ", x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  const std::string mode_s(mode.data(), mode.size());
  TORCH_CHECK(mode_s == "nearest" || mode_s == "bilinear", kOp,
              "mode must be 'nearest' or 'bilinear', got '", mode_s, "'");
  const int64_t N = x.size(0), ci = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor proj_b, cls_b;
  const Matmul proj_m = check_matmul(proj, proj_size, proj_bias, "proj", ci, proj_b);
  const int64_t cm = proj_m.outputs;
  const Matmul cls_m = check_matmul(cls, cls_size, cls_bias, "cls", cm, cls_b);
  for (size_t k = 0; k < contributions.size(); ++k) {
    const at::Tensor& t = contributions[k];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kBFloat16 &&
                    t.dim() == 4,
                kOp, "contributions[", k, "] must be a bfloat16 CPU tensor [N, Cm, h, w]");
    TORCH_CHECK(t.size(0) == N && t.size(1) == cm && t.size(2) <= H && t.size(3) <= W, kOp,
                "contributions[", k, "] must be [", N, ", ", cm, ", h <= ", H, ", w <= ", W,
                "], got ", t.sizes());
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kOp, "contributions[", k,
                "] must have channel stride 1 (channels_last), got strides ", t.strides());
  }
  at::Tensor out = at::empty({N, cls_m.outputs, H, W},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if HF_AMX_COMPILED
  HeadProblem p;
  p.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  p.N = N;
  p.H = H;
  p.W = W;
  p.ci = ci;
  p.proj = proj_m;
  p.cls = cls_m;
  p.cls.tail = 0;  // abuf is zero past Cm and so is the packed classifier: every K tile is full
  for (const at::Tensor& t : contributions)
    p.sources.push_back(hf_resize::make_source(t, H, W, mode_s == "nearest", align_corners));
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) { head_rows(p, begin, end); });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def(
      "seg_head_amx(Tensor x, Tensor proj, int[] proj_size, Tensor? proj_bias, "
      "Tensor[] contributions, str mode, bool align_corners, Tensor cls, int[] cls_size, "
      "Tensor? cls_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) { m.impl("seg_head_amx", &seg_head_amx); }

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
// are blended once (float32). Per block of 16 pixels: the projection's C tiles (groups of four N
// tiles) go to hbuf [16][16 NT] float32; the AVX-512 epilogue adds bias and resized contributions,
// applies the ReLU and writes h to abuf [16][32 KT] bfloat16 (zero past Cm, so the classifier's
// K tiles are all full: its packed weight is zero there too); the classifier's C tiles go to cbuf
// and out. Tile registers: 0 A (full K), 1 A (the projection's K tail), 2 B, 3 B (K tail), 4-7 C.
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
constexpr int kGroup = 4;   // C tiles
constexpr int64_t kTileElems = kK / 2 * kN * 2;  // bf16 values of one packed B tile

using hf_amx::amx_ready;
using hf_resize::Kind;
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
using hf_amx::TileConfig;

// Tile numbers are immediates in the instructions: one case per C tile.
#define HF_FOR_C(i, stmt)       \
  switch (i) {                  \
    case 0: { stmt(4); break; } \
    case 1: { stmt(5); break; } \
    case 2: { stmt(6); break; } \
    default: { stmt(7); break; } \
  }

// Every tile full-size: A 16 x 32 bf16, B 16 rows of 16 bf16 pairs, C 16 x 16 float32.
HF_AMX_TARGET void configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = i == 2 || i == 3 ? kK / 2 : kRows;
  }
  _tile_loadconfig(&cfg);
}

// The classifier's C tiles of one block for N tiles [g0, g0 + groups): sum over its K tiles (all
// full: abuf and the packed weight are zero past Cm) of A (abuf, 16 rows a_stride bytes apart)
// times m's B tiles, stored at column 16 t of dst (dst_stride bytes per row). Tile registers:
// 0 A, 2 B, 4-7 C.
HF_AMX_TARGET void block_matmul(const Matmul& m, const uint16_t* a, int64_t a_stride, int64_t g0,
                                int groups, float* dst, int64_t dst_stride) {
  for (int t = 0; t < groups; ++t) {
#define HF_ZERO(T) _tile_zero(T)
    HF_FOR_C(t, HF_ZERO)
  }
  const uint16_t* bt = m.b + g0 * m.kt * kTileElems;
  for (int64_t k = 0; k < m.kt; ++k) {
    _tile_loadd(0, a + k * kK, a_stride);
    for (int t = 0; t < groups; ++t) {
      _tile_loadd(2, bt + (t * m.kt + k) * kTileElems, kN * 4);
#define HF_DP(T) _tile_dpbf16ps(T, 0, 2)
      HF_FOR_C(t, HF_DP)
    }
  }
  for (int t = 0; t < groups; ++t) {
#define HF_STORE(T) _tile_stored(T, dst + t * kN, dst_stride)
    HF_FOR_C(t, HF_STORE)
  }
}
#undef HF_ZERO
#undef HF_DP
#undef HF_STORE
#undef HF_FOR_C

// The projection of two 16-pixel blocks (a[b]: each block's first pixel, rows ci values apart;
// a_tail[b]: its K tail, staged zero-padded to 32 values per row, when Ci is not a multiple of 32)
// into hbuf[b] ([16][hstride] float32), two blocks x two N tiles per pass: each B tile serves 32
// pixels (one block x four N tiles: 16, with the 68 KB of w18's packed projection streaming from
// L2 once per block). Tile registers: 0, 1 A (blocks), 2, 3 B (N tiles), 4 + 2 b + j C.
#define HF_TILE_PAIR(b, j, stmt)        \
  switch ((b) * 2 + (j)) {              \
    case 0: { stmt(4, 0, 2); break; }   \
    case 1: { stmt(5, 0, 3); break; }   \
    case 2: { stmt(6, 1, 2); break; }   \
    default: { stmt(7, 1, 3); break; }  \
  }

HF_AMX_TARGET void project_pair(const Matmul& m, const uint16_t* const a[2],
                                const uint16_t* const a_tail[2], int blocks, int64_t ci,
                                float* const hbuf[2], int64_t hstride) {
  const int64_t full_k = m.tail ? m.kt - 1 : m.kt;
  for (int64_t n0 = 0; n0 < m.nt; n0 += 2) {
    const int ntiles = m.nt - n0 >= 2 ? 2 : 1;
    for (int b = 0; b < blocks; ++b)
      for (int j = 0; j < ntiles; ++j) {
#define HF_ZERO2(C, A, B) _tile_zero(C)
        HF_TILE_PAIR(b, j, HF_ZERO2)
      }
    const uint16_t* bt = m.b + n0 * m.kt * kTileElems;
    for (int64_t k = 0; k < m.kt; ++k) {
      if (k < full_k) {
        _tile_loadd(0, a[0] + k * kK, ci * 2);
        if (blocks == 2) _tile_loadd(1, a[1] + k * kK, ci * 2);
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
#define HF_STORE2(C, A, B) _tile_stored(C, hbuf[b] + (n0 + j) * kN, hstride * 4)
        HF_TILE_PAIR(b, j, HF_STORE2)
      }
  }
}
#undef HF_ZERO2
#undef HF_DP2
#undef HF_STORE2
#undef HF_TILE_PAIR

HF_AMX_TARGET inline __m512 load_bf16(__mmask16 mask, const uint16_t* p) {
  const __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// dst[i] = h0 * r0[i] + h1 * r1[i] for one source pixel's Cm values (bfloat16 in, float32 out).
HF_AMX_TARGET void blend_pixel(float* dst, const uint16_t* r0, const uint16_t* r1, float h0,
                               float h1, int64_t cm) {
  const __m512 w0 = _mm512_set1_ps(h0), w1 = _mm512_set1_ps(h1);
  for (int64_t c = 0; c < cm; c += kN) {
    const int64_t left = cm - c;
    const __mmask16 mask = left >= kN ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(w0, load_bf16(mask, r0 + c)),
                                   _mm512_mul_ps(w1, load_bf16(mask, r1 + c)));
    _mm512_mask_storeu_ps(dst + c, mask, v);
  }
}

// Where one row's contribution values are: a bilinear source's blended row (float32, w Cm values),
// or the source row itself (bfloat16) for nearest and same-size sources.
struct RowSource {
  const Source* s;
  const float* blended;
  const uint16_t* row;
};

// h for the block's valid pixels: hbuf (float32, hstride floats per pixel) + bias + the resized
// contributions, ReLU, rounded to bfloat16 into abuf (astride values per pixel; columns past Cm are
// never written and stay zero).
HF_AMX_TARGET void head_epilogue(const HeadProblem& p, const std::vector<RowSource>& rows,
                                 const float* hbuf, int64_t hstride, uint16_t* abuf,
                                 int64_t astride, int64_t x0, int valid) {
  const int64_t cm = p.proj.outputs;
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < valid; ++r) {
    const int64_t x = x0 + r;
    const float* h = hbuf + r * hstride;
    uint16_t* a = abuf + r * astride;
    for (int64_t c = 0; c < cm; c += kN) {
      const int64_t left = cm - c;
      const __mmask16 mask = left >= kN ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << left) - 1u);
      __m512 v = _mm512_maskz_loadu_ps(mask, h + c);
      if (p.proj.bias != nullptr)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.proj.bias + c));
      for (const RowSource& rs : rows) {
        const Source& s = *rs.s;
        if (s.kind == Kind::Bilinear) {
          const __m512 t0 = _mm512_maskz_loadu_ps(mask, rs.blended + s.cols.off0[x] + c);
          const __m512 t1 = _mm512_maskz_loadu_ps(mask, rs.blended + s.cols.off1[x] + c);
          const __m512 lerp = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(s.cols.l0[x]), t0),
                                            _mm512_mul_ps(_mm512_set1_ps(s.cols.l1[x]), t1));
          v = _mm512_add_ps(v, lerp);
        } else {
          const int64_t off = s.kind == Kind::Same ? x * s.sw : s.cols.off0[x];
          v = _mm512_add_ps(v, load_bf16(mask, rs.row + off + c));
        }
      }
      v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN: the second operand wins
      const __m256bh o = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(a + c, mask, reinterpret_cast<__m256i>(o));
    }
  }
}

// The classifier's C tiles of N tiles [g0, g0 + groups) (cbuf [pixel][kGroup * 16], tile t at
// column 16 t) + bias -> out.
HF_AMX_TARGET void classifier_epilogue(const HeadProblem& p, const float* cbuf, int groups,
                                       int64_t g0, int64_t pix, int valid) {
  const int64_t co = p.cls.outputs;
  for (int t = 0; t < groups; ++t) {
    const int64_t ch = (g0 + t) * kN;
    const int count = static_cast<int>(std::min<int64_t>(kN, co - ch));
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
    const __m512 bias = p.cls.bias != nullptr ? _mm512_maskz_loadu_ps(mask, p.cls.bias + ch)
                                              : _mm512_setzero_ps();
    for (int r = 0; r < valid; ++r) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(cbuf + r * kGroup * kN + t * kN), bias);
      const __m256bh o = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(p.out + (pix + r) * co + ch, mask, reinterpret_cast<__m256i>(o));
    }
  }
}

HF_AMX_TARGET void head_rows(const HeadProblem& p, int64_t begin, int64_t end) {
  configure();
  const int64_t ci = p.ci, H = p.H, W = p.W, cm = p.proj.outputs;
  const int64_t hstride = p.proj.nt * kN;  // floats per pixel in hbuf
  const int64_t astride = p.cls.kt * kK;   // bf16 values per pixel in abuf (>= Cm, zero past it)
  std::vector<float> hbufs(static_cast<size_t>(2 * kRows * hstride));
  float* const hbuf[2] = {hbufs.data(), hbufs.data() + kRows * hstride};
  std::vector<uint16_t> abuf(static_cast<size_t>(kRows * astride), 0);
  // a partial block's pixels (rows past it would read past the tensor), and each block's K tail
  std::vector<uint16_t> stage(static_cast<size_t>(kRows * ci), 0);
  alignas(64) uint16_t tails[2][kRows * kK];
  const int64_t full_k = p.proj.tail ? p.proj.kt - 1 : p.proj.kt;
  const __mmask32 tail_mask = p.proj.tail ? static_cast<__mmask32>((1ull << p.proj.tail) - 1) : 0;
  alignas(64) float cbuf[kGroup * kRows * kN];
  std::vector<std::vector<float>> blended(p.sources.size());
  std::vector<RowSource> rows(p.sources.size());
  for (size_t k = 0; k < p.sources.size(); ++k) {
    if (p.sources[k].kind == Kind::Bilinear)
      blended[k].resize(static_cast<size_t>(p.sources[k].w * cm));
    rows[k].s = &p.sources[k];
    rows[k].blended = blended[k].data();
  }
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / H, y = item % H;
    for (size_t k = 0; k < p.sources.size(); ++k) {
      const Source& s = p.sources[k];
      const uint16_t* img = static_cast<const uint16_t*>(s.data) + n * s.sn;
      if (s.kind == Kind::Same) {
        rows[k].row = img + y * s.sh;
      } else if (s.kind == Kind::Nearest) {
        rows[k].row = img + s.rows.off0[y];
      } else {
        const uint16_t* r0 = img + s.rows.off0[y];
        const uint16_t* r1 = img + s.rows.off1[y];
        for (int64_t xs = 0; xs < s.w; ++xs)
          blend_pixel(blended[k].data() + xs * cm, r0 + xs * s.sw, r1 + xs * s.sw, s.rows.l0[y],
                      s.rows.l1[y], cm);
      }
    }
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
      }
      project_pair(p.proj, a, a_tail, blocks, ci, hbuf, hstride);
      for (int b = 0; b < blocks; ++b) {
        const int64_t xb = x0 + b * kRows;
        head_epilogue(p, rows, hbuf[b], hstride, abuf.data(), astride, xb, valid[b]);
        for (int64_t g0 = 0; g0 < p.cls.nt; g0 += kGroup) {
          const int groups = static_cast<int>(std::min<int64_t>(kGroup, p.cls.nt - g0));
          block_matmul(p.cls, abuf.data(), astride * 2, g0, groups, cbuf, kGroup * kN * 4);
          classifier_epilogue(p, cbuf, groups, g0, (n * H + y) * W + xb, valid[b]);
        }
      }
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

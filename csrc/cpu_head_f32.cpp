// hrnet_fast CPU kernel: the float32 segmentation head in one pass (AVX-512; AVX2 in
// csrc/cpu_head_f32_avx2.cpp).
//
//   hrnet_fast_cpu::seg_head_f32(Tensor x, Tensor proj, Tensor? proj_bias, Tensor[] contributions,
//                                str mode, bool align_corners, Tensor cls, Tensor? cls_bias)
//       -> Tensor
//     h   = relu(conv1x1(x, proj) + proj_bias + sum_k resize(contributions[k], x.shape[-2:]))
//     out = conv1x1(h, cls) + cls_bias
//     proj [Cm, Ci, 1, 1], cls [Co, Cm, 1, 1]; resize: mode "nearest" (legacy) or "bilinear"
//     (align_corners honoured), as F.interpolate(size=...); a contribution at x's size is added
//     as it is.
//
// The CPU engine's seg head in float32, as csrc/cpu_head_amx.cpp is in bfloat16 (see there for
// the head's inputs). Why: the head map h (w18 at 1x3x512x1024: 270 x 128 x 256 float32, 35 MB;
// w48: 720 channels) is never written. Unfused, oneDNN's 126 -> 270 projection took 20 ms, the fuse
// step 2.9 ms and the classifier 3.7 ms of a 490 ms w18 forward (torch.profiler, 2 threads).
//
// Tensors: float32 CPU; x [N, Ci, H, W] dense channels_last; contributions [N, Cm, h_k, w_k] with
// channel stride 1 (other strides are read), h_k <= H, w_k <= W; biases [Cm] / [Co] or None. The
// weights are laid out for the kernel on every call ([Ci][Cm] and [Cm][Co], zero-padded to the
// vector width, 16 lanes or 8 for AVX2: about 40 K values for w18, a few tens of microseconds).
// The output is a new channels_last tensor [N, Co, H, W]. Needs AVX-512 or AVX2 (torch's CPU
// capability; the AVX2 variant is csrc/cpu_head_f32_avx2.cpp, the same operations in the same
// order); elsewhere it raises and the engine keeps the unfused head.
//
// Numerics, per pixel, all float32, no intermediate rounding: a = sum over Ci in order of x * w
// (fused multiply-adds); a += bias; for each contribution a += its resized value (the formulas of
// csrc/cpu_fuse.cpp); h = relu(a) (NaN propagates); out = sum over Cm in order of h * w + bias.
// Agrees with the unfused head to float32 rounding (another summation order). No value outside a
// pixel's own inputs and its resize taps is read, so a NaN reaches exactly the pixels that read it.
//
// Work: at::parallel_for over output rows. Per row, each bilinear contribution's two source rows
// are blended once. Per block of 8 pixels: register tiles of 8 pixels x 3 vectors of 16 channels
// (24 accumulators; each weight vector is loaded once per input channel for 8 pixels, each input
// value broadcast once for 48 channels), the projection's tile finished right away (bias, taps,
// ReLU) into an [8][Cm] buffer in L1, then the classifier's tiles over it.
#include <ATen/Parallel.h>
#include <ATen/Version.h>  // at::get_cpu_capability
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_head_f32.h"
#include "cpu_isa.h"
#include "cpu_resize.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HF_HEAD_X86 1
#include <immintrin.h>
#define HF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define HF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HF_HEAD_X86 0
#endif

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::seg_head_f32: ";
constexpr int kLanes = 16;  // float32 lanes of a zmm register
constexpr int kVec = 3;     // 16-channel vectors per register tile

using hf_resize::Source;

using hf_isa::Isa;

// Which variant runs here (torch's CPU capability); none without x86-64.
bool head_supported() { return HF_HEAD_X86 && hf_isa::cpu_isa() != Isa::Default; }

// The variant's vector width in float32 lanes: weights and biases are laid out to multiples of it.
int64_t isa_lanes() { return hf_isa::cpu_isa() == Isa::Avx512 ? 16 : 8; }

int64_t round_up(int64_t v, int64_t lanes) { return (v + lanes - 1) / lanes * lanes; }

using hf_head::HeadF32;
using hf_head::kPx;

#if HF_HEAD_X86
// acc[p][j] = sum over k of rows[p][k] * w[k * wstride + 16 j .. + 16]: V vectors of 16 outputs
// for kPx rows (the loops unroll into registers: V * kPx accumulators).
template <int V>
HF_AVX512 HF_ALWAYS_INLINE void matmul_tile(const float* const rows[kPx], int64_t k_count,
                                            const float* w, int64_t wstride,
                                            __m512 acc[kPx][kVec]) {
  // local accumulators, copied out at the end: accumulating into the caller's array made GCC
  // store every accumulator to the stack on each k (2x slower than oneDNN's unfused head)
  __m512 a[kPx][V];
  for (int p = 0; p < kPx; ++p)
    for (int j = 0; j < V; ++j) a[p][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_count; ++k) {
    __m512 wv[V];
    for (int j = 0; j < V; ++j) wv[j] = _mm512_loadu_ps(w + k * wstride + j * kLanes);
    for (int p = 0; p < kPx; ++p) {
      const __m512 b = _mm512_set1_ps(rows[p][k]);
      for (int j = 0; j < V; ++j) a[p][j] = _mm512_fmadd_ps(b, wv[j], a[p][j]);
    }
  }
  for (int p = 0; p < kPx; ++p)
    for (int j = 0; j < V; ++j) acc[p][j] = a[p][j];
}

HF_AVX512 HF_ALWAYS_INLINE void matmul(int v, const float* const rows[kPx], int64_t k_count,
                                       const float* w, int64_t wstride, __m512 acc[kPx][kVec]) {
  if (v == 3)
    matmul_tile<3>(rows, k_count, w, wstride, acc);
  else if (v == 2)
    matmul_tile<2>(rows, k_count, w, wstride, acc);
  else
    matmul_tile<1>(rows, k_count, w, wstride, acc);
}

HF_AVX512 HF_ALWAYS_INLINE __mmask16 lanes_below(int64_t left) {
  return left >= kLanes ? static_cast<__mmask16>(0xFFFF)
                        : static_cast<__mmask16>((1u << left) - 1u);
}

using Tap = hf_resize::PixelTap<float>;

// dst[i] = fma(h0, r0[i], h1 * r1[i]) for one source pixel's Cm values; the fused multiply-add
// is explicit so the rounding does not depend on inlining.
HF_AVX512 void blend_pixel(float* dst, const float* r0, const float* r1, float h0, float h1,
                           int64_t cm) {
  const __m512 w0 = _mm512_set1_ps(h0), w1 = _mm512_set1_ps(h1);
  for (int64_t c = 0; c < cm; c += kLanes) {
    const __mmask16 mask = lanes_below(cm - c);
    const __m512 v = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, r0 + c),
                                     _mm512_mul_ps(w1, _mm512_maskz_loadu_ps(mask, r1 + c)));
    _mm512_mask_storeu_ps(dst + c, mask, v);
  }
}

HF_AVX512 void head_rows(const HeadF32& p, int64_t begin, int64_t end) {
  const int64_t ci = p.ci, H = p.H, W = p.W, cm = p.cm, cmp = p.cmp;
  const size_t nsrc = p.sources.size();
  std::vector<float> hbuf(static_cast<size_t>(kPx * cmp));  // h of one block, [8][cmp]
  std::vector<float> zeros(static_cast<size_t>(std::max(ci, cmp)), 0.0f);  // rows past W
  hf_resize::RowTaps<float> sources(p.sources, cm);
  std::vector<Tap> taps(kPx * std::max<size_t>(nsrc, 1));
  __m512 acc[kPx][kVec];
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / H, y = item % H;
    sources.start_row(n, y, blend_pixel);
    const float* xrow = p.x + (n * H + y) * W * ci;
    for (int64_t x0 = 0; x0 < W; x0 += kPx) {
      const int valid = static_cast<int>(std::min<int64_t>(kPx, W - x0));
      const float* xp[kPx];
      const float* hp[kPx];
      for (int q = 0; q < kPx; ++q) {
        xp[q] = q < valid ? xrow + (x0 + q) * ci : zeros.data();
        hp[q] = hbuf.data() + q * cmp;
      }
      sources.taps(taps.data(), x0, valid);
      // projection tiles, each finished at once into hbuf (zero past Cm: weights, bias and the
      // masked taps are zero there)
      for (int64_t v0 = 0; v0 < cmp / kLanes; v0 += kVec) {
        const int nv = static_cast<int>(std::min<int64_t>(kVec, cmp / kLanes - v0));
        matmul(nv, xp, ci, p.wp + v0 * kLanes, cmp, acc);
        for (int q = 0; q < valid; ++q) {
          const Tap* tap = taps.data() + q * nsrc;
          for (int j = 0; j < nv; ++j) {
            const int64_t ch = (v0 + j) * kLanes;
            const __mmask16 mask = lanes_below(cm - ch);
            __m512 v = _mm512_add_ps(acc[q][j], _mm512_loadu_ps(p.bp + ch));
            for (size_t k = 0; k < nsrc; ++k) {
              const Tap& t = tap[k];
              if (t.t0 != nullptr) {
                const __m512 a = _mm512_maskz_loadu_ps(mask, t.t0 + ch);
                const __m512 b = _mm512_maskz_loadu_ps(mask, t.t1 + ch);
                v = _mm512_add_ps(v, _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(t.w0), a),
                                                   _mm512_mul_ps(_mm512_set1_ps(t.w1), b)));
              } else {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, t.row + ch));
              }
            }
            _mm512_storeu_ps(hbuf.data() + q * cmp + ch, _mm512_max_ps(zero, v));  // NaN stays
          }
        }
      }
      // classifier tiles over h (rows past valid hold an earlier block's h: their sums are
      // discarded)
      float* out = p.out + ((n * H + y) * W + x0) * p.co;
      for (int64_t v0 = 0; v0 < p.cop / kLanes; v0 += kVec) {
        const int nv = static_cast<int>(std::min<int64_t>(kVec, p.cop / kLanes - v0));
        matmul(nv, hp, cm, p.wc + v0 * kLanes, p.cop, acc);
        for (int q = 0; q < valid; ++q)
          for (int j = 0; j < nv; ++j) {
            const int64_t ch = (v0 + j) * kLanes;
            const __m512 v = _mm512_add_ps(acc[q][j], _mm512_loadu_ps(p.bc + ch));
            _mm512_mask_storeu_ps(out + q * p.co + ch, lanes_below(p.co - ch), v);
          }
      }
    }
  }
}
#endif

// [outputs, inputs, 1, 1] -> [inputs][round_up(outputs, lanes)] float32, zero past outputs;
// bias -> [round_up(outputs, lanes)] (zeros when None).
std::vector<float> lay_out(const at::Tensor& w, int64_t outputs, int64_t inputs, int64_t lanes) {
  const int64_t stride = round_up(outputs, lanes);
  std::vector<float> dst(static_cast<size_t>(inputs * stride), 0.0f);
  const at::Tensor src = w.contiguous();
  const float* s = src.data_ptr<float>();
  for (int64_t o = 0; o < outputs; ++o)
    for (int64_t i = 0; i < inputs; ++i) dst[i * stride + o] = s[o * inputs + i];
  return dst;
}

std::vector<float> lay_out_bias(const c10::optional<at::Tensor>& b, int64_t outputs,
                                int64_t lanes, const char* what) {
  std::vector<float> dst(static_cast<size_t>(round_up(outputs, lanes)), 0.0f);
  if (b.has_value()) {
    TORCH_CHECK(b->device().is_cpu() && b->dim() == 1 && b->numel() == outputs, kOp, what,
                " must be a CPU tensor [", outputs, "], got ", b->sizes());
    const at::Tensor f = b->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + outputs, dst.begin());
  }
  return dst;
}

at::Tensor seg_head_f32(const at::Tensor& x, const at::Tensor& proj,
                        const c10::optional<at::Tensor>& proj_bias, at::TensorList contributions,
                        c10::string_view mode, bool align_corners, const at::Tensor& cls,
                        const c10::optional<at::Tensor>& cls_bias) {
  TORCH_CHECK(head_supported(), kOp, "needs AVX2 or AVX-512 (torch reports CPU capability ",
              at::get_cpu_capability(), ")");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              kOp, "x must be a dense channels_last float32 CPU tensor [N, Ci, H, W], got ",
              x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  const std::string mode_s(mode.data(), mode.size());
  TORCH_CHECK(mode_s == "nearest" || mode_s == "bilinear", kOp,
              "mode must be 'nearest' or 'bilinear', got '", mode_s, "'");
  const int64_t N = x.size(0), ci = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(proj.device().is_cpu() && proj.scalar_type() == at::kFloat && proj.dim() == 4 &&
                  proj.size(1) == ci && proj.size(2) == 1 && proj.size(3) == 1 &&
                  proj.size(0) > 0,
              kOp, "proj must be a float32 [Cm, ", ci, ", 1, 1] weight, got ",
              proj.scalar_type(), " ", proj.sizes());
  const int64_t cm = proj.size(0);
  TORCH_CHECK(cls.device().is_cpu() && cls.scalar_type() == at::kFloat && cls.dim() == 4 &&
                  cls.size(1) == cm && cls.size(2) == 1 && cls.size(3) == 1 && cls.size(0) > 0,
              kOp, "cls must be a float32 [Co, ", cm, ", 1, 1] weight, got ", cls.scalar_type(),
              " ", cls.sizes());
  const int64_t co = cls.size(0);
  for (size_t k = 0; k < contributions.size(); ++k) {
    const at::Tensor& t = contributions[k];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                    t.dim() == 4,
                kOp, "contributions[", k, "] must be a float32 CPU tensor [N, Cm, h, w]");
    TORCH_CHECK(t.size(0) == N && t.size(1) == cm && t.size(2) <= H && t.size(3) <= W, kOp,
                "contributions[", k, "] must be [", N, ", ", cm, ", h <= ", H, ", w <= ", W,
                "], got ", t.sizes());
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kOp, "contributions[", k,
                "] must have channel stride 1 (channels_last), got strides ", t.strides());
  }
  const int64_t lanes = isa_lanes();
  const std::vector<float> wp = lay_out(proj, cm, ci, lanes), wc = lay_out(cls, co, cm, lanes);
  const std::vector<float> bp = lay_out_bias(proj_bias, cm, lanes, "proj_bias");
  const std::vector<float> bc = lay_out_bias(cls_bias, co, lanes, "cls_bias");
  at::Tensor out =
      at::empty({N, co, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if HF_HEAD_X86
  HeadF32 p;
  p.x = x.data_ptr<float>();
  p.N = N;
  p.H = H;
  p.W = W;
  p.ci = ci;
  p.wp = wp.data();
  p.bp = bp.data();
  p.cm = cm;
  p.cmp = round_up(cm, lanes);
  p.wc = wc.data();
  p.bc = bc.data();
  p.co = co;
  p.cop = round_up(co, lanes);
  for (const at::Tensor& t : contributions)
    p.sources.push_back(hf_resize::make_source(t, H, W, mode_s == "nearest", align_corners));
  p.out = out.data_ptr<float>();
  const bool avx512 = hf_isa::cpu_isa() == Isa::Avx512;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    if (avx512) {
      head_rows(p, begin, end);
    } else {
      hf_head::head_rows_avx2(p, begin, end);
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def(
      "seg_head_f32(Tensor x, Tensor proj, Tensor? proj_bias, Tensor[] contributions, str mode, "
      "bool align_corners, Tensor cls, Tensor? cls_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) { m.impl("seg_head_f32", &seg_head_f32); }

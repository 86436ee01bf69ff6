// hrnet_fast CPU fuse kernel: the fuse step in one pass over memory.
//
//   hrnet_fast_cpu::upsample_add_relu(Tensor base, Tensor[] contributions, str mode,
//                                     bool align_corners, bool relu) -> Tensor
//     out = act(base + sum_k resize(contributions[k], base.shape[-2:]))
//     act = ReLU if relu (NaN propagates); resize = F.interpolate(size=...) with mode "nearest"
//     (legacy) or "bilinear" (align_corners honoured); a contribution at base's size is added as
//     it is. Each contribution is read at its own resolution: no full-size intermediate.
//
//   hrnet_fast_cpu::upsample_add_relu_into(Tensor(a!) base, Tensor[] contributions,
//                                          str interpolation, bool align_corners, bool relu) -> ()
//     the same (interpolation: the mode), written over base (dense channels_last, sharing no
//     memory with a contribution): the CPU seg head's fuse, whose base (the head's projection)
//     nothing reads afterwards. ("mode" would collide with torch's functionalisation wrapper,
//     which passes a mutating op's arguments by name next to its own "mode".)
//
//   hrnet_fast_cpu::resize_concat(Tensor[] parts, int[] size, str mode, bool align_corners)
//       -> Tensor
//     out = cat([resize(parts[k], size) for k], dim=1): the CPU seg head's input (branch 0 and the
//     narrow branches, resized) written in one pass, no resized intermediates. A part at ``size``
//     is copied bit for bit; the resize is the one below, rounded once to the storage dtype.
//
// Tensors: CPU, float32, bfloat16 or float16, one dtype for all. base and contributions have
// channel stride 1 (channels_last, or a channel slice of a channels_last tensor); their other
// strides are read, not assumed. Contributions (parts) are at most base's size (``size``):
// upsampling only. The output is a new dense channels_last tensor (hrnet_fast/cpu_ext.py's fake
// kernels say the same).
//
// Numerics, per output element, all in float32 whatever the storage dtype, one rounding at the
// store (round to nearest even; NaN stays NaN):
//   acc = base;  for each contribution: acc += its resized value;  out = act(acc)
// The resized value follows PyTorch's CPU kernels (aten/src/ATen/native/UpSample.h):
//   nearest:  scale = (float)in / (float)out;  src = min((int64)floorf((float)dst * scale), in - 1)
//   bilinear: scale = align_corners ? (out > 1 ? (float)(in - 1) / (float)(out - 1) : 0)
//                                   : (float)in / (float)out
//             real = align_corners ? scale * dst : max(scale * (dst + 0.5f) - 0.5f, 0)
//             i0 = min((int64)floorf(real), in - 1);  i1 = i0 + (i0 < in - 1)
//             l1 = clamp(real - i0, 0, 1);  l0 = 1 - l1
//             (an axis whose size does not change is copied: i0 = i1 = dst, l0 = 1, l1 = 0)
//             value = w0 * (h0*v00 + h1*v10) + w1 * (h0*v01 + h1*v11)
//   (separable: each pair of source rows is blended once per output row. PyTorch's channels_last
//   kernel sums v00*(h0*w0) + v01*(h0*w1) + ...; the two differ by about an ulp, 1e-7 relative).
//
// Work: at::parallel_for over output rows (n, y), so torch's thread setting applies (where torch's
// threads are OpenMP's this file is built with -fopenmp, see cpu_ext.py). A row is accumulated in
// float32 (in the output row itself for float32) by loops over channels, or over whole rows where
// they are dense, which the compiler vectorises. Build flags: plain -O3, no -march=native (a cached
// build may be shared by machines with other CPUs). Instead the row kernel is compiled three
// times, for AVX-512, AVX2+FMA and the baseline, and the variant is picked at run time from torch's
// own CPU capability (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY). Narrow ATen
// headers (not <torch/extension.h>) keep the build short.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "cpu_resize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define HF_INLINE inline __attribute__((always_inline))
#define HF_RESTRICT __restrict__
#else
#define HF_INLINE inline
#define HF_RESTRICT
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HF_X86_VARIANTS 1
#define HF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define HF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define HF_X86_VARIANTS 0
#endif

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::upsample_add_relu: ";

// ------------------------------------------------------------------------ storage <-> float32
struct F32 {
  using storage = float;
  static constexpr bool accumulates_in_place = true;  // the output row is the accumulator
  static HF_INLINE float load(float v) { return v; }
  static HF_INLINE float store(float v) { return v; }
};

struct BF16 {
  using storage = uint16_t;  // raw bits: plain integer ops vectorise
  static constexpr bool accumulates_in_place = false;
  static HF_INLINE float load(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static HF_INLINE uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest, ties to even
    return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
  }
};

struct F16 {
  using storage = uint16_t;
  static constexpr bool accumulates_in_place = false;
  static HF_INLINE float load(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static HF_INLINE uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

// Index tables and sources (Kind, AxisTable, nearest_axis, bilinear_axis, Source, make_source):
// csrc/cpu_resize.h, shared with the AMX seg head (csrc/cpu_head_amx.cpp).
using namespace hf_resize;

struct Plan {
  int64_t N, C, H, W;
  const void* base;
  int64_t bsn, bsh, bsw;
  void* out;  // dense channels_last: strides (H*W*C, 1, W*C, C)
  bool relu;
  bool in_place;  // out is base (upsample_add_relu_into): a float32 row already holds base
  int64_t max_blended;  // floats of the widest bilinear source row (w * C)
  std::vector<Source> sources;
};

// ------------------------------------------------------------------------------ row kernel
// Span helpers: the loops the compiler vectorises (restrict: the output is never an input).
template <typename S>
HF_INLINE void load_span(float* HF_RESTRICT acc, const typename S::storage* HF_RESTRICT src,
                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = S::load(src[i]);
}

template <typename S>
HF_INLINE void add_span(float* HF_RESTRICT acc, const typename S::storage* HF_RESTRICT src,
                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += S::load(src[i]);
}

// Vertical step of bilinear: two source rows blended into a dense float32 row.
template <typename S>
HF_INLINE void blend_rows(float* HF_RESTRICT tmp, const typename S::storage* HF_RESTRICT r0,
                          const typename S::storage* HF_RESTRICT r1, float h0, float h1,
                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) tmp[i] = h0 * S::load(r0[i]) + h1 * S::load(r1[i]);
}

// Horizontal step: two pixels of the blended row, weighted, added to the accumulator.
HF_INLINE void add_lerp(float* HF_RESTRICT acc, const float* HF_RESTRICT t0,
                        const float* HF_RESTRICT t1, float w0, float w1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w0 * t0[i] + w1 * t1[i];
}

template <typename S>
HF_INLINE void store_span(typename S::storage* HF_RESTRICT dst, const float* HF_RESTRICT acc,
                          int64_t n, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) dst[i] = S::store(acc[i] < 0.0f ? 0.0f : acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = S::store(acc[i]);
  }
}

HF_INLINE void relu_in_place(float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] < 0.0f ? 0.0f : acc[i];
}

// Output rows [begin, end) of the flattened (n, y) range.
template <typename S>
HF_INLINE void fuse_rows(const Plan& p, int64_t begin, int64_t end) {
  using T = typename S::storage;
  const int64_t C = p.C, W = p.W, row_len = W * C;
  std::vector<float> scratch(S::accumulates_in_place ? 0 : row_len);
  std::vector<float> blended(p.max_blended);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / p.H, y = r % p.H;
    T* out_row = static_cast<T*>(p.out) + r * row_len;
    float* acc = S::accumulates_in_place ? reinterpret_cast<float*>(out_row) : scratch.data();

    const T* b = static_cast<const T*>(p.base) + n * p.bsn + y * p.bsh;
    if (S::accumulates_in_place && p.in_place) {
      // acc is the output row, which is base's row: it already holds base
    } else if (p.bsw == C) {
      load_span<S>(acc, b, row_len);
    } else {
      for (int64_t x = 0; x < W; ++x) load_span<S>(acc + x * C, b + x * p.bsw, C);
    }

    for (const Source& s : p.sources) {
      const T* img = static_cast<const T*>(s.data) + n * s.sn;
      if (s.kind == Kind::Same) {
        const T* row = img + y * s.sh;
        if (s.sw == C) {
          add_span<S>(acc, row, row_len);
        } else {
          for (int64_t x = 0; x < W; ++x) add_span<S>(acc + x * C, row + x * s.sw, C);
        }
      } else if (s.kind == Kind::Nearest) {
        const T* row = img + s.rows.off0[y];
        const int64_t* cols = s.cols.off0.data();
        for (int64_t x = 0; x < W; ++x) add_span<S>(acc + x * C, row + cols[x], C);
      } else {
        // Separable: blend the two source rows once (w pixels), then interpolate along x.
        const T* row0 = img + s.rows.off0[y];
        const T* row1 = img + s.rows.off1[y];
        const float h0 = s.rows.l0[y], h1 = s.rows.l1[y];
        if (s.sw == C) {
          blend_rows<S>(blended.data(), row0, row1, h0, h1, s.w * C);
        } else {
          for (int64_t xs = 0; xs < s.w; ++xs) {
            blend_rows<S>(blended.data() + xs * C, row0 + xs * s.sw, row1 + xs * s.sw, h0, h1, C);
          }
        }
        const float* t = blended.data();
        for (int64_t x = 0; x < W; ++x) {
          add_lerp(acc + x * C, t + s.cols.off0[x], t + s.cols.off1[x], s.cols.l0[x],
                   s.cols.l1[x], C);
        }
      }
    }

    if (S::accumulates_in_place) {
      if (p.relu) relu_in_place(acc, row_len);
    } else {
      store_span<S>(out_row, acc, row_len, p.relu);
    }
  }
}

// ------------------------------------------------------------------------------ resize_concat
struct ConcatPart {
  Source src;
  int64_t C, offset;  // channels, first output channel
};

struct ConcatPlan {
  int64_t N, H, W, Ctot;
  void* out;  // dense channels_last: strides (H*W*Ctot, 1, W*Ctot, Ctot)
  int64_t max_blended;
  std::vector<ConcatPart> parts;
};

template <typename T>
HF_INLINE void copy_span(T* HF_RESTRICT dst, const T* HF_RESTRICT src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// Horizontal step of bilinear, stored: dst = round(w0 * t0 + w1 * t1).
template <typename S>
HF_INLINE void store_lerp(typename S::storage* HF_RESTRICT dst, const float* HF_RESTRICT t0,
                          const float* HF_RESTRICT t1, float w0, float w1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = S::store(w0 * t0[i] + w1 * t1[i]);
}

template <typename S>
HF_INLINE void concat_rows(const ConcatPlan& p, int64_t begin, int64_t end) {
  using T = typename S::storage;
  const int64_t W = p.W, Ct = p.Ctot;
  std::vector<float> blended(p.max_blended);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / p.H, y = r % p.H;
    T* out_row = static_cast<T*>(p.out) + r * W * Ct;
    for (const ConcatPart& part : p.parts) {
      const Source& s = part.src;
      const int64_t C = part.C;
      T* dst = out_row + part.offset;
      const T* img = static_cast<const T*>(s.data) + n * s.sn;
      if (s.kind == Kind::Same) {
        const T* row = img + y * s.sh;
        for (int64_t x = 0; x < W; ++x) copy_span(dst + x * Ct, row + x * s.sw, C);
      } else if (s.kind == Kind::Nearest) {
        const T* row = img + s.rows.off0[y];
        const int64_t* cols = s.cols.off0.data();
        for (int64_t x = 0; x < W; ++x) copy_span(dst + x * Ct, row + cols[x], C);
      } else {
        const T* row0 = img + s.rows.off0[y];
        const T* row1 = img + s.rows.off1[y];
        const float h0 = s.rows.l0[y], h1 = s.rows.l1[y];
        for (int64_t xs = 0; xs < s.w; ++xs) {
          blend_rows<S>(blended.data() + xs * C, row0 + xs * s.sw, row1 + xs * s.sw, h0, h1, C);
        }
        const float* t = blended.data();
        for (int64_t x = 0; x < W; ++x) {
          store_lerp<S>(dst + x * Ct, t + s.cols.off0[x], t + s.cols.off1[x], s.cols.l0[x],
                        s.cols.l1[x], C);
        }
      }
    }
  }
}

// A row kernel compiled for each instruction set (always_inline puts the body under the caller's
// target attribute, where the loops vectorise for that ISA): Kernel is fuse_rows<S> or
// concat_rows<S>, P its plan.
template <typename P>
using KernelFn = void (*)(const P&, int64_t, int64_t);

template <typename P, KernelFn<P> Kernel>
void on_baseline(const P& p, int64_t b, int64_t e) { Kernel(p, b, e); }

#if HF_X86_VARIANTS
template <typename P, KernelFn<P> Kernel>
HF_TARGET_AVX2 void on_avx2(const P& p, int64_t b, int64_t e) { Kernel(p, b, e); }

template <typename P, KernelFn<P> Kernel>
HF_TARGET_AVX512 void on_avx512(const P& p, int64_t b, int64_t e) { Kernel(p, b, e); }
#endif

using RowFn = KernelFn<Plan>;
using ConcatFn = KernelFn<ConcatPlan>;

// The variant of Kernel for torch's CPU capability.
template <typename P, KernelFn<P> Kernel>
KernelFn<P> pick_isa() {
#if HF_X86_VARIANTS
  switch (hf_isa::cpu_isa()) {
    case hf_isa::Isa::Avx512:
      return &on_avx512<P, Kernel>;
    case hf_isa::Isa::Avx2:
      return &on_avx2<P, Kernel>;
    default:
      break;
  }
#endif
  return &on_baseline<P, Kernel>;
}

template <typename S>
RowFn pick_rows() { return pick_isa<Plan, &fuse_rows<S>>(); }

template <typename S>
ConcatFn pick_concat() { return pick_isa<ConcatPlan, &concat_rows<S>>(); }

// ------------------------------------------------------------------------------ the op

void check_channel_stride(const at::Tensor& t, const char* what, int64_t k) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kOp, what, k >= 0 ? "[" : "",
              k >= 0 ? std::to_string(k) : std::string(), k >= 0 ? "]" : "",
              " must have channel stride 1 (channels_last or a channel slice of one), got strides ",
              t.strides());
}

// The op's body; ``into`` true: the result is written over base (dense channels_last, no
// contribution sharing its memory) and base is returned.
at::Tensor fuse_impl(const at::Tensor& base, at::TensorList contributions, c10::string_view mode,
                     bool align_corners, bool relu, bool into) {
  TORCH_CHECK(base.defined(), kOp, "base is undefined");
  TORCH_CHECK(base.device().is_cpu(), kOp, "base must be a CPU tensor, got one on ", base.device());
  TORCH_CHECK(base.dim() == 4, kOp, "base must be 4-d [N, C, H, W], got shape ", base.sizes());
  const at::ScalarType dtype = base.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  const std::string mode_s(mode.data(), mode.size());
  TORCH_CHECK(mode_s == "nearest" || mode_s == "bilinear", kOp,
              "mode must be 'nearest' or 'bilinear', got '", mode_s, "'");
  check_channel_stride(base, "base", -1);

  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  for (size_t k = 0; k < contributions.size(); ++k) {
    const at::Tensor& t = contributions[k];
    TORCH_CHECK(t.defined(), kOp, "contributions[", k, "] is undefined");
    TORCH_CHECK(t.device() == base.device(), kOp, "contributions[", k, "] is on ", t.device(),
                " but base is on ", base.device());
    TORCH_CHECK(t.scalar_type() == dtype, kOp, "contributions[", k, "] has dtype ",
                t.scalar_type(), " but base has ", dtype);
    TORCH_CHECK(t.dim() == 4, kOp, "contributions[", k, "] must be 4-d, got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == N && t.size(1) == C, kOp, "contributions[", k, "] has shape ",
                t.sizes(), ": batch and channels must match base's ", base.sizes());
    TORCH_CHECK(t.size(2) <= H && t.size(3) <= W, kOp, "contributions[", k, "] has shape ",
                t.sizes(), ", larger than base's ", base.sizes(),
                " (only upsampling is supported)");
    TORCH_CHECK(base.numel() == 0 || (t.size(2) > 0 && t.size(3) > 0), kOp, "contributions[", k,
                "] is empty (shape ", t.sizes(), ")");
    check_channel_stride(t, "contributions", static_cast<int64_t>(k));
  }

  if (into) {
    TORCH_CHECK(base.is_contiguous(at::MemoryFormat::ChannelsLast), kOp,
                "into base: base must be dense channels_last, got strides ", base.strides());
    for (size_t k = 0; k < contributions.size(); ++k) {
      TORCH_CHECK(!contributions[k].is_alias_of(base), kOp, "into base: contributions[", k,
                  "] shares memory with base");
    }
  }
  at::Tensor out = into ? base
                        : at::empty(base.sizes(),
                                    base.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  Plan p;
  p.N = N;
  p.C = C;
  p.H = H;
  p.W = W;
  p.base = base.data_ptr();
  p.bsn = base.stride(0);
  p.bsh = base.stride(2);
  p.bsw = base.stride(3);
  p.out = out.data_ptr();
  p.relu = relu;
  p.in_place = into;
  p.max_blended = 0;
  p.sources.reserve(contributions.size());
  const bool nearest = mode_s == "nearest";
  for (const at::Tensor& t : contributions) {
    p.sources.push_back(make_source(t, H, W, nearest, align_corners));
    if (p.sources.back().kind == Kind::Bilinear) {
      p.max_blended = std::max(p.max_blended, t.size(3) * C);
    }
  }

  RowFn rows = dtype == at::kFloat ? pick_rows<F32>()
               : dtype == at::kBFloat16 ? pick_rows<BF16>()
                                        : pick_rows<F16>();
  // About 16K output values per task: enough work to amortise a task, small rows still split.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, W * C));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) { rows(p, begin, end); });
  return out;
}

at::Tensor upsample_add_relu(const at::Tensor& base, at::TensorList contributions,
                             c10::string_view mode, bool align_corners, bool relu) {
  return fuse_impl(base, contributions, mode, align_corners, relu, false);
}

void upsample_add_relu_into(const at::Tensor& base, at::TensorList contributions,
                            c10::string_view mode, bool align_corners, bool relu) {
  fuse_impl(base, contributions, mode, align_corners, relu, true);
}

constexpr const char* kConcatOp = "hrnet_fast_cpu::resize_concat: ";

at::Tensor resize_concat(at::TensorList parts, at::IntArrayRef size, c10::string_view mode,
                         bool align_corners) {
  TORCH_CHECK(!parts.empty(), kConcatOp, "parts is empty");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, kConcatOp,
              "size must be two positive integers, got ", size);
  const std::string mode_s(mode.data(), mode.size());
  TORCH_CHECK(mode_s == "nearest" || mode_s == "bilinear", kConcatOp,
              "mode must be 'nearest' or 'bilinear', got '", mode_s, "'");
  const at::Tensor& first = parts[0];
  TORCH_CHECK(first.defined() && first.device().is_cpu() && first.dim() == 4, kConcatOp,
              "parts[0] must be a 4-d CPU tensor");
  const at::ScalarType dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kConcatOp,
              "dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t N = first.size(0), H = size[0], W = size[1];
  int64_t Ctot = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    const at::Tensor& t = parts[k];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.dim() == 4, kConcatOp, "parts[", k,
                "] must be a 4-d CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, kConcatOp, "parts[", k, "] has dtype ", t.scalar_type(),
                " but parts[0] has ", dtype);
    TORCH_CHECK(t.size(0) == N, kConcatOp, "parts[", k, "] has batch ", t.size(0), ", parts[0] ", N);
    TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0 && t.size(2) <= H && t.size(3) <= W, kConcatOp,
                "parts[", k, "] has shape ", t.sizes(), ": its size must be within ", size,
                " (only upsampling is supported)");
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kConcatOp, "parts[", k,
                "] must have channel stride 1 (channels_last), got strides ", t.strides());
    Ctot += t.size(1);
  }
  at::Tensor out = at::empty({N, Ctot, H, W},
                             first.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  ConcatPlan p;
  p.N = N;
  p.H = H;
  p.W = W;
  p.Ctot = Ctot;
  p.out = out.data_ptr();
  p.max_blended = 0;
  const bool nearest = mode_s == "nearest";
  int64_t offset = 0;
  for (const at::Tensor& t : parts) {
    ConcatPart part{};
    part.src = make_source(t, H, W, nearest, align_corners);
    const int64_t C = t.size(1);
    if (part.src.kind == Kind::Bilinear) p.max_blended = std::max(p.max_blended, t.size(3) * C);
    part.C = C;
    part.offset = offset;
    offset += C;
    p.parts.push_back(std::move(part));
  }
  ConcatFn rows = dtype == at::kFloat ? pick_concat<F32>()
                  : dtype == at::kBFloat16 ? pick_concat<BF16>()
                                           : pick_concat<F16>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, W * Ctot));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) { rows(p, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY(hrnet_fast_cpu, m) {
  m.def(
      "upsample_add_relu(Tensor base, Tensor[] contributions, str mode, bool align_corners, "
      "bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("resize_concat(Tensor[] parts, int[] size, str mode, bool align_corners) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "upsample_add_relu_into(Tensor(a!) base, Tensor[] contributions, str interpolation, "
      "bool align_corners, bool relu) -> ()",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) {
  m.impl("upsample_add_relu", &upsample_add_relu);
  m.impl("resize_concat", &resize_concat);
  m.impl("upsample_add_relu_into", &upsample_add_relu_into);
}

// hrnet_fast CPU kernel: float32 1x1 convolution (stride 1) on AVX2 + FMA, channels_last, with the
// epilogue (bias, residual add, ReLU) applied before the output leaves the registers.
//
//   out[n, co, y, x] = act(bias[co] + sum_{k < Ci} W[co, k] x[n, k, y, x]
//                                    + sum_{k < Ci2} W[co, Ci + k] x2[n, k, y, x] + residual[n, co, y, x])
//   act = ReLU or identity; x2 (optional) is a second input of the same N, H, W whose weights
//   follow x's in K: a bottleneck's last conv and its downsample as one GEMM (their biases added
//   by the caller), so the downsample's output is never written and read back.
//   float32 only; x, x2 and residual dense channels_last; the output a new dense channels_last
//   tensor, or the residual written in place (conv1x1_into).
//
// Why: layer1 of every HRNet preset is four bottlenecks of 64 <-> 256 channel 1x1 convs at a
// quarter of the input size (2 x 1.07 GFLOP per block at 512x1024), and the fuse steps add a
// batched 1x1 per branch. On AVX2 CPUs torch's oneDNN ran them at 40-130 GFLOP/s (2 threads, AMD
// EPYC Zen 3, peak 200); against it, same process, this kernel ran layer1's 64 -> 256 into the
// residual 1.13x, the downsample merge 1.10x and the fuse steps' 1x1s 1.03-1.30x, and lost on
// the input-bound 256 -> 64 (0.92-0.98x, left to oneDNN) (benchmarks/RESULTS.md, "a float32 1x1
// conv kernel for AVX2"). Only AVX2: on AVX-512 CPUs oneDNN has twice the vector width, and the
// engine keeps it there (hrnet_fast/backends/torch_cpu.py).
//
// GEMM: pixels (N * H * W rows of the channels_last input) x K, times K x Co. Register tile: 6
// pixels x 16 channels (12 ymm accumulators, 2 weight loads and 6 broadcasts per k; 6 x 8 for a
// last panel of 8 channels). Weights packed in panels of 16 output channels, [K][16] each, so a
// tile's weight loads are one contiguous stream (the [K][Co] form put them Co * 4 bytes apart,
// for Co = 256 in 4 of L1's 64 sets). Work: at::parallel_for over blocks of pixels small enough
// that the block's input rows stay in L1 while every panel passes over them; each tile prefetches
// the output (and residual) lines of the tile two below it, whose stores otherwise miss to DRAM
// one line at a time (64 -> 256 with residual: 7.7 -> 6.6-6.9 ms). Edge tiles (the last pixels
// of the tensor, a last panel's channels past Co) are computed in a staging tile and copied.
// Narrow includes, as in the other kernels: with <ATen/ATen.h> this file took 17.7 s to compile,
// with these 13.3 s (g++ -O3, AMD EPYC); it is the last one the 2-core JIT build waits for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"

namespace {

constexpr const char* kOp = "hrnet_fast_cpu::conv1x1: ";
constexpr int kTilePx = 6;       // pixels per register tile
constexpr int kPanel = 16;       // output channels per weight panel (the last may be 8)
constexpr int kHalf = 8;         // a ymm register's float32 lanes
constexpr int64_t kBlockBytes = 12 * 1024;  // a block's input rows: L1 (32 KB) minus weights
constexpr int64_t kMaxBlockPx = 96;
constexpr int64_t kPrefetchPx = 2 * kTilePx;  // output rows prefetched ahead of the tile

// Channels of panel j: 16, or 8 for a last panel of Co rounded up to 8 that holds at most 8.
int64_t padded_co(int64_t co) { return (co + kHalf - 1) / kHalf * kHalf; }
int64_t panel_width(int64_t co_pad, int64_t j) {
  return std::min<int64_t>(kPanel, co_pad - j * kPanel);
}

struct Problem {
  const float* x;  // [P][ci]
  const float* x2;  // [P][ci2] or null
  int64_t P, ci, ci2, co, co_pad;
  const float* w;     // panels: panel j at j * 16 * K, [K][width_j]
  const float* bias;  // [co_pad] (zero past co)
  const float* res;   // [P][co] or null
  float* out;         // [P][co]; may be res
  bool relu;
};

}  // namespace

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define HF_AVX2 __attribute__((target("avx2,fma")))

namespace {

// c[p][j] += sum over k < kn of rows[p][k] * w[k][8 j .. 8 j + 8] for the six rows s0 + p * ld;
// advances w past the kn weight rows. The rows as two base pointers and x86's scaled addressing
// (row, row + ld, row + 2 ld), the loops fully unrolled so that c stays in registers.
template <int V>
HF_AVX2 inline __attribute__((always_inline)) void accumulate(const float* s0, int64_t ld,
                                                               int64_t kn, const float*& w,
                                                               __m256 (&c)[kTilePx][V]) {
  const float* s3 = s0 + 3 * ld;
  for (int64_t k = 0; k < kn; ++k, w += V * kHalf) {
    __m256 wv[V];
#pragma GCC unroll 2
    for (int j = 0; j < V; ++j) wv[j] = _mm256_loadu_ps(w + j * kHalf);
    // One broadcast live at a time: 12 accumulators, 2 weights and 1 broadcast fit the 16 ymm
    // registers (all six broadcasts first spilled four accumulators to the stack).
    const float* rows[kTilePx] = {s0 + k, s0 + ld + k, s0 + 2 * ld + k,
                                  s3 + k, s3 + ld + k, s3 + 2 * ld + k};
#pragma GCC unroll 6
    for (int p = 0; p < kTilePx; ++p) {
      const __m256 b = _mm256_broadcast_ss(rows[p]);
#pragma GCC unroll 2
      for (int j = 0; j < V; ++j) c[p][j] = _mm256_fmadd_ps(b, wv[j], c[p][j]);
    }
  }
}

// One register tile: 6 pixel rows a + p * lda (k < k1) and a2 + p * lda2 (k < k2) against a
// panel of V vectors (w: [k1 + k2][8 V]); out rows o + p * ldo = act(bias + sums + r + p * ldr).
// pfo / pfr: rows (stride ldo / ldr) to prefetch for writing / reading, or null.
template <int V, bool RES, bool RELU>
HF_AVX2 __attribute__((noinline)) void tile(const float* a, int64_t lda, int64_t k1,
                                            const float* a2, int64_t lda2, int64_t k2,
                                            const float* w, const float* bias, const float* r,
                                            int64_t ldr, float* o, int64_t ldo, const float* pfo,
                                            const float* pfr) {
  if (pfo != nullptr)
    for (int p = 0; p < kTilePx; ++p) __builtin_prefetch(pfo + p * ldo, 1, 3);
  if (pfr != nullptr)
    for (int p = 0; p < kTilePx; ++p) __builtin_prefetch(pfr + p * ldr, 0, 3);
  __m256 c[kTilePx][V];
#pragma GCC unroll 2
  for (int j = 0; j < V; ++j) {
    const __m256 b = _mm256_loadu_ps(bias + j * kHalf);
#pragma GCC unroll 6
    for (int p = 0; p < kTilePx; ++p) c[p][j] = b;
  }
  accumulate<V>(a, lda, k1, w, c);
  if (k2 > 0) accumulate<V>(a2, lda2, k2, w, c);
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int p = 0; p < kTilePx; ++p)
#pragma GCC unroll 2
    for (int j = 0; j < V; ++j) {
      __m256 v = c[p][j];
      if (RES) v = _mm256_add_ps(v, _mm256_loadu_ps(r + p * ldr + j * kHalf));
      // max_ps returns its second operand when either is NaN: max(0, NaN) keeps the NaN, as
      // torch's ReLU does.
      if (RELU) v = _mm256_max_ps(zero, v);
      _mm256_storeu_ps(o + p * ldo + j * kHalf, v);
    }
}

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                        const float*, const float*, const float*, int64_t, float*, int64_t,
                        const float*, const float*);

template <int V>
TileFn pick(bool res, bool relu) {
  if (res) return relu ? tile<V, true, true> : tile<V, true, false>;
  return relu ? tile<V, false, true> : tile<V, false, false>;
}

HF_AVX2 void run_avx2(const Problem& p) {
  const int64_t K = p.ci + p.ci2;
  const int64_t panels = (p.co_pad + kPanel - 1) / kPanel;
  const int64_t fit = kBlockBytes / (K * int64_t{sizeof(float)}) / kTilePx * kTilePx;
  const int64_t block = std::min(kMaxBlockPx, std::max<int64_t>(kTilePx, fit));
  const int64_t blocks = (p.P + block - 1) / block;
  const bool res = p.res != nullptr;
  const TileFn wide = pick<2>(res, p.relu), narrow = pick<1>(res, p.relu);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // Staging for edge tiles: input rows (zero past the tensor), residual and output tiles.
    std::vector<float> sx(kTilePx * p.ci, 0.0f), sx2(kTilePx * std::max<int64_t>(p.ci2, 1), 0.0f);
    float sres[kTilePx * kPanel] = {}, sout[kTilePx * kPanel];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t p0 = b * block, p1 = std::min(p.P, p0 + block);
      for (int64_t j = 0; j < panels; ++j) {
        const int64_t c0 = j * kPanel, width = panel_width(p.co_pad, j);
        const int64_t valid_c = std::min(width, p.co - c0);  // < width only in the last panel
        const TileFn fn = width == kPanel ? wide : narrow;
        const float* wj = p.w + c0 * K;
        for (int64_t q = p0; q < p1; q += kTilePx) {
          const int64_t rows = std::min<int64_t>(kTilePx, p.P - q);
          const float* xa = p.x + q * p.ci;
          const float* xb = p.x2 != nullptr ? p.x2 + q * p.ci2 : nullptr;
          if (rows == kTilePx && valid_c == width) {
            const int64_t ahead = q + kPrefetchPx;
            const bool pf = ahead + kTilePx <= p.P;
            fn(xa, p.ci, p.ci, xb, p.ci2, p.ci2, wj, p.bias + c0,
               res ? p.res + q * p.co + c0 : nullptr, p.co, p.out + q * p.co + c0, p.co,
               pf ? p.out + ahead * p.co + c0 : nullptr,
               pf && res ? p.res + ahead * p.co + c0 : nullptr);
            continue;
          }
          // Edge tile: rows past the tensor read zeros, channels past Co are not stored.
          if (rows < kTilePx) {
            std::copy(xa, xa + rows * p.ci, sx.begin());
            std::fill(sx.begin() + rows * p.ci, sx.end(), 0.0f);
            if (xb != nullptr) {
              std::copy(xb, xb + rows * p.ci2, sx2.begin());
              std::fill(sx2.begin() + rows * p.ci2, sx2.end(), 0.0f);
            }
            xa = sx.data();
            xb = xb != nullptr ? sx2.data() : nullptr;
          }
          if (res)
            for (int64_t r = 0; r < rows; ++r)
              std::copy(p.res + (q + r) * p.co + c0, p.res + (q + r) * p.co + c0 + valid_c,
                        sres + r * kPanel);
          fn(xa, p.ci, p.ci, xb, p.ci2, p.ci2, wj, p.bias + c0, res ? sres : nullptr, kPanel,
             sout, kPanel, nullptr, nullptr);
          for (int64_t r = 0; r < rows; ++r)
            std::copy(sout + r * kPanel, sout + r * kPanel + valid_c, p.out + (q + r) * p.co + c0);
        }
      }
    }
  });
}

bool avx2_built() { return true; }

}  // namespace
#else
namespace {
void run_avx2(const Problem&) { TORCH_CHECK(false, kOp, "built without x86-64 AVX2"); }
bool avx2_built() { return false; }
}  // namespace
#endif

namespace {

bool available() { return avx2_built() && hf_isa::cpu_isa() != hf_isa::Isa::Default; }

// weight [Co, K] or [Co, K, 1, 1] -> panels (see Problem::w), zero past Co.
at::Tensor conv1x1_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat, kOp, "weight must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1),
              kOp, "weight must be [Co, K] or [Co, K, 1, 1], got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, kOp, "weight is empty: ", weight.sizes());
  const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).to(at::kCPU).contiguous();
  const int64_t co = w.size(0), K = w.size(1), co_pad = padded_co(co);
  at::Tensor packed = at::zeros({co_pad, K}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  for (int64_t c = 0; c < co; ++c) {
    const int64_t j = c / kPanel, width = panel_width(co_pad, j);
    float* panel = dst + j * kPanel * K;
    for (int64_t k = 0; k < K; ++k) panel[k * width + c % kPanel] = src[c * K + k];
  }
  return packed;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, kOp, name, " must be 4-d [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), kOp, name,
              " must be dense channels_last, got strides ", t.strides());
}

Problem describe(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x2,
                 const at::Tensor* residual, at::Tensor* bias_store) {
  TORCH_CHECK(available(), kOp, "needs an x86-64 CPU with AVX2 and FMA");
  check_input(x, "x");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.dim() == 2 &&
                  packed.is_contiguous(),
              kOp, "packed must come from conv1x1_pack, got ", packed.scalar_type(), " ",
              packed.sizes());
  const int64_t co_pad = packed.size(0), K = packed.size(1);
  TORCH_CHECK(out_channels > 0 && padded_co(out_channels) == co_pad, kOp, "out_channels ",
              out_channels, " does not match the packed weight (", co_pad, " padded channels)");
  const int64_t ci2 = x2.has_value() ? x2->size(1) : 0;
  TORCH_CHECK(x.size(1) + ci2 == K, kOp, "x has ", x.size(1), " channels", ci2 ? " and x2 " : "",
              ci2 ? std::to_string(ci2) : std::string(), ", the packed weight takes ", K);
  if (x2.has_value()) {
    check_input(*x2, "x2");
    TORCH_CHECK(x2->size(0) == x.size(0) && x2->size(2) == x.size(2) && x2->size(3) == x.size(3),
                kOp, "x2 has shape ", x2->sizes(), ", x has ", x.sizes(), ": N, H, W must match");
  }
  if (residual != nullptr) {
    check_input(*residual, "residual");
    TORCH_CHECK(residual->size(0) == x.size(0) && residual->size(1) == out_channels &&
                    residual->size(2) == x.size(2) && residual->size(3) == x.size(3),
                kOp, "residual has shape ", residual->sizes(), ", expected [", x.size(0), ", ",
                out_channels, ", ", x.size(2), ", ", x.size(3), "]");
  }
  *bias_store = at::zeros({co_pad}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == out_channels,
                kOp, "bias must be float32 [", out_channels, "] on the CPU, got ",
                bias->scalar_type(), " ", bias->sizes());
    bias_store->narrow(0, 0, out_channels).copy_(*bias);
  }
  Problem p;
  p.x = x.data_ptr<float>();
  p.x2 = x2.has_value() ? x2->data_ptr<float>() : nullptr;
  p.P = x.size(0) * x.size(2) * x.size(3);
  p.ci = x.size(1);
  p.ci2 = ci2;
  p.co = out_channels;
  p.co_pad = co_pad;
  p.w = packed.data_ptr<float>();
  p.bias = bias_store->data_ptr<float>();
  p.res = residual != nullptr ? residual->data_ptr<float>() : nullptr;
  p.out = nullptr;
  p.relu = false;
  return p;
}

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                   bool relu, const c10::optional<at::Tensor>& x2) {
  at::Tensor b;
  Problem p = describe(x, packed, out_channels, bias, x2, residual.has_value() ? &*residual : nullptr,
                       &b);
  at::Tensor out = at::empty({x.size(0), out_channels, x.size(2), x.size(3)},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  p.out = out.data_ptr<float>();
  p.relu = relu;
  if (p.P > 0) run_avx2(p);
  return out;
}

void conv1x1_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& packed,
                  int64_t out_channels, const c10::optional<at::Tensor>& bias, bool relu,
                  const c10::optional<at::Tensor>& x2) {
  at::Tensor b;
  Problem p = describe(x, packed, out_channels, bias, x2, &residual, &b);
  // A block's input rows are read for every panel after earlier panels wrote their outputs.
  TORCH_CHECK(!residual.storage().is_alias_of(x.storage()) &&
                  !(x2.has_value() && residual.storage().is_alias_of(x2->storage())),
              kOp, "residual (written in place) must not share memory with x or x2");
  p.out = residual.data_ptr<float>();
  p.relu = relu;
  if (p.P > 0) run_avx2(p);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def("conv1x1_pack(Tensor weight) -> Tensor");
  m.def(
      "conv1x1(Tensor x, Tensor packed, int out_channels, Tensor? bias, Tensor? residual, "
      "bool relu, Tensor? x2=None) -> Tensor");
  m.def(
      "conv1x1_into(Tensor(a!) residual, Tensor x, Tensor packed, int out_channels, Tensor? bias, "
      "bool relu, Tensor? x2=None) -> ()");
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) {
  m.impl("conv1x1_pack", &conv1x1_pack);
  m.impl("conv1x1", &conv1x1);
  m.impl("conv1x1_into", &conv1x1_into);
}

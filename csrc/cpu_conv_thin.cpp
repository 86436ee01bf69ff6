// hrnet_fast CPU kernel: 3x3 convolutions of thin channels_last layers (w18's 18, 36 and 72 channels).
//
//   hrnet_fast_cpu::conv3x3_thin(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu,
//                                bool channels_last) -> Tensor
//     out = act(conv2d(x, weight, bias, stride=1, padding=1) + residual), a new dense tensor,
//     channels_last or (channels_last=False) contiguous NCHW ("planar")
//   hrnet_fast_cpu::conv3x3_thin_into(Tensor(a!) residual, Tensor x, Tensor weight, Tensor? bias,
//                                     bool relu) -> ()
//     the same with the result written over ``residual`` (dense, either layout). It returns
//     nothing: torch.compile's functionalisation takes no custom op returning an alias.
//   act = ReLU if relu (NaN propagates), else identity.
//
// Why: oneDNN's convolutions vectorise over output channels, 16 float32 lanes, so an 18-channel
// layer runs 32 lanes of which 14 are padding (measured 123-132 GFLOP/s against 240 for 64
// channels, 2 cores). Here the 16 lanes are 16 pixels of one output row, so no lane is wasted for
// any channel count. Input rows are copied once into planar rows (channel-major, zero-padded
// columns: a gather per 16 pixels from channels_last, a plain copy from NCHW); each output row is
// accumulated planar and then written in the output's layout. A chain of these convs (a branch's
// residual blocks) keeps its intermediates planar, so only its first input and last output are
// transposed (hrnet_fast/backends/torch_cpu.py: TorchCPU.blocks).
//
// Tensors: CPU float32. x [N, Ci, H, W] and residual [N, Co, H, W] with any strides (a pixel stride
// of 1 is read row by row, any other by gathers; channels_last, NCHW and channel slices all fit);
// weight [Co, Ci, 3, 3] (any strides; packed once per call to [Ci][3][3][Co], a few thousand
// floats); bias [Co]. The output is a new dense tensor (conv3x3_thin) or ``residual``
// (conv3x3_thin_into, which must then be dense and share no memory with x). Needs AVX-512
// (torch's own CPU capability, which honours ATEN_CPU_CAPABILITY); elsewhere it raises and callers
// keep oneDNN.
//
// Numerics, per output element, float32 throughout:
//   acc = 0;  for ci, for ky, for kx: acc = fma(x[ci][y+ky-1][x+kx-1], w[co][ci][ky][kx], acc)
//   (taps outside the image read 0);  acc += bias;  acc += residual;  out = act(acc)
// The summation order differs from oneDNN's, so results agree with F.conv2d to float32 rounding
// (about 1e-7 relative), not bit for bit.
//
// Work: at::parallel_for over output rows (n, y); a thread keeps the last three transposed input
// rows, so each input row is transposed about once. Register tile: 6 output channels x 64 pixels
// (24 zmm accumulators); channel and pixel remainders take smaller tiles.
#include <ATen/Parallel.h>
#include <ATen/Version.h>  // at::get_cpu_capability
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

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
constexpr int kTileCo = 6;     // output channels per register tile
constexpr int kTilePx = 4;     // vectors of pixels per register tile (64 pixels)

bool avx512_enabled() {
  static const bool on = at::get_cpu_capability() == "AVX512";
  return on;
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
};

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
  switch (p.Co - co0) {
    case 1: tile<1, R>(p, rows, x0, co0, orow); break;
    case 2: tile<2, R>(p, rows, x0, co0, orow); break;
    case 3: tile<3, R>(p, rows, x0, co0, orow); break;
    case 4: tile<4, R>(p, rows, x0, co0, orow); break;
    case 5: tile<5, R>(p, rows, x0, co0, orow); break;
    default: break;
  }
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

HF_AVX512 HF_ALWAYS_INLINE __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

HF_AVX512 HF_ALWAYS_INLINE __m512i lane_times(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// planar[ci * in_pitch + 1 + x] = src[ci * sc + x * sw]: a copy per channel where pixels are
// adjacent (NCHW), else a gather per 16 pixels (channels_last).
HF_AVX512 void read_input_row(const Problem& p, const float* src, float* planar) {
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

// Index tables of one channels_last output period (16 pixels, Co vectors of 16 flat positions
// f = x * Co + co): where position f sits in the planar row (co * out_pitch + x) and in the
// residual row (co * rc + x * rw), and its bias.
struct Period {
  std::vector<int32_t> planar_index, residual_index;
  std::vector<float> bias;
};

// out row = act(planar row + bias + residual row), channels_last: W * Co floats, gathered from the
// planar row one period at a time; the residual is loaded directly when it is dense channels_last.
HF_AVX512 void write_row_channels_last(const Problem& p, const float* orow, const Period& period,
                                       const float* res, float* out) {
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

// out row = act(planar row + bias + residual row), planar: channel co's W floats at co * H * W.
HF_AVX512 void write_row_planar(const Problem& p, const float* orow, const float* res, float* out) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i res_offsets = lane_times(p.rw);
  const int64_t plane = p.H * p.W;
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

void run(const Problem& p) {
  const int64_t Co = p.Co;
  Period period;
  period.planar_index.resize(kLanes * Co);
  period.residual_index.resize(kLanes * Co);
  period.bias.resize(kLanes * Co);
  for (int64_t f = 0; f < kLanes * Co; ++f) {
    const int64_t co = f % Co, x = f / Co;
    period.planar_index[f] = static_cast<int32_t>(co * p.out_pitch + x);
    period.residual_index[f] = static_cast<int32_t>(co * p.rc + x * p.rw);
    period.bias[f] = p.bias != nullptr ? p.bias[co] : 0.0f;
  }
  const int64_t plane = p.Ci * p.in_pitch;
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    // Three planar input rows (slot = row % 3), a zero row for the padding above and below, and
    // the planar output row. Zero-initialised: the padding columns are never written.
    std::vector<float> scratch(4 * plane + Co * p.out_pitch, 0.0f);
    float* zero_row = scratch.data() + 3 * plane;
    float* orow = scratch.data() + 4 * plane;
    int64_t slot_tag[3] = {-1, -1, -1};  // which (n * H + row) each slot holds
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / p.H, y = t % p.H;
      const float* rows[3];
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t yi = y + ky - 1;
        if (yi < 0 || yi >= p.H) {
          rows[ky] = zero_row;
          continue;
        }
        const int64_t slot = yi % 3;
        float* planar = scratch.data() + slot * plane;
        if (slot_tag[slot] != n * p.H + yi) {
          read_input_row(p, p.x + n * p.sn + yi * p.sh, planar);
          slot_tag[slot] = n * p.H + yi;
        }
        rows[ky] = planar;
      }
      conv_row(p, rows, orow);
      const float* res = p.res != nullptr ? p.res + n * p.rn + y * p.rh : nullptr;
      if (p.out_channels_last) {
        write_row_channels_last(p, orow, period, res, p.out + t * p.W * Co);
      } else {
        write_row_planar(p, orow, res, p.out + n * Co * p.H * p.W + y * p.W);
      }
    }
  });
}
#else
void run(const Problem&) { TORCH_CHECK(false, kOp, "built without x86-64 AVX-512 support"); }
#endif

// Gathers take 32-bit element offsets: 16 pixels (and, for the residual, Co channels) of a row.
bool gather_offsets_fit(int64_t channels, int64_t channel_stride, int64_t pixel_stride) {
  return (channels - 1) * channel_stride + (kLanes - 1) * pixel_stride < (int64_t{1} << 31);
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                const at::Tensor* residual) {
  TORCH_CHECK(avx512_enabled(), kOp, "needs AVX-512 (torch reports CPU capability ",
              at::get_cpu_capability(), ")");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, kOp,
              "x must be a 4-d float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(gather_offsets_fit(1, 0, x.stride(3)), kOp, "x's pixel stride ", x.stride(3),
              " is too large for 32-bit gather offsets");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(1) == x.size(1) && weight.size(2) == 3 && weight.size(3) == 3,
              kOp, "weight must be float32 [Co, ", x.size(1), ", 3, 3] on the CPU, got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t co = weight.size(0);
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

at::Tensor compute(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const at::Tensor* residual, bool relu,
                   at::Tensor out, bool out_channels_last) {
  if (out.numel() == 0) return out;
  const at::Tensor packed = weight.permute({1, 2, 3, 0}).contiguous();  // [Ci][3][3][Co]
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Problem p;
  p.N = x.size(0);
  p.Ci = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.Co = weight.size(0);
  p.x = x.data_ptr<float>();
  p.sn = x.stride(0);
  p.sc = x.stride(1);
  p.sh = x.stride(2);
  p.sw = x.stride(3);
  p.w = packed.data_ptr<float>();
  p.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  p.res = nullptr;
  p.rn = p.rc = p.rh = p.rw = 0;
  if (residual != nullptr) {
    p.res = residual->data_ptr<float>();
    p.rn = residual->stride(0);
    p.rc = residual->stride(1);
    p.rh = residual->stride(2);
    p.rw = residual->stride(3);
  }
  p.out = out.data_ptr<float>();
  p.out_channels_last = out_channels_last;
  p.relu = relu;
  const int64_t w16 = (p.W + kLanes - 1) / kLanes * kLanes;
  p.in_pitch = w16 + 2 * kLanes;  // 1 left pad + W + right pads covering a tile's overreach
  p.out_pitch = w16 + kLanes;
  run(p);
  return out;
}

at::Tensor conv3x3_thin(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& residual, bool relu, bool channels_last) {
  check_args(x, weight, bias, residual.has_value() ? &*residual : nullptr);
  at::Tensor out = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)},
                             x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  return compute(x, weight, bias, residual.has_value() ? &*residual : nullptr, relu, out,
                 channels_last);
}

void conv3x3_thin_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, bool relu) {
  check_args(x, weight, bias, &residual);
  const bool channels_last = residual.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || residual.is_contiguous(), kOp,
              "residual (written in place) must be dense channels_last or NCHW, got strides ",
              residual.strides());
  // Rows are written while later rows are still read: the result may not share x's memory.
  TORCH_CHECK(!residual.storage().is_alias_of(x.storage()), kOp,
              "residual (written in place) must not share memory with x");
  compute(x, weight, bias, &residual, relu, residual, channels_last);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hrnet_fast_cpu, m) {
  m.def(
      "conv3x3_thin(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool relu, "
      "bool channels_last=True) -> Tensor");
  m.def(
      "conv3x3_thin_into(Tensor(a!) residual, Tensor x, Tensor weight, Tensor? bias, bool relu) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(hrnet_fast_cpu, CPU, m) {
  m.impl("conv3x3_thin", &conv3x3_thin);
  m.impl("conv3x3_thin_into", &conv3x3_thin_into);
}

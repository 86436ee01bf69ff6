// hrnet_fast: fused resize + add + bias + ReLU (torch-free; see upsample_add_relu.h).
//
// Exact math, per output element (n, c, y, x), all in fp32 whatever the storage dtype:
//
//   acc  = float(base[n,c,y,x]);  if bias: acc += bias[c]
//   for each contribution k (sizes h x w, output sizes H x W):
//     if h == H and w == W: acc += float(c_k[n,c,y,x])            (torch copies, no arithmetic)
//     nearest (legacy, torch "nearest"):
//       scale_h = (float)h / (float)H;  sy = min((int)floorf(y * scale_h), h - 1)   (same for x)
//       acc += float(c_k[n,c,sy,sx])
//     bilinear, align_corners = False:
//       scale_h = (float)h / (float)H;  r = scale_h * (y + 0.5f) - 0.5f;  r = r < 0 ? 0 : r
//     bilinear, align_corners = True:
//       scale_h = H > 1 ? (float)(h - 1) / (float)(H - 1) : 0;  r = scale_h * y
//     then  y0 = (int)r;  y1 = y0 + (y0 < h - 1 ? 1 : 0);  l1 = r - y0;  l0 = 1 - l1   (same for x)
//       acc += l0h * (l0w * v[y0,x0] + l1w * v[y0,x1]) + l1h * (l0w * v[y1,x0] + l1w * v[y1,x1])
//   out[n,c,y,x] = store(relu ? (acc < 0 ? 0 : acc) : acc)     (NaN propagates; round-to-nearest-even)
//
// These are the index formulas and the evaluation order of PyTorch's CUDA upsample_nearest2d and
// upsample_bilinear2d kernels (fp32 accumulation type for fp32/fp16/bf16), so each resized term is
// what F.interpolate(size=(H, W)) computes before its result is rounded to the storage dtype.
//
// Layouts: every tensor is addressed through its own (n, c, y, x) strides, 64-bit offsets.
//   * channels-inner kernel (output channel stride < width stride, i.e. channels_last): a thread
//     owns VEC consecutive channels of one pixel; VEC = 8 (fp16/bf16) or 4 (fp32) gives 16-byte loads
//     and stores when C, every pointer and every non-channel stride allow it, else 4/2/1.
//   * spatial-inner kernel (NCHW and anything else): a thread owns one element, x fastest.
// dtypes: float, __half, __nv_bfloat16 (base, out and contributions share one dtype); bias is fp32.
// Bit-compatibility of the bilinear term with F.interpolate also assumes nvcc contracts the
// expressions into FMAs as it does for PyTorch's kernel (same expression, default -fmad=true).
//
// Built with -DHRNET_FAST_HOST_EMULATION (tests only) the file has no kernels and exports
// hrnet_fast_uar_emulate(), which runs the same planning and the same per-item __host__ __device__
// code on the CPU, so CPU-only CI checks the index arithmetic, strides, vector widths and chaining.
#include "upsample_add_relu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace hrnet_fast {
namespace {

struct ContribParams {
  const void* data;
  int64_t sn, sc, sh, sw;
  int32_t h, w;
  float scale_h, scale_w;
  int32_t same;  // same spatial size as the output: plain add
};

struct KernelParams {
  const void* base;
  int64_t bsn, bsc, bsh, bsw;
  void* out;
  int64_t osn, osc, osh, osw;
  const float* bias;
  int32_t N, C, H, W;
  int32_t num;
  int32_t align_corners;
  int32_t relu;
  ContribParams c[kMaxContributionsPerLaunch];
};

// __host__ __device__ so that the HRNET_FAST_HOST_EMULATION build (CPU tests) runs the same code.
#define HF_HD __host__ __device__ __forceinline__

// ---- scalar conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----
HF_HD float to_float(float v) { return v; }
HF_HD float to_float(__half v) { return __half2float(v); }
HF_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
HF_HD T from_float(float v);
template <>
HF_HD float from_float<float>(float v) { return v; }
template <>
HF_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
HF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- vector loads/stores of VEC consecutive elements (alignment checked on the host) ----
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int BYTES>
struct RawWord;
template <>
struct RawWord<16> { using type = uint4; };
template <>
struct RawWord<8> { using type = uint2; };
template <>
struct RawWord<4> { using type = unsigned int; };
template <>
struct RawWord<2> { using type = unsigned short; };

// Plain load: the base (it may alias the output when launches are chained).
template <typename T, int VEC>
HF_HD void load_rw(const T* p, float (&dst)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(pk.v[i]);
}

// Read-only-cache load (ld.global.nc): contributions, never written by the kernel.
template <typename T, int VEC>
HF_HD void load_ro(const T* p, float (&dst)[VEC]) {
#if defined(__CUDA_ARCH__)
  using W = typename RawWord<sizeof(T) * VEC>::type;
  union {
    W w;
    Pack<T, VEC> pk;
  } u;
  u.w = __ldg(reinterpret_cast<const W*>(p));
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(u.pk.v[i]);
#else
  load_rw<T, VEC>(p, dst);
#endif
}

template <typename T, int VEC>
HF_HD void store(T* p, const float (&src)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(src[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

HF_HD float load_bias(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// ---- PyTorch's source-index arithmetic ----
HF_HD int nearest_src(float scale, int dst, int in_size) {
  const int src = static_cast<int>(floorf(dst * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

HF_HD float linear_src(float scale, int dst, bool align_corners) {
  if (align_corners) return scale * dst;
  const float src = scale * (dst + 0.5f) - 0.5f;
  return src < 0.f ? 0.f : src;
}

struct Lerp {
  int i0, i1;
  float l0, l1;
};

HF_HD Lerp linear_coeffs(float scale, int dst, int in_size, bool align_corners) {
  Lerp r;
  const float src = linear_src(scale, dst, align_corners);
  r.i0 = static_cast<int>(src);
  r.i1 = r.i0 + ((r.i0 < in_size - 1) ? 1 : 0);
  r.l1 = src - r.i0;
  r.l0 = 1.f - r.l1;
  return r;
}

// Adds contribution `cp` at output pixel (n, y, x), channels [c0, c0 + VEC), into acc.
template <typename T, int VEC, ResizeMode MODE>
HF_HD void add_contribution(const ContribParams& cp, bool align_corners, int n, int c0, int y, int x,
                            float (&acc)[VEC]) {
  const T* src = static_cast<const T*>(cp.data) + n * cp.sn + c0 * cp.sc;
  if (cp.same) {
    float v[VEC];
    load_ro<T, VEC>(src + y * cp.sh + x * cp.sw, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
  } else if (MODE == ResizeMode::Nearest) {
    const int sy = nearest_src(cp.scale_h, y, cp.h);
    const int sx = nearest_src(cp.scale_w, x, cp.w);
    float v[VEC];
    load_ro<T, VEC>(src + sy * cp.sh + sx * cp.sw, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
  } else {
    const Lerp ly = linear_coeffs(cp.scale_h, y, cp.h, align_corners);
    const Lerp lx = linear_coeffs(cp.scale_w, x, cp.w, align_corners);
    const T* r0 = src + ly.i0 * cp.sh;
    const T* r1 = src + ly.i1 * cp.sh;
    float v00[VEC], v01[VEC], v10[VEC], v11[VEC];
    load_ro<T, VEC>(r0 + lx.i0 * cp.sw, v00);
    load_ro<T, VEC>(r0 + lx.i1 * cp.sw, v01);
    load_ro<T, VEC>(r1 + lx.i0 * cp.sw, v10);
    load_ro<T, VEC>(r1 + lx.i1 * cp.sw, v11);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float val = ly.l0 * (lx.l0 * v00[i] + lx.l1 * v01[i]) +
                        ly.l1 * (lx.l0 * v10[i] + lx.l1 * v11[i]);
      acc[i] += val;
    }
  }
}

template <typename T, int VEC, ResizeMode MODE>
HF_HD void compute_point(const KernelParams& p, int n, int c0, int y, int x) {
  float acc[VEC];
  load_rw<T, VEC>(static_cast<const T*>(p.base) + n * p.bsn + c0 * p.bsc + y * p.bsh + x * p.bsw, acc);
  if (p.bias != nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += load_bias(p.bias + c0 + i);
  }
  const bool ac = p.align_corners != 0;
#pragma unroll
  for (int k = 0; k < kMaxContributionsPerLaunch; ++k) {
    if (k < p.num) add_contribution<T, VEC, MODE>(p.c[k], ac, n, c0, y, x, acc);
  }
  if (p.relu) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc[i] < 0.f ? 0.f : acc[i];
  }
  store<T, VEC>(static_cast<T*>(p.out) + n * p.osn + c0 * p.osc + y * p.osh + x * p.osw, acc);
}

// channels-inner work item i = ((n * H + y) * W + x) * (C / VEC) + cv: VEC channels of one pixel.
template <typename T, int VEC, ResizeMode MODE, typename index_t>
HF_HD void channels_inner_item(const KernelParams& p, index_t i) {
  const index_t cvs = static_cast<index_t>(p.C / VEC);
  index_t t = i;
  const int cv = static_cast<int>(t % cvs);
  t /= cvs;
  const int x = static_cast<int>(t % static_cast<index_t>(p.W));
  t /= static_cast<index_t>(p.W);
  const int y = static_cast<int>(t % static_cast<index_t>(p.H));
  const int n = static_cast<int>(t / static_cast<index_t>(p.H));
  compute_point<T, VEC, MODE>(p, n, cv * VEC, y, x);
}

// spatial-inner work item i = ((n * C + c) * H + y) * W + x: one element.
template <typename T, ResizeMode MODE, typename index_t>
HF_HD void spatial_inner_item(const KernelParams& p, index_t i) {
  index_t t = i;
  const int x = static_cast<int>(t % static_cast<index_t>(p.W));
  t /= static_cast<index_t>(p.W);
  const int y = static_cast<int>(t % static_cast<index_t>(p.H));
  t /= static_cast<index_t>(p.H);
  const int c = static_cast<int>(t % static_cast<index_t>(p.C));
  const int n = static_cast<int>(t / static_cast<index_t>(p.C));
  compute_point<T, 1, MODE>(p, n, c, y, x);
}

#if !defined(HRNET_FAST_HOST_EMULATION)
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// index_t is uint32_t when the item count is below 2^31 (cheaper divisions), else int64_t; memory
// offsets are always 64-bit (the strides are int64_t). Grid-stride loops; at most kMaxBlocks blocks.
template <typename T, int VEC, ResizeMode MODE, typename index_t>
__global__ void __launch_bounds__(kThreads)
    uar_channels_inner_kernel(const KernelParams p, index_t total) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    channels_inner_item<T, VEC, MODE, index_t>(p, i);
  }
}

template <typename T, ResizeMode MODE, typename index_t>
__global__ void __launch_bounds__(kThreads)
    uar_spatial_inner_kernel(const KernelParams p, index_t total) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    spatial_inner_item<T, MODE, index_t>(p, i);
  }
}

#endif  // !HRNET_FAST_HOST_EMULATION

// ---- host side ----
Status ok() { return Status{0, "ok"}; }
Status invalid(const char* msg) { return Status{1, msg}; }

#if !defined(HRNET_FAST_HOST_EMULATION)
unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Launches the kernels on a stream.
struct DeviceExec {
  cudaStream_t stream;

  template <typename T, int VEC, ResizeMode MODE>
  void channels_inner(const KernelParams& p, int64_t items) const {
    if (items < (int64_t(1) << 31)) {
      uar_channels_inner_kernel<T, VEC, MODE, uint32_t>
          <<<grid_for(items), kThreads, 0, stream>>>(p, static_cast<uint32_t>(items));
    } else {
      uar_channels_inner_kernel<T, VEC, MODE, int64_t><<<grid_for(items), kThreads, 0, stream>>>(p, items);
    }
  }

  template <typename T, ResizeMode MODE>
  void spatial_inner(const KernelParams& p, int64_t items) const {
    if (items < (int64_t(1) << 31)) {
      uar_spatial_inner_kernel<T, MODE, uint32_t>
          <<<grid_for(items), kThreads, 0, stream>>>(p, static_cast<uint32_t>(items));
    } else {
      uar_spatial_inner_kernel<T, MODE, int64_t><<<grid_for(items), kThreads, 0, stream>>>(p, items);
    }
  }

  Status check() const {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? ok() : Status{2, cudaGetErrorString(err)};
  }
};

#endif  // !HRNET_FAST_HOST_EMULATION

template <typename Exec, typename T, ResizeMode MODE>
void run_launch(const Exec& exec, const KernelParams& p, bool channels_inner, int vec) {
  const int64_t elems = int64_t(p.N) * p.C * p.H * p.W;
  if (!channels_inner) {
    exec.template spatial_inner<T, MODE>(p, elems);
    return;
  }
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) == 2) {
        exec.template channels_inner<T, 8, MODE>(p, elems / 8);
        return;
      }
      break;
    case 4:
      exec.template channels_inner<T, 4, MODE>(p, elems / 4);
      return;
    case 2:
      exec.template channels_inner<T, 2, MODE>(p, elems / 2);
      return;
    default:
      break;
  }
  exec.template channels_inner<T, 1, MODE>(p, elems);
}

template <typename Exec, typename T>
void run_launch_mode(const Exec& exec, const KernelParams& p, ResizeMode mode, bool channels_inner,
                     int vec) {
  if (mode == ResizeMode::Nearest) {
    run_launch<Exec, T, ResizeMode::Nearest>(exec, p, channels_inner, vec);
  } else {
    run_launch<Exec, T, ResizeMode::Bilinear>(exec, p, channels_inner, vec);
  }
}

size_t dtype_size(DType d) { return d == DType::Float32 ? 4 : 2; }

// Can a tensor be read/written VEC channels at a time with (VEC * elem)-byte aligned accesses?
bool vec_ok(const void* ptr, const int64_t* sizes, const int64_t* strides, int vec, size_t elem) {
  if (vec == 1) return true;
  if (reinterpret_cast<uintptr_t>(ptr) % (static_cast<uintptr_t>(vec) * elem) != 0) return false;
  if (strides[1] != 1) return false;
  const int dims[3] = {0, 2, 3};
  for (int d : dims) {
    if (sizes[d] > 1 && strides[d] % vec != 0) return false;
  }
  return true;
}

// Validates, splits the contributions into launches of at most kMaxContributionsPerLaunch, picks the
// kernel and vector width of each launch, and runs them with `exec`. vecs_used (optional, up to
// max_vecs entries) receives each launch's vector width, 0 for the spatial-inner kernel.
template <typename Exec>
Status plan_and_run(const UpsampleAddReluArgs& a, const Exec& exec, int32_t* vecs_used, int max_vecs) {
  if (a.dtype != DType::Float32 && a.dtype != DType::Float16 && a.dtype != DType::BFloat16) {
    return invalid("unsupported dtype (expected float32, float16 or bfloat16)");
  }
  if (a.mode != ResizeMode::Nearest && a.mode != ResizeMode::Bilinear) {
    return invalid("unsupported resize mode (expected nearest or bilinear)");
  }
  const int64_t* bs = a.base.sizes;
  for (int d = 0; d < 4; ++d) {
    if (bs[d] < 0) return invalid("negative size");
    if (bs[d] > INT32_MAX) return invalid("a dimension exceeds 2^31 - 1");
  }
  if (a.num_contributions < 0) return invalid("negative number of contributions");
  if (a.num_contributions > 0 && a.contributions == nullptr) return invalid("contributions is null");
  const int64_t total = bs[0] * bs[1] * bs[2] * bs[3];
  for (int k = 0; k < a.num_contributions; ++k) {
    const int64_t* cs = a.contributions[k].sizes;
    if (cs[0] != bs[0] || cs[1] != bs[1]) {
      return invalid("a contribution's batch or channel count differs from the base's");
    }
    if (cs[2] > bs[2] || cs[3] > bs[3]) return invalid("a contribution is larger than the base");
    if ((cs[2] < 1 || cs[3] < 1) && total != 0) return invalid("a contribution is empty");
  }
  if (total == 0) return ok();
  if (a.base.data == nullptr || a.out == nullptr) return invalid("null base or output pointer");

  const size_t elem = dtype_size(a.dtype);
  // Channels-inner when the output's channel stride is below its width stride (channels_last).
  const bool channels_inner = a.out_strides[1] < a.out_strides[3];

  const int nlaunch = a.num_contributions <= kMaxContributionsPerLaunch
                          ? 1
                          : (a.num_contributions + kMaxContributionsPerLaunch - 1) /
                                kMaxContributionsPerLaunch;
  for (int l = 0; l < nlaunch; ++l) {
    const int first = l * kMaxContributionsPerLaunch;
    const int rest = a.num_contributions - first;
    const int count = rest < kMaxContributionsPerLaunch ? rest : kMaxContributionsPerLaunch;
    // The first launch reads the base (+ bias); the next ones read back the partial sum in `out`.
    ConstTensor4d in = a.base;
    if (l > 0) {
      in.data = a.out;
      for (int d = 0; d < 4; ++d) in.strides[d] = a.out_strides[d];
    }
    KernelParams p{};
    p.base = in.data;
    p.bsn = in.strides[0];
    p.bsc = in.strides[1];
    p.bsh = in.strides[2];
    p.bsw = in.strides[3];
    p.out = a.out;
    p.osn = a.out_strides[0];
    p.osc = a.out_strides[1];
    p.osh = a.out_strides[2];
    p.osw = a.out_strides[3];
    p.bias = l == 0 ? a.bias : nullptr;
    p.N = static_cast<int32_t>(bs[0]);
    p.C = static_cast<int32_t>(bs[1]);
    p.H = static_cast<int32_t>(bs[2]);
    p.W = static_cast<int32_t>(bs[3]);
    p.num = count;
    p.align_corners = a.align_corners ? 1 : 0;
    p.relu = (a.relu && l == nlaunch - 1) ? 1 : 0;
    for (int k = 0; k < count; ++k) {
      const ConstTensor4d& t = a.contributions[first + k];
      if (t.data == nullptr) return invalid("null contribution pointer");
      ContribParams& c = p.c[k];
      c.data = t.data;
      c.sn = t.strides[0];
      c.sc = t.strides[1];
      c.sh = t.strides[2];
      c.sw = t.strides[3];
      c.h = static_cast<int32_t>(t.sizes[2]);
      c.w = static_cast<int32_t>(t.sizes[3]);
      c.same = (t.sizes[2] == bs[2] && t.sizes[3] == bs[3]) ? 1 : 0;
      if (a.mode == ResizeMode::Bilinear && a.align_corners) {
        c.scale_h = bs[2] > 1 ? static_cast<float>(t.sizes[2] - 1) / static_cast<float>(bs[2] - 1) : 0.f;
        c.scale_w = bs[3] > 1 ? static_cast<float>(t.sizes[3] - 1) / static_cast<float>(bs[3] - 1) : 0.f;
      } else {
        c.scale_h = static_cast<float>(t.sizes[2]) / static_cast<float>(bs[2]);
        c.scale_w = static_cast<float>(t.sizes[3]) / static_cast<float>(bs[3]);
      }
    }

    int vec = 1;
    if (channels_inner) {
      for (vec = static_cast<int>(16 / elem); vec > 1; vec /= 2) {  // 16 bytes: 8 x 16-bit, 4 x fp32
        if (bs[1] % vec != 0) continue;
        bool good = vec_ok(in.data, bs, in.strides, vec, elem) &&
                    vec_ok(a.out, bs, a.out_strides, vec, elem);
        for (int k = 0; good && k < count; ++k) {
          const ConstTensor4d& t = a.contributions[first + k];
          good = vec_ok(t.data, t.sizes, t.strides, vec, elem);
        }
        if (good) break;
      }
    }
    if (vecs_used != nullptr && l < max_vecs) vecs_used[l] = channels_inner ? vec : 0;

    switch (a.dtype) {
      case DType::Float32:
        run_launch_mode<Exec, float>(exec, p, a.mode, channels_inner, vec);
        break;
      case DType::Float16:
        run_launch_mode<Exec, __half>(exec, p, a.mode, channels_inner, vec);
        break;
      case DType::BFloat16:
        run_launch_mode<Exec, __nv_bfloat16>(exec, p, a.mode, channels_inner, vec);
        break;
    }
    const Status s = exec.check();
    if (s.code != 0) return s;
  }
  return ok();
}

#if defined(HRNET_FAST_HOST_EMULATION)
// Runs the kernels' per-item code on the CPU, item by item (tests only: nvcc -DHRNET_FAST_HOST_EMULATION).
// Same index type choice as DeviceExec.
struct HostExec {
  template <typename T, int VEC, ResizeMode MODE>
  void channels_inner(const KernelParams& p, int64_t items) const {
    if (items < (int64_t(1) << 31)) {
      for (uint32_t i = 0; i < static_cast<uint32_t>(items); ++i) channels_inner_item<T, VEC, MODE, uint32_t>(p, i);
    } else {
      for (int64_t i = 0; i < items; ++i) channels_inner_item<T, VEC, MODE, int64_t>(p, i);
    }
  }
  template <typename T, ResizeMode MODE>
  void spatial_inner(const KernelParams& p, int64_t items) const {
    if (items < (int64_t(1) << 31)) {
      for (uint32_t i = 0; i < static_cast<uint32_t>(items); ++i) spatial_inner_item<T, MODE, uint32_t>(p, i);
    } else {
      for (int64_t i = 0; i < items; ++i) spatial_inner_item<T, MODE, int64_t>(p, i);
    }
  }
  Status check() const { return ok(); }
};
#endif

}  // namespace

#if !defined(HRNET_FAST_HOST_EMULATION)
Status upsample_add_relu(const UpsampleAddReluArgs& args, cudaStream_t stream) {
  return plan_and_run(args, DeviceExec{stream}, nullptr, 0);
}
#endif

}  // namespace hrnet_fast

#if defined(HRNET_FAST_HOST_EMULATION)
// C entry point for the CPU tests (ctypes): the same planning and per-item code as the GPU path.
// csizes/cstrides hold 4 values per contribution. Returns the status code; *message gets its text.
extern "C" int hrnet_fast_uar_emulate(int dtype, int mode, int align_corners, int relu,
                                      const void* base, const int64_t* base_sizes,
                                      const int64_t* base_strides, void* out,
                                      const int64_t* out_strides, const float* bias, int num,
                                      const void* const* cdata, const int64_t* csizes,
                                      const int64_t* cstrides, int32_t* vecs_used, int max_vecs,
                                      const char** message) {
  using namespace hrnet_fast;
  ConstTensor4d contribs[64];
  if (num > 64) {
    *message = "too many contributions for the emulator";
    return 1;
  }
  for (int k = 0; k < num; ++k) {
    contribs[k].data = cdata[k];
    for (int d = 0; d < 4; ++d) {
      contribs[k].sizes[d] = csizes[4 * k + d];
      contribs[k].strides[d] = cstrides[4 * k + d];
    }
  }
  UpsampleAddReluArgs a{};
  a.dtype = static_cast<DType>(dtype);
  a.mode = static_cast<ResizeMode>(mode);
  a.align_corners = align_corners != 0;
  a.relu = relu != 0;
  a.base.data = base;
  for (int d = 0; d < 4; ++d) {
    a.base.sizes[d] = base_sizes[d];
    a.base.strides[d] = base_strides[d];
    a.out_strides[d] = out_strides[d];
  }
  a.out = out;
  a.bias = bias;
  a.num_contributions = num;
  a.contributions = contribs;
  const Status s = plan_and_run(a, HostExec{}, vecs_used, max_vecs);
  *message = s.message;
  return s.code;
}
#endif

// hrnet_fast: fused "resize every contribution to the base's size, add, add bias, ReLU".
//
// Torch-free interface (raw pointers, sizes and strides in elements, a dtype enum, a cudaStream_t), so
// that `nvcc -c` compiles upsample_add_relu.cu alone and any host code can call it. The torch binding
// lives in bindings.cpp.
//
//   out[n,c,y,x] = act( base[n,c,y,x] + bias[c] + sum_k resize(contrib_k, (H, W))[n,c,y,x] )
//
// act is ReLU when `relu` is set, else the identity; `bias` is optional (nullptr). Every tensor is
// indexed as [N, C, H, W] with its own strides (NCHW, channels_last or any other layout). The resize
// reproduces torch.nn.functional.interpolate(size=(H, W)) index arithmetic exactly; the formulas are
// stated next to the kernels in upsample_add_relu.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace hrnet_fast {

enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

enum class ResizeMode : int32_t { Nearest = 0, Bilinear = 1 };

// A read-only 4-d tensor [N, C, H, W]: data pointer, sizes, strides (elements, not bytes).
struct ConstTensor4d {
  const void* data;
  int64_t sizes[4];
  int64_t strides[4];
};

struct UpsampleAddReluArgs {
  DType dtype;               // dtype of base, out and every contribution
  ResizeMode mode;           // Nearest (legacy "nearest") or Bilinear
  bool align_corners;        // bilinear only; ignored by Nearest
  bool relu;                 // apply ReLU (NaN propagates, as in torch.relu)
  ConstTensor4d base;        // [N, C, H, W]
  void* out;                 // [N, C, H, W], sizes of base, strides out_strides; may alias base
  int64_t out_strides[4];
  const float* bias;         // nullptr, or C contiguous fp32 values
  int32_t num_contributions; // any number >= 0; launches chain kMaxContributionsPerLaunch at a time
  const ConstTensor4d* contributions;  // [N, C, h_k, w_k], 1 <= h_k <= H, 1 <= w_k <= W
};

// Contributions handled by one kernel launch. With more, the launcher chains launches: the first
// writes act'(base + bias + c_0..c_3) (act' = identity unless it is the last launch), each next one
// reads `out` as its base. In fp16/bf16 the chained partial sums are rounded to the storage dtype.
constexpr int kMaxContributionsPerLaunch = 4;

struct Status {
  int32_t code;         // 0: success; 1: invalid argument; 2: CUDA error
  const char* message;  // static string; "ok" on success
};

// Validates the arguments, launches on `stream` (asynchronous), and checks every launch with
// cudaGetLastError. Does no allocation and no synchronisation (safe under CUDA graph capture).
Status upsample_add_relu(const UpsampleAddReluArgs& args, cudaStream_t stream);

}  // namespace hrnet_fast

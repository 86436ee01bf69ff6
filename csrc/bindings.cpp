// hrnet_fast CUDA extension: torch binding of the torch-free kernels in this folder.
//
// Registers the operator library `hrnet_fast_cuda` (schemas below, CUDA kernels) when the shared
// library is loaded; Python reaches the ops through torch.ops.hrnet_fast_cuda.* (see
// hrnet_fast/cuda_ext.py, which also registers the fake kernels used by torch.compile).
//
//   upsample_add_relu(Tensor base, Tensor[] contributions, str mode, bool align_corners, bool relu,
//                     Tensor? bias) -> Tensor
//     out = act(base + bias[c] + sum_k resize(contributions[k], base.shape[-2:]))
//     act = ReLU if relu else identity; resize = F.interpolate(size=...) with mode "nearest" (legacy)
//     or "bilinear" (align_corners honoured); bias: optional [C], float32 or base's dtype.
//     The output is a new tensor in base's layout: channels_last when base.stride(1) < base.stride(3),
//     else contiguous (hrnet_fast/cuda_ext.py's fake kernel applies the same rule).
// Narrow includes (not <torch/extension.h>) keep the compile short; no tensor crosses pybind11.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "upsample_add_relu.h"

namespace {

constexpr const char* kOp = "hrnet_fast_cuda::upsample_add_relu: ";

hrnet_fast::ConstTensor4d describe(const at::Tensor& t) {
  hrnet_fast::ConstTensor4d d{};
  d.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) {
    d.sizes[i] = t.size(i);
    d.strides[i] = t.stride(i);
  }
  return d;
}

hrnet_fast::DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return hrnet_fast::DType::Float32;
    case at::kHalf:
      return hrnet_fast::DType::Float16;
    case at::kBFloat16:
      return hrnet_fast::DType::BFloat16;
    default:
      TORCH_CHECK(false, kOp, "dtype must be float32, float16 or bfloat16, got ", s);
  }
  return hrnet_fast::DType::Float32;  // unreachable
}

at::Tensor upsample_add_relu(const at::Tensor& base, at::TensorList contributions,
                             c10::string_view mode, bool align_corners, bool relu,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(base.defined(), kOp, "base is undefined");
  TORCH_CHECK(base.is_cuda(), kOp, "base must be a CUDA tensor, got one on ", base.device());
  TORCH_CHECK(base.dim() == 4, kOp, "base must be 4-d [N, C, H, W], got shape ", base.sizes());
  const hrnet_fast::DType dtype = to_dtype(base.scalar_type());

  // (c10::string_view is std::string_view in recent torch, c10's own class in older releases)
  const std::string mode_s(mode.data(), mode.size());
  hrnet_fast::ResizeMode rmode = hrnet_fast::ResizeMode::Bilinear;
  if (mode_s == "nearest") {
    rmode = hrnet_fast::ResizeMode::Nearest;
  } else {
    TORCH_CHECK(mode_s == "bilinear", kOp, "mode must be 'nearest' or 'bilinear', got '", mode_s, "'");
  }

  const int64_t N = base.size(0), C = base.size(1), H = base.size(2), W = base.size(3);
  for (size_t k = 0; k < contributions.size(); ++k) {
    const at::Tensor& t = contributions[k];
    TORCH_CHECK(t.defined(), kOp, "contributions[", k, "] is undefined");
    TORCH_CHECK(t.device() == base.device(), kOp, "contributions[", k, "] is on ", t.device(),
                " but base is on ", base.device());
    TORCH_CHECK(t.scalar_type() == base.scalar_type(), kOp, "contributions[", k, "] has dtype ",
                t.scalar_type(), " but base has ", base.scalar_type());
    TORCH_CHECK(t.dim() == 4, kOp, "contributions[", k, "] must be 4-d, got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == N && t.size(1) == C, kOp, "contributions[", k, "] has shape ",
                t.sizes(), ": batch and channels must match base's ", base.sizes());
    TORCH_CHECK(t.size(2) <= H && t.size(3) <= W, kOp, "contributions[", k, "] has shape ",
                t.sizes(), ", larger than base's ", base.sizes(), " (only upsampling is supported)");
    TORCH_CHECK(base.numel() == 0 || (t.size(2) > 0 && t.size(3) > 0), kOp, "contributions[", k,
                "] is empty (shape ", t.sizes(), ")");
  }

  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == base.device(), kOp, "bias is on ", b.device(), " but base is on ",
                base.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == C, kOp, "bias must have shape [", C, "], got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == base.scalar_type(), kOp,
                "bias must be float32 or base's dtype ", base.scalar_type(), ", got ",
                b.scalar_type());
    bias_f = b.to(at::kFloat).contiguous();
  }

  const c10::cuda::CUDAGuard device_guard(base.device());
  const bool channels_last = base.stride(1) < base.stride(3);
  at::Tensor out = at::empty(
      base.sizes(), base.options(),
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;

  std::vector<hrnet_fast::ConstTensor4d> descs;
  descs.reserve(contributions.size());
  for (const at::Tensor& t : contributions) descs.push_back(describe(t));

  hrnet_fast::UpsampleAddReluArgs args{};
  args.dtype = dtype;
  args.mode = rmode;
  args.align_corners = align_corners;
  args.relu = relu;
  args.base = describe(base);
  args.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) args.out_strides[i] = out.stride(i);
  args.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  args.num_contributions = static_cast<int32_t>(descs.size());
  args.contributions = descs.data();

  const hrnet_fast::Status status =
      hrnet_fast::upsample_add_relu(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status.code == 0, kOp, status.code == 2 ? "CUDA error: " : "", status.message);
  return out;
}

}  // namespace

TORCH_LIBRARY(hrnet_fast_cuda, m) {
  m.def(
      "upsample_add_relu(Tensor base, Tensor[] contributions, str mode, bool align_corners, "
      "bool relu, Tensor? bias) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hrnet_fast_cuda, CUDA, m) {
  m.impl("upsample_add_relu", &upsample_add_relu);
}

// The ops live in torch.ops.hrnet_fast_cuda; this module only makes the library importable
// (`import hrnet_fast._C`) and reports a few build constants.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hrnet_fast CUDA kernels; the ops are registered as torch.ops.hrnet_fast_cuda.*";
  m.attr("library") = "hrnet_fast_cuda";
  m.attr("max_contributions_per_launch") = hrnet_fast::kMaxContributionsPerLaunch;
}

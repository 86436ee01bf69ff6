// hrnet_fast CPU kernels: the resize's index tables, shared by the fuse kernels (cpu_fuse.cpp) and
// the AMX seg head (cpu_head_amx.cpp). The formulas (PyTorch's CPU upsampling, as F.interpolate
// with size=...) are stated at the top of cpu_fuse.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace hf_resize {

enum class Kind { Same, Nearest, Bilinear };

// Source positions along one axis for every output coordinate, as element offsets (index times
// the axis' stride), with bilinear weights.
struct AxisTable {
  std::vector<int64_t> off0, off1;
  std::vector<float> l0, l1;
};

inline AxisTable nearest_axis(int64_t in, int64_t out, int64_t stride) {
  AxisTable t;
  t.off0.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    int64_t src = d;
    if (in != out) {
      src = std::min(static_cast<int64_t>(std::floor(static_cast<float>(d) * scale)), in - 1);
    }
    t.off0[d] = src * stride;
  }
  return t;
}

inline AxisTable bilinear_axis(int64_t in, int64_t out, bool align_corners, int64_t stride) {
  AxisTable t;
  t.off0.resize(out);
  t.off1.resize(out);
  t.l0.resize(out);
  t.l1.resize(out);
  float scale;
  if (align_corners) {
    scale = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  } else {
    scale = static_cast<float>(in) / static_cast<float>(out);
  }
  for (int64_t d = 0; d < out; ++d) {
    int64_t i0 = d, i1 = d;
    float l1 = 0.0f;
    if (in != out) {
      float real;
      if (align_corners) {
        real = scale * static_cast<float>(d);
      } else {
        real = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
        real = real < 0.0f ? 0.0f : real;
      }
      i0 = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
      l1 = std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f);
      i1 = i0 + (i0 < in - 1 ? 1 : 0);
    }
    t.off0[d] = i0 * stride;
    t.off1[d] = i1 * stride;
    t.l1[d] = l1;
    t.l0[d] = 1.0f - l1;
  }
  return t;
}

// One contribution, ready for the row kernel.
struct Source {
  const void* data;
  int64_t sn, sh, sw;  // element strides (channel stride is 1)
  int64_t w;           // width
  Kind kind;
  // rows: offsets into the source (times sh); cols: nearest, offsets into the source (times sw),
  // bilinear, offsets into the dense blended row (times C).
  AxisTable rows, cols;
};

// A [N, C, h, w] source resized to H x W, as the row kernels read it: its strides and, for a
// resized one, the index tables (bilinear columns as offsets into the dense blended row, times C).
inline Source make_source(const at::Tensor& t, int64_t H, int64_t W, bool nearest,
                          bool align_corners) {
  Source s{};
  s.data = t.data_ptr();
  s.sn = t.stride(0);
  s.sh = t.stride(2);
  s.sw = t.stride(3);
  const int64_t h = t.size(2), w = t.size(3);
  s.w = w;
  if (h == H && w == W) {
    s.kind = Kind::Same;
  } else if (nearest) {
    s.kind = Kind::Nearest;
    s.rows = nearest_axis(h, H, s.sh);
    s.cols = nearest_axis(w, W, s.sw);
  } else {
    s.kind = Kind::Bilinear;
    s.rows = bilinear_axis(h, H, align_corners, s.sh);
    s.cols = bilinear_axis(w, W, align_corners, t.size(1));
  }
  return s;
}

}  // namespace hf_resize

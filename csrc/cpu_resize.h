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

// One source's values at one output pixel, for kernels that add the resized sources pixel by
// pixel (the one-pass seg heads): two float32 pixels of the source's blended row and their weights
// (bilinear), or one pixel of the source row itself (nearest, same size; t0 null). T: the
// storage's element (float, or uint16_t for bfloat16 bits).
template <typename T>
struct PixelTap {
  const float* t0;
  const float* t1;
  float w0, w1;
  const T* row;
};

// The sources of one output row: start_row blends each bilinear source's two rows once (w C
// float32 values, with the caller's blend(dst, r0, r1, h0, h1, C) for one source pixel) and finds
// the row of the others; taps then gives any pixel's PixelTaps. One per thread (it owns the
// blended rows).
template <typename T>
class RowTaps {
 public:
  RowTaps(const std::vector<Source>& sources, int64_t channels)
      : sources_(sources), channels_(channels), blended_(sources.size()), rows_(sources.size()) {
    for (size_t k = 0; k < sources.size(); ++k)
      if (sources[k].kind == Kind::Bilinear)
        blended_[k].resize(static_cast<size_t>(sources[k].w * channels));
  }

  size_t size() const { return sources_.size(); }

  template <typename Blend>
  void start_row(int64_t n, int64_t y, Blend blend) {
    for (size_t k = 0; k < sources_.size(); ++k) {
      const Source& s = sources_[k];
      const T* img = static_cast<const T*>(s.data) + n * s.sn;
      if (s.kind == Kind::Same) {
        rows_[k] = img + y * s.sh;
      } else if (s.kind == Kind::Nearest) {
        rows_[k] = img + s.rows.off0[y];
      } else {
        const T* r0 = img + s.rows.off0[y];
        const T* r1 = img + s.rows.off1[y];
        for (int64_t xs = 0; xs < s.w; ++xs)
          blend(blended_[k].data() + xs * channels_, r0 + xs * s.sw, r1 + xs * s.sw,
                s.rows.l0[y], s.rows.l1[y], channels_);
      }
    }
  }

  // The taps of pixels x0 .. x0 + count - 1 of the current row: taps[r * size() + k].
  void taps(PixelTap<T>* taps, int64_t x0, int count) const {
    const size_t nsrc = sources_.size();
    for (int r = 0; r < count; ++r) {
      const int64_t x = x0 + r;
      for (size_t k = 0; k < nsrc; ++k) {
        const Source& s = sources_[k];
        PixelTap<T>& t = taps[r * nsrc + k];
        if (s.kind == Kind::Bilinear) {
          t.t0 = blended_[k].data() + s.cols.off0[x];
          t.t1 = blended_[k].data() + s.cols.off1[x];
          t.w0 = s.cols.l0[x];
          t.w1 = s.cols.l1[x];
        } else {
          t.t0 = nullptr;
          t.row = rows_[k] + (s.kind == Kind::Same ? x * s.sw : s.cols.off0[x]);
        }
      }
    }
  }

 private:
  const std::vector<Source>& sources_;
  int64_t channels_;
  std::vector<std::vector<float>> blended_;
  std::vector<const T*> rows_;
};

}  // namespace hf_resize

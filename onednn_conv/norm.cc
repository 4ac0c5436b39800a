// BatchNorm (+ReLU) and the residual join for training on the CPU, as Paddle custom
// operators beside the convolution (conv.cc). Paddle's own CPU kernels for these run on
// one thread (relu_grad alone took 2.4 ms a call on ResNet-20's largest tensor), the
// option-A shortcut's strided-slice gradient 9 ms a call, and add's backward copies its
// gradient twice. Plain loops over NCHW planes, shared out over OpenMP threads (the
// libgomp oneDNN runs on), one pass per read of a tensor.
//
// batch_norm_relu: BatchNorm in training with the ReLU after it fused (relu=false: BN
//   alone). It returns the batch mean and biased variance; the Python side (__init__.py)
//   updates the layer's running statistics with them exactly as Paddle does.
// residual_join: relu(a + shortcut(b)) in one pass, forward and backward, where
//   shortcut(b) is b itself (same shape) or the paper's option A (b subsampled by the
//   stride, zero channels appended), read straight from the block input: no slice, no
//   zeros, no concat. Its backward writes both gradients in the same pass.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

paddle::Tensor floats_like(const std::vector<int64_t> &shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

struct Planes {  // x: [n, c, h, w] float32: channel c is n planes of h * w values
  int64_t n, c, plane;
  const float *at(const float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
  float *at(float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
};

Planes planes_of(const paddle::Tensor &x) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "batch_norm_relu: float32 CPU tensors only");
  auto s = x.shape();
  PD_CHECK(s.size() == 4, "batch_norm_relu: a 4-D NCHW input expected");
  return Planes{s[0], s[1], s[2] * s[3]};
}

}  // namespace

// y = relu?((x - mean) / sqrt(var + eps) * scale + shift) with the batch's mean and biased
// variance per channel, each computed in two passes as Paddle's kernel does
// (phi/kernels/cpu/batch_norm_kernel.cc), summed in double. Channels are shared out over
// the threads; every inner loop runs over one contiguous plane.
std::vector<paddle::Tensor> NormForward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                        const paddle::Tensor &shift, float epsilon, bool relu) {
  Planes p = planes_of(x);
  paddle::Tensor y = floats_like(x.shape()), mean = floats_like({p.c}), variance = floats_like({p.c});
  const float *px = x.data<float>(), *pw = scale.data<float>(), *pb = shift.data<float>();
  float *py = y.data<float>(), *pm = mean.data<float>(), *pv = variance.data<float>();
  const double count = double(p.n * p.plane);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < p.c; ++c) {
    double sum = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c);
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < p.plane; ++k) s += v[k];
      sum += s;
    }
    const float m = float(sum / count);
    double squares = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c);
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < p.plane; ++k) s += (v[k] - m) * (v[k] - m);
      squares += s;
    }
    const float var = float(squares / count);
    const float a = pw[c] / std::sqrt(var + epsilon), b = pb[c] - m * a;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c);
      float *out = p.at(py, i, c);
      if (relu)
        for (int64_t k = 0; k < p.plane; ++k) out[k] = std::max(v[k] * a + b, 0.f);
      else
        for (int64_t k = 0; k < p.plane; ++k) out[k] = v[k] * a + b;
    }
    pm[c] = m;
    pv[c] = var;
  }
  return {y, mean, variance};
}

// The gradients through BN (and the ReLU, from where y > 0): with g = dy masked by the
// ReLU and xhat = (x - mean) * inv_std, dscale = sum(g * xhat), dshift = sum(g) and
// dx = scale * inv_std * (g - dshift / count - xhat * dscale / count).
std::vector<paddle::Tensor> NormBackward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                         const paddle::Tensor &y, const paddle::Tensor &mean,
                                         const paddle::Tensor &variance, const paddle::Tensor &grad_y,
                                         float epsilon, bool relu) {
  Planes p = planes_of(x);
  paddle::Tensor grad_x = floats_like(x.shape()), grad_scale = floats_like({p.c}), grad_shift = floats_like({p.c});
  const float *px = x.data<float>(), *pw = scale.data<float>(), *py = y.data<float>(), *pm = mean.data<float>(),
              *pv = variance.data<float>(), *pg = grad_y.data<float>();
  float *gx = grad_x.data<float>(), *gw = grad_scale.data<float>(), *gb = grad_shift.data<float>();
  const double count = double(p.n * p.plane);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < p.c; ++c) {
    const float m = pm[c], inv_std = 1.f / std::sqrt(pv[c] + epsilon);
    double sum_g = 0, sum_gx = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c), *g = p.at(pg, i, c), *out = p.at(py, i, c);
      float s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
      for (int64_t k = 0; k < p.plane; ++k) {
        const float gk = (!relu || out[k] > 0.f) ? g[k] : 0.f;
        s += gk;
        sx += gk * (v[k] - m);
      }
      sum_g += s;
      sum_gx += sx;
    }
    const float dshift = float(sum_g), dscale = float(sum_gx * inv_std);
    const float a = pw[c] * inv_std, mean_g = float(sum_g / count), k_x = float(sum_gx / count) * inv_std * inv_std;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c), *g = p.at(pg, i, c), *out = p.at(py, i, c);
      float *dx = p.at(gx, i, c);
      for (int64_t k = 0; k < p.plane; ++k) {
        const float gk = (!relu || out[k] > 0.f) ? g[k] : 0.f;
        dx[k] = a * (gk - mean_g - (v[k] - m) * k_x);
      }
    }
    gw[c] = dscale;
    gb[c] = dshift;
  }
  return {grad_x, grad_scale, grad_shift};
}

std::vector<std::vector<int64_t>> NormInferShape(const std::vector<int64_t> &x, const std::vector<int64_t> &scale,
                                                 const std::vector<int64_t> &shift, float epsilon, bool relu) {
  return {x, {x[1]}, {x[1]}};
}

std::vector<paddle::DataType> NormInferDtype(const paddle::DataType &x, const paddle::DataType &scale,
                                             const paddle::DataType &shift) {
  return {x, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32};
}

PD_BUILD_OP(batch_norm_relu)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Y", "Mean", "Variance"})
    .Attrs({"epsilon: float", "relu: bool"})
    .SetKernelFn(PD_KERNEL(NormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(NormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(NormInferDtype));

PD_BUILD_GRAD_OP(batch_norm_relu)
    .Inputs({"X", "Scale", "Y", "Mean", "Variance", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Shift")})
    .Attrs({"epsilon: float", "relu: bool"})
    .SetKernelFn(PD_KERNEL(NormBackward));

// ------------------------------------------------------------------------ the join
namespace {

struct Join {
  int64_t n, c, h, w;      // a and the output: [n, c, h, w]
  int64_t cb, hb, wb;      // b: [n, cb, hb, wb]; cb <= c channels of it are added
  int64_t stride;
};

Join join_of(const paddle::Tensor &a, const std::vector<int64_t> &b, int stride) {
  PD_CHECK(a.is_cpu() && a.dtype() == paddle::DataType::FLOAT32, "residual_join: float32 CPU tensors only");
  auto s = a.shape();
  PD_CHECK(s.size() == 4 && b.size() == 4 && b[0] == s[0] && b[1] <= s[1], "residual_join: bad shapes");
  PD_CHECK((b[2] + stride - 1) / stride == s[2] && (b[3] + stride - 1) / stride == s[3],
           "residual_join: b subsampled by the stride must match a");
  return Join{s[0], s[1], s[2], s[3], b[1], b[2], b[3], stride};
}

}  // namespace

std::vector<paddle::Tensor> JoinForward(const paddle::Tensor &a, const paddle::Tensor &b, int stride) {
  Join j = join_of(a, b.shape(), stride);
  paddle::Tensor out = floats_like(a.shape());
  const float *pa = a.data<float>(), *pb = b.data<float>();
  float *po = out.data<float>();
  const int64_t plane = j.h * j.w, plane_b = j.hb * j.wb;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < j.n * j.c; ++nc) {
    const int64_t n = nc / j.c, c = nc % j.c;
    const float *x = pa + nc * plane;
    float *y = po + nc * plane;
    if (c >= j.cb) {  // option A's zero channels
      for (int64_t i = 0; i < plane; ++i) y[i] = std::max(x[i], 0.f);
    } else if (j.stride == 1) {
      const float *s = pb + (n * j.cb + c) * plane_b;
      for (int64_t i = 0; i < plane; ++i) y[i] = std::max(x[i] + s[i], 0.f);
    } else {
      const float *s = pb + (n * j.cb + c) * plane_b;
      for (int64_t r = 0; r < j.h; ++r)
        for (int64_t q = 0; q < j.w; ++q)
          y[r * j.w + q] = std::max(x[r * j.w + q] + s[r * j.stride * j.wb + q * j.stride], 0.f);
    }
  }
  return {out};
}

std::vector<paddle::Tensor> JoinBackward(const paddle::Tensor &b, const paddle::Tensor &out,
                                         const paddle::Tensor &grad_out, int stride) {
  Join j = join_of(out, b.shape(), stride);
  paddle::Tensor grad_a = floats_like(out.shape()), grad_b = floats_like(b.shape());
  const float *po = out.data<float>(), *pg = grad_out.data<float>();
  float *ga = grad_a.data<float>(), *gb = grad_b.data<float>();
  const int64_t plane = j.h * j.w, plane_b = j.hb * j.wb;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < j.n * j.c; ++nc) {
    const int64_t n = nc / j.c, c = nc % j.c;
    const float *y = po + nc * plane, *g = pg + nc * plane;
    float *da = ga + nc * plane;
    if (c >= j.cb) {
      for (int64_t i = 0; i < plane; ++i) da[i] = y[i] > 0.f ? g[i] : 0.f;
    } else if (j.stride == 1) {
      float *db = gb + (n * j.cb + c) * plane_b;
      for (int64_t i = 0; i < plane; ++i) db[i] = da[i] = y[i] > 0.f ? g[i] : 0.f;
    } else {
      float *db = gb + (n * j.cb + c) * plane_b;
      std::memset(db, 0, sizeof(float) * plane_b);  // the positions the subsample skipped
      for (int64_t r = 0; r < j.h; ++r)
        for (int64_t q = 0; q < j.w; ++q) {
          float v = y[r * j.w + q] > 0.f ? g[r * j.w + q] : 0.f;
          da[r * j.w + q] = v;
          db[r * j.stride * j.wb + q * j.stride] = v;
        }
    }
  }
  return {grad_a, grad_b};
}

std::vector<std::vector<int64_t>> JoinInferShape(const std::vector<int64_t> &a, const std::vector<int64_t> &b,
                                                 int stride) {
  return {a};
}

std::vector<paddle::DataType> JoinInferDtype(const paddle::DataType &a, const paddle::DataType &b) { return {a}; }

PD_BUILD_OP(residual_join)
    .Inputs({"A", "B"})
    .Outputs({"Out"})
    .Attrs({"stride: int"})
    .SetKernelFn(PD_KERNEL(JoinForward))
    .SetInferShapeFn(PD_INFER_SHAPE(JoinInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(JoinInferDtype));

PD_BUILD_GRAD_OP(residual_join)
    .Inputs({"B", "Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("A"), paddle::Grad("B")})
    .Attrs({"stride: int"})
    .SetKernelFn(PD_KERNEL(JoinBackward));

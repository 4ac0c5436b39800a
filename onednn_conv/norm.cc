// BatchNorm (+ReLU) and the residual join for training on the CPU, as Paddle custom
// operators beside the convolution (conv.cc). Paddle's own CPU kernels for these run on
// one thread (relu_grad alone took 2.4 ms a call on ResNet-20's largest tensor), the
// option-A shortcut's strided-slice gradient 9 ms a call, and add's backward copies its
// gradient twice. Plain loops over NCHW planes or NHWC rows, shared out over the OpenMP
// threads oneDNN runs on inside Paddle (its libiomp5: onednn_conv.openmp_link_flags), one
// pass per read of a tensor.
//
// batch_norm_relu: BatchNorm in training with the ReLU after it fused (relu=false: BN
//   alone). It returns the batch mean and biased variance, and updates the layer's
//   running statistics (RunningMean, RunningVariance) with them in place, as Paddle's
//   kernel does: eight eager ops a layer less (~80 us each layer, 2-3% of a ResNet-20
//   step). They are written through the inputs: Paddle's inplace map refuses a layer's
//   buffers as the inplace inputs of an operator that has a gradient.
// residual_join: relu(a + shortcut(b)) in one pass, forward and backward, where
//   shortcut(b) is b itself (same shape) or the paper's option A (b subsampled by the
//   stride, zero channels appended), read straight from the block input: no slice, no
//   zeros, no concat. Its backward writes both gradients in the same pass.
//
// mean_pool and max_pool: the pooled features, and the ImageNet stem's max pool (below).
// bf16_cast: float32 <-> bfloat16, rounding to the nearest even both ways (below).
//
// Both return their output twice (Y2, Out2: the same memory). A block's input feeds its
// first convolution and its shortcut; given one output each, the two gradients come back
// to this operator's backward, which adds them in the pass it makes anyway. With one
// tensor used twice, Paddle would add them itself (TensorAdd: one thread, and for
// bfloat16 an element at a time: ~20 ms of a ~115 ms ResNet-20 step). Unused, the second
// gradient arrives uninitialized and counts as zero.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "paddle/extension.h"

namespace {

paddle::Tensor floats_like(const std::vector<int64_t> &shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

// bfloat16 activations: loaded as float, stored rounded to the nearest even (as oneDNN and
// PyTorch round). A NaN may come out as inf, which stops a run as surely (engine.check_finite).
using bf16 = paddle::bfloat16;
inline float load(const float *p, int64_t i) { return p[i]; }
inline float load(const bf16 *p, int64_t i) {
  uint32_t u = uint32_t(reinterpret_cast<const uint16_t *>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float *p, int64_t i, float v) { p[i] = v; }
inline void store(bf16 *p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  reinterpret_cast<uint16_t *>(p)[i] = uint16_t(u >> 16);
}

template <typename T>
const T *data_of(const paddle::Tensor &t) { return t.data<T>(); }

// The gradient of a forked output: the first consumer's, plus the second's when it was
// used (kTwo, a template argument so that each inner loop stays one vector loop). row()
// gives the loops two plain pointers, from offset on.
template <typename T, bool kTwo>
struct Grad {
  using type = T;
  const T *first, *second;
  struct Row {
    const T *first, *second;
    float operator[](int64_t k) const { return kTwo ? load(first, k) + load(second, k) : load(first, k); }
  };
  Row row(int64_t offset) const { return Row{first + offset, kTwo ? second + offset : first}; }
};

// f(Grad<T, kTwo>{...}) with kTwo whether `second` holds a gradient.
template <typename T, typename F>
auto with_grad(const paddle::Tensor &first, const paddle::Tensor &second, F f) {
  if (second.initialized()) return f(Grad<T, true>{first.data<T>(), second.data<T>()});
  return f(Grad<T, false>{first.data<T>(), nullptr});
}
template <typename T>
T *data_of(paddle::Tensor &t) { return t.data<T>(); }

struct Planes {  // x: [n, c, h, w] float32: channel c is n planes of h * w values
  int64_t n, c, plane;
  const float *at(const float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
  float *at(float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
};

Planes planes_of(const paddle::Tensor &x) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "batch_norm_relu: float32 CPU tensors only");
  auto s = x.shape();
  PD_CHECK(s.size() == 4, "batch_norm_relu: a 4-D input expected");
  return Planes{s[0], s[1], s[2] * s[3]};
}

}  // namespace

// y = relu?((x - mean) / sqrt(var + eps) * scale + shift) with the batch's mean and biased
// variance per channel, each computed in two passes as Paddle's kernel does
// (phi/kernels/cpu/batch_norm_kernel.cc), summed in double. Channels are shared out over
// the threads; every inner loop runs over one contiguous plane.
std::vector<paddle::Tensor> NormForwardNCHW(const paddle::Tensor &x, const paddle::Tensor &scale,
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
std::vector<paddle::Tensor> NormBackwardNCHW(const paddle::Tensor &x, const paddle::Tensor &scale,
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

// NHWC: rows of c contiguous channels. Each thread sums its rows per channel in float,
// 256 rows at a time, into double partial sums (the same precision as the NCHW planes).
namespace {

constexpr int64_t kRowsPerFlush = 256;

// per[c] = sum over rows of f(row, c), f given as a lambda that adds into acc[0..c)
template <typename AddRow>
std::vector<double> channel_sums(int64_t rows, int64_t c, int terms, AddRow add_row) {
  const int threads = omp_get_max_threads();
  std::vector<double> parts(size_t(threads) * terms * c, 0.0);
#pragma omp parallel
  {
    double *part = parts.data() + size_t(omp_get_thread_num()) * terms * c;
    std::vector<float> acc(size_t(terms) * c, 0.f);
    int64_t pending = 0;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      add_row(r, acc.data());
      if (++pending == kRowsPerFlush) {
        for (size_t k = 0; k < acc.size(); ++k) part[k] += acc[k], acc[k] = 0.f;
        pending = 0;
      }
    }
    for (size_t k = 0; k < acc.size(); ++k) part[k] += acc[k];
  }
  std::vector<double> total(size_t(terms) * c, 0.0);
  for (int t = 0; t < threads; ++t)
    for (size_t k = 0; k < total.size(); ++k) total[k] += parts[size_t(t) * terms * c + k];
  return total;
}

}  // namespace

// NHWC rows are c values long: 16 in ResNet's first stage, too short for a vector loop to
// pay its set-up per row. The kernels walk "wide rows" of `rep` rows (width = rep * c, up to
// 512 values) instead, with the per-channel numbers repeated rep times; sums come out per
// wide-row position and fold back to c channels.
struct Wide {
  int64_t rep, width, rows;  // rows: the wide rows
  Wide(int64_t rows_c, int64_t c) : rep(1) {
    while (rep * c < 512 && rows_c % (rep * 2) == 0) rep *= 2;
    width = rep * c;
    rows = rows_c / rep;
  }
  std::vector<float> repeat(const float *per_channel, int64_t c) const {
    std::vector<float> out(width, 0.f);
    for (int64_t k = 0; k < width; ++k) out[k] = per_channel[k % c];
    return out;
  }
  std::vector<double> fold(const std::vector<double> &sums, int64_t c, int terms) const {
    std::vector<double> out(size_t(terms) * c, 0.0);
    for (int t = 0; t < terms; ++t)
      for (int64_t k = 0; k < width; ++k) out[t * c + k % c] += sums[t * width + k];
    return out;
  }
};

template <typename T>
std::vector<paddle::Tensor> NormForwardNHWC(const paddle::Tensor &x, const paddle::Tensor &scale,
                                            const paddle::Tensor &shift, float epsilon, bool relu) {
  auto s = x.shape();
  const int64_t c = s[3], rows = s[0] * s[1] * s[2];
  const Wide wide(rows, c);
  const int64_t w = wide.width;
  paddle::Tensor y = paddle::empty(s, x.dtype(), paddle::CPUPlace()), mean = floats_like({c}),
                 variance = floats_like({c});
  const T *px = data_of<T>(x);
  T *py = data_of<T>(y);
  const float *pw = scale.data<float>(), *pb = shift.data<float>();
  float *pm = mean.data<float>(), *pv = variance.data<float>();
  std::vector<double> sum = wide.fold(channel_sums(wide.rows, w, 1, [&](int64_t r, float *acc) {
    const T *v = px + r * w;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) acc[k] += load(v, k);
  }), c, 1);
  for (int64_t k = 0; k < c; ++k) pm[k] = float(sum[k] / double(rows));
  const std::vector<float> wide_m = wide.repeat(pm, c);
  const float *m = wide_m.data();
  std::vector<double> squares = wide.fold(channel_sums(wide.rows, w, 1, [&](int64_t r, float *acc) {
    const T *v = px + r * w;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) acc[k] += (load(v, k) - m[k]) * (load(v, k) - m[k]);
  }), c, 1);
  std::vector<float> a_c(c), b_c(c);
  for (int64_t k = 0; k < c; ++k) {
    pv[k] = float(squares[k] / double(rows));
    a_c[k] = pw[k] / std::sqrt(pv[k] + epsilon);
    b_c[k] = pb[k] - pm[k] * a_c[k];
  }
  const std::vector<float> wide_a = wide.repeat(a_c.data(), c), wide_b = wide.repeat(b_c.data(), c);
  const float *a = wide_a.data(), *b = wide_b.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < wide.rows; ++r) {
    const T *v = px + r * w;
    T *out = py + r * w;
    if (relu) {
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) store(out, k, std::max(load(v, k) * a[k] + b[k], 0.f));
    } else {
#pragma omp simd
      for (int64_t k = 0; k < w; ++k) store(out, k, load(v, k) * a[k] + b[k]);
    }
  }
  return {y, mean, variance};
}

template <typename G>
std::vector<paddle::Tensor> NormBackwardNHWC(const paddle::Tensor &x, const paddle::Tensor &scale,
                                             const paddle::Tensor &y, const paddle::Tensor &mean,
                                             const paddle::Tensor &variance, G grad_y, float epsilon,
                                             bool relu) {
  using T = typename G::type;
  auto s = x.shape();
  const int64_t c = s[3], rows = s[0] * s[1] * s[2];
  const Wide wide(rows, c);
  const int64_t w = wide.width;
  paddle::Tensor grad_x = paddle::empty(s, x.dtype(), paddle::CPUPlace()), grad_scale = floats_like({c}),
                 grad_shift = floats_like({c});
  const T *px = data_of<T>(x), *py = data_of<T>(y);
  const float *pw = scale.data<float>(), *pv = variance.data<float>();
  T *gx = data_of<T>(grad_x);
  float *gw = grad_scale.data<float>(), *gb = grad_shift.data<float>();
  const std::vector<float> wide_m = wide.repeat(mean.data<float>(), c);
  const float *m = wide_m.data();
  std::vector<double> sums = wide.fold(channel_sums(wide.rows, w, 2, [&](int64_t r, float *acc) {
    const T *v = px + r * w, *out = py + r * w;
    const auto g = grad_y.row(r * w);
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const float gk = (!relu || load(out, k) > 0.f) ? g[k] : 0.f;
      acc[k] += gk;
      acc[w + k] += gk * (load(v, k) - m[k]);
    }
  }), c, 2);
  std::vector<float> a_c(c), mean_g_c(c), k_x_c(c);
  for (int64_t k = 0; k < c; ++k) {
    const float inv_std = 1.f / std::sqrt(pv[k] + epsilon);
    gb[k] = float(sums[k]);
    gw[k] = float(sums[c + k] * inv_std);
    a_c[k] = pw[k] * inv_std;
    mean_g_c[k] = float(sums[k] / double(rows));
    k_x_c[k] = float(sums[c + k] / double(rows)) * inv_std * inv_std;
  }
  const std::vector<float> wide_a = wide.repeat(a_c.data(), c), wide_mean_g = wide.repeat(mean_g_c.data(), c),
                           wide_k_x = wide.repeat(k_x_c.data(), c);
  const float *a = wide_a.data(), *mean_g = wide_mean_g.data(), *k_x = wide_k_x.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < wide.rows; ++r) {
    const T *v = px + r * w, *out = py + r * w;
    const auto g = grad_y.row(r * w);
    T *dx = gx + r * w;
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const float gk = (!relu || load(out, k) > 0.f) ? g[k] : 0.f;
      store(dx, k, a[k] * (gk - mean_g[k] - (load(v, k) - m[k]) * k_x[k]));
    }
  }
  return {grad_x, grad_scale, grad_shift};
}

std::vector<paddle::Tensor> NormForward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                        const paddle::Tensor &shift, float epsilon, bool relu, bool nhwc) {
  if (x.dtype() == paddle::DataType::BFLOAT16) {
    PD_CHECK(nhwc && x.is_cpu() && x.shape().size() == 4, "batch_norm_relu: bfloat16 runs on 4-D NHWC CPU tensors");
    return NormForwardNHWC<bf16>(x, scale, shift, epsilon, relu);
  }
  planes_of(x);  // the checks
  return nhwc ? NormForwardNHWC<float>(x, scale, shift, epsilon, relu)
              : NormForwardNCHW(x, scale, shift, epsilon, relu);
}

// running = running * momentum + batch * (1 - momentum), in float, as Paddle's kernel
// (phi/kernels/cpu/batch_norm_kernel.cc) updates its running mean and variance.
void update_running(const paddle::Tensor &running, const paddle::Tensor &batch, float momentum) {
  PD_CHECK(running.is_cpu() && running.dtype() == paddle::DataType::FLOAT32 && running.numel() == batch.numel(),
           "batch_norm_relu: running statistics: one float32 CPU value per channel");
  float *r = const_cast<float *>(running.data<float>());
  const float *b = batch.data<float>();
  const float rest = float(1. - momentum);
  for (int64_t k = 0; k < batch.numel(); ++k) r[k] = r[k] * momentum + b[k] * rest;
}

std::vector<paddle::Tensor> NormForwardForked(const paddle::Tensor &x, const paddle::Tensor &scale,
                                              const paddle::Tensor &shift, const paddle::Tensor &running_mean,
                                              const paddle::Tensor &running_variance, float epsilon, float momentum,
                                              bool relu, bool nhwc) {
  std::vector<paddle::Tensor> out = NormForward(x, scale, shift, epsilon, relu, nhwc);
  update_running(running_mean, out[1], momentum);
  update_running(running_variance, out[2], momentum);
  out.push_back(out[0]);  // Y2: the same tensor, for a second consumer
  return out;
}

std::vector<paddle::Tensor> NormBackward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                         const paddle::Tensor &y, const paddle::Tensor &mean,
                                         const paddle::Tensor &variance, const paddle::Tensor &grad_y,
                                         const paddle::Tensor &grad_y2, float epsilon, float /*momentum*/,
                                         bool relu, bool nhwc) {
  auto nhwc_kernel = [&](auto g) { return NormBackwardNHWC(x, scale, y, mean, variance, g, epsilon, relu); };
  if (x.dtype() == paddle::DataType::BFLOAT16) return with_grad<bf16>(grad_y, grad_y2, nhwc_kernel);
  if (nhwc) return with_grad<float>(grad_y, grad_y2, nhwc_kernel);
  PD_CHECK(!grad_y2.initialized(), "batch_norm_relu: a second consumer of Y (Y2) runs on NHWC only");
  return NormBackwardNCHW(x, scale, y, mean, variance, grad_y, epsilon, relu);
}

std::vector<std::vector<int64_t>> NormInferShape(const std::vector<int64_t> &x, const std::vector<int64_t> &scale,
                                                 const std::vector<int64_t> &shift,
                                                 const std::vector<int64_t> &running_mean,
                                                 const std::vector<int64_t> &running_variance, float epsilon,
                                                 float momentum, bool relu, bool nhwc) {
  const int64_t c = nhwc ? x[3] : x[1];
  return {x, {c}, {c}, x};
}

std::vector<paddle::DataType> NormInferDtype(const paddle::DataType &x, const paddle::DataType &scale,
                                             const paddle::DataType &shift, const paddle::DataType &running_mean,
                                             const paddle::DataType &running_variance) {  // statistics: float32
  return {x, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32, x};
}

PD_BUILD_OP(batch_norm_relu)
    .Inputs({"X", "Scale", "Shift", "RunningMean", "RunningVariance"})
    .Outputs({"Y", "Mean", "Variance", "Y2"})
    .Attrs({"epsilon: float", "momentum: float", "relu: bool", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(NormForwardForked))
    .SetInferShapeFn(PD_INFER_SHAPE(NormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(NormInferDtype));

PD_BUILD_GRAD_OP(batch_norm_relu)
    .Inputs({"X", "Scale", "Y", "Mean", "Variance", paddle::Grad("Y"), paddle::Grad("Y2")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Shift")})
    .Attrs({"epsilon: float", "momentum: float", "relu: bool", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(NormBackward));

// ------------------------------------------------------------------------ the join
namespace {

struct Join {
  int64_t n, c, h, w;      // a and the output: [n, c, h, w] (NCHW) or [n, h, w, c] (NHWC)
  int64_t cb, hb, wb;      // b, in the same layout; its cb <= c channels are added
  int64_t stride;
  bool nhwc;
  bool identity() const { return stride == 1 && cb == c; }
};

Join join_of(const paddle::Tensor &a, const std::vector<int64_t> &b, int stride, bool nhwc) {
  PD_CHECK(a.is_cpu() && (a.dtype() == paddle::DataType::FLOAT32 || a.dtype() == paddle::DataType::BFLOAT16),
           "residual_join: float32 or bfloat16 CPU tensors only");
  auto s = a.shape();
  PD_CHECK(s.size() == 4 && b.size() == 4 && b[0] == s[0], "residual_join: bad shapes");
  Join j = nhwc ? Join{s[0], s[3], s[1], s[2], b[3], b[1], b[2], stride, true}
                : Join{s[0], s[1], s[2], s[3], b[1], b[2], b[3], stride, false};
  PD_CHECK(j.cb <= j.c && (j.hb + stride - 1) / stride == j.h && (j.wb + stride - 1) / stride == j.w,
           "residual_join: b subsampled by the stride must match a");
  return j;
}

inline float relu(float v) { return std::max(v, 0.f); }

}  // namespace

// The identity join (any layout: one flat pass) and option A in NHWC (each output row of
// c channels reads b's row at (h * s, w * s)), for float32 or bfloat16 activations.
template <typename T>
void join_forward(const Join &j, const T *pa, const T *pb, T *po) {
  if (j.identity()) {
    const int64_t size = j.n * j.c * j.h * j.w;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < size; ++i) store(po, i, relu(load(pa, i) + load(pb, i)));
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < j.n * j.h * j.w; ++row) {
    const int64_t n = row / (j.h * j.w), h = row / j.w % j.h, w = row % j.w;
    const T *x = pa + row * j.c, *s = pb + ((n * j.hb + h * j.stride) * j.wb + w * j.stride) * j.cb;
    T *y = po + row * j.c;
    for (int64_t k = 0; k < j.cb; ++k) store(y, k, relu(load(x, k) + load(s, k)));
    for (int64_t k = j.cb; k < j.c; ++k) store(y, k, relu(load(x, k)));  // the zero channels
  }
}

template <typename T, typename G>
void join_backward(const Join &j, const T *po, G grad, T *ga, T *gb) {
  if (j.identity()) {
    const int64_t size = j.n * j.c * j.h * j.w;
#pragma omp parallel
    {
      const auto g = grad.row(0);  // private: the vector loop reads two plain pointers
#pragma omp for simd schedule(static)
      for (int64_t i = 0; i < size; ++i) {
        const float v = load(po, i) > 0.f ? g[i] : 0.f;
        store(ga, i, v);
        store(gb, i, v);
      }
    }
    return;
  }
  const int64_t size_b = j.n * j.hb * j.wb * j.cb;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < size_b; ++i) store(gb, i, 0.f);  // the positions the subsample skipped
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < j.n * j.h * j.w; ++row) {
    const int64_t n = row / (j.h * j.w), h = row / j.w % j.h, w = row % j.w;
    const T *y = po + row * j.c;
    const auto g = grad.row(row * j.c);
    T *da = ga + row * j.c, *db = gb + ((n * j.hb + h * j.stride) * j.wb + w * j.stride) * j.cb;
#pragma omp simd
    for (int64_t k = 0; k < j.cb; ++k) {
      const float v = load(y, k) > 0.f ? g[k] : 0.f;
      store(da, k, v);
      store(db, k, v);
    }
#pragma omp simd
    for (int64_t k = j.cb; k < j.c; ++k) store(da, k, load(y, k) > 0.f ? g[k] : 0.f);  // the zero channels
  }
}

// Option A in NCHW: channel planes, the subsample read by stride (float32 only).
void join_forward_nchw(const Join &j, const float *pa, const float *pb, float *po) {
  const int64_t plane = j.h * j.w, plane_b = j.hb * j.wb;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < j.n * j.c; ++nc) {
    const int64_t n = nc / j.c, c = nc % j.c;
    const float *x = pa + nc * plane, *s = pb + (n * j.cb + c) * plane_b;
    float *y = po + nc * plane;
    if (c >= j.cb) {
      for (int64_t i = 0; i < plane; ++i) y[i] = relu(x[i]);
    } else {
      for (int64_t r = 0; r < j.h; ++r)
        for (int64_t q = 0; q < j.w; ++q)
          y[r * j.w + q] = relu(x[r * j.w + q] + s[r * j.stride * j.wb + q * j.stride]);
    }
  }
}

void join_backward_nchw(const Join &j, const float *po, const float *pg, float *ga, float *gb) {
  const int64_t plane = j.h * j.w, plane_b = j.hb * j.wb;
#pragma omp parallel for schedule(static)
  for (int64_t nc = 0; nc < j.n * j.c; ++nc) {
    const int64_t n = nc / j.c, c = nc % j.c;
    const float *y = po + nc * plane, *g = pg + nc * plane;
    float *da = ga + nc * plane;
    if (c >= j.cb) {
      for (int64_t i = 0; i < plane; ++i) da[i] = y[i] > 0.f ? g[i] : 0.f;
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
}

std::vector<paddle::Tensor> JoinForward(const paddle::Tensor &a, const paddle::Tensor &b, int stride, bool nhwc) {
  Join j = join_of(a, b.shape(), stride, nhwc);
  paddle::Tensor out = paddle::empty(a.shape(), a.dtype(), paddle::CPUPlace());
  if (a.dtype() == paddle::DataType::BFLOAT16) {
    PD_CHECK(b.dtype() == a.dtype() && (nhwc || j.identity()), "residual_join: bfloat16 joins NHWC tensors");
    join_forward(j, data_of<bf16>(a), data_of<bf16>(b), data_of<bf16>(out));
  } else if (nhwc || j.identity()) {
    join_forward(j, a.data<float>(), b.data<float>(), out.data<float>());
  } else {
    join_forward_nchw(j, a.data<float>(), b.data<float>(), out.data<float>());
  }
  return {out, out};  // Out2: the same tensor, for a second consumer
}

std::vector<paddle::Tensor> JoinBackward(const paddle::Tensor &b, const paddle::Tensor &out,
                                         const paddle::Tensor &grad_out, const paddle::Tensor &grad_out2,
                                         int stride, bool nhwc) {
  Join j = join_of(out, b.shape(), stride, nhwc);
  paddle::Tensor grad_a = paddle::empty(out.shape(), out.dtype(), paddle::CPUPlace());
  paddle::Tensor grad_b = paddle::empty(b.shape(), b.dtype(), paddle::CPUPlace());
  if (out.dtype() == paddle::DataType::BFLOAT16) {
    with_grad<bf16>(grad_out, grad_out2, [&](auto g) {
      join_backward(j, data_of<bf16>(out), g, data_of<bf16>(grad_a), data_of<bf16>(grad_b));
      return 0;
    });
  } else if (nhwc || j.identity()) {
    with_grad<float>(grad_out, grad_out2, [&](auto g) {
      join_backward(j, out.data<float>(), g, grad_a.data<float>(), grad_b.data<float>());
      return 0;
    });
  } else {
    PD_CHECK(!grad_out2.initialized(), "residual_join: a second consumer of Out (Out2) runs on NHWC only");
    join_backward_nchw(j, out.data<float>(), grad_out.data<float>(), grad_a.data<float>(), grad_b.data<float>());
  }
  return {grad_a, grad_b};
}

std::vector<std::vector<int64_t>> JoinInferShape(const std::vector<int64_t> &a, const std::vector<int64_t> &b,
                                                 int stride, bool nhwc) {
  return {a, a};
}

std::vector<paddle::DataType> JoinInferDtype(const paddle::DataType &a, const paddle::DataType &b) { return {a, a}; }

PD_BUILD_OP(residual_join)
    .Inputs({"A", "B"})
    .Outputs({"Out", "Out2"})
    .Attrs({"stride: int", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(JoinForward))
    .SetInferShapeFn(PD_INFER_SHAPE(JoinInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(JoinInferDtype));

PD_BUILD_GRAD_OP(residual_join)
    .Inputs({"B", "Out", paddle::Grad("Out"), paddle::Grad("Out2")})
    .Outputs({paddle::Grad("A"), paddle::Grad("B")})
    .Attrs({"stride: int", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(JoinBackward));

// ------------------------------------------------------------------------ the pooling
// mean_pool: the pooled features of NHWC activations, [n, h, w, c] -> [n, c] float32 (the
// classifier and the loss stay float32), and its gradient g / (h * w) back in the
// activations' type: one pass each way, in place of a cast, Paddle's mean and their two
// gradients (Paddle's mean gradient alone took 1.4 ms on one thread).
template <typename T>
void pool_forward(const T *x, float *y, int64_t n, int64_t plane, int64_t c) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float *out = y + i * c;
    std::fill(out, out + c, 0.f);
    for (int64_t p = 0; p < plane; ++p) {
      const T *v = x + (i * plane + p) * c;
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) out[k] += load(v, k);
    }
    const float scale = 1.f / float(plane);
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) out[k] *= scale;
  }
}

template <typename T>
void pool_backward(const float *g, T *dx, int64_t n, int64_t plane, int64_t c) {
  const float scale = 1.f / float(plane);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n * plane; ++row) {
    const float *gi = g + row / plane * c;
    T *d = dx + row * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) store(d, k, gi[k] * scale);
  }
}

std::vector<paddle::Tensor> PoolForward(const paddle::Tensor &x) {
  auto s = x.shape();
  PD_CHECK(x.is_cpu() && s.size() == 4, "mean_pool: a 4-D NHWC CPU tensor expected");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 || x.dtype() == paddle::DataType::BFLOAT16,
           "mean_pool: float32 or bfloat16 activations only");
  paddle::Tensor y = floats_like({s[0], s[3]});
  if (x.dtype() == paddle::DataType::BFLOAT16)
    pool_forward(data_of<bf16>(x), y.data<float>(), s[0], s[1] * s[2], s[3]);
  else
    pool_forward(x.data<float>(), y.data<float>(), s[0], s[1] * s[2], s[3]);
  return {y};
}

std::vector<paddle::Tensor> PoolBackward(const paddle::Tensor &x, const paddle::Tensor &grad_y) {
  auto s = x.shape();
  paddle::Tensor grad_x = paddle::empty(s, x.dtype(), paddle::CPUPlace());
  if (x.dtype() == paddle::DataType::BFLOAT16)
    pool_backward(grad_y.data<float>(), data_of<bf16>(grad_x), s[0], s[1] * s[2], s[3]);
  else
    pool_backward(grad_y.data<float>(), grad_x.data<float>(), s[0], s[1] * s[2], s[3]);
  return {grad_x};
}

std::vector<std::vector<int64_t>> PoolInferShape(const std::vector<int64_t> &x) { return {{x[0], x[3]}}; }

std::vector<paddle::DataType> PoolInferDtype(const paddle::DataType &x) { return {paddle::DataType::FLOAT32}; }

PD_BUILD_OP(mean_pool)
    .Inputs({"X"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(PoolForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PoolInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PoolInferDtype));

PD_BUILD_GRAD_OP(mean_pool)
    .Inputs({"X", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(PoolBackward));

// max_pool: the ImageNet stem's 3x3 stride-2 max pool (padding 1) of NHWC activations, as
// Paddle's kernel computes it (phi/kernels/funcs/pooling.cc, which runs on one thread and
// has no bfloat16): each window's max over its positions inside the image, and backward
// each output's gradient to the first position of its window, row by row, equal to that
// max. Images are shared out over the threads, so the backward's scatter never races; its
// sums (an input can win two overlapping windows) are made in float, rounded once. Its
// output twice, as the join's (Y2: the first block's convolution and its shortcut).
namespace {

struct Window {  // an NHWC image h x w of c channels, pooled to oh x ow
  int64_t h, w, c, oh, ow;
  int64_t first(int64_t o) const { return std::max<int64_t>(2 * o - 1, 0); }
  int64_t end(int64_t o, int64_t size) const { return std::min<int64_t>(2 * o + 2, size); }
};

Window window_of(const std::vector<int64_t> &s) { return Window{s[1], s[2], s[3], (s[1] + 1) / 2, (s[2] + 1) / 2}; }

template <typename T>
void max_pool_forward(const T *x, T *y, int64_t n, const Window &p) {
#pragma omp parallel
  {
    std::vector<float> m(p.c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t oh = 0; oh < p.oh; ++oh)
        for (int64_t ow = 0; ow < p.ow; ++ow) {
          std::fill(m.begin(), m.end(), std::numeric_limits<float>::lowest());  // Paddle's start
          for (int64_t ih = p.first(oh); ih < p.end(oh, p.h); ++ih)
            for (int64_t iw = p.first(ow); iw < p.end(ow, p.w); ++iw) {
              const T *v = x + ((i * p.h + ih) * p.w + iw) * p.c;
#pragma omp simd
              for (int64_t k = 0; k < p.c; ++k) m[k] = m[k] > load(v, k) ? m[k] : load(v, k);
            }
          T *out = y + ((i * p.oh + oh) * p.ow + ow) * p.c;
#pragma omp simd
          for (int64_t k = 0; k < p.c; ++k) store(out, k, m[k]);
        }
  }
}

template <typename G>
void max_pool_backward(const typename G::type *x, const typename G::type *y, G grad, typename G::type *dx,
                       int64_t n, const Window &p) {
#pragma omp parallel
  {
    std::vector<float> acc(p.h * p.w * p.c);  // one image's gradient
    std::vector<char> done(p.c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t oh = 0; oh < p.oh; ++oh)
        for (int64_t ow = 0; ow < p.ow; ++ow) {
          const int64_t o = ((i * p.oh + oh) * p.ow + ow) * p.c;
          const auto *m = y + o;
          const auto g = grad.row(o);
          std::fill(done.begin(), done.end(), 0);
          for (int64_t ih = p.first(oh); ih < p.end(oh, p.h); ++ih)
            for (int64_t iw = p.first(ow); iw < p.end(ow, p.w); ++iw) {
              const auto *v = x + ((i * p.h + ih) * p.w + iw) * p.c;
              float *a = acc.data() + (ih * p.w + iw) * p.c;
#pragma omp simd
              for (int64_t k = 0; k < p.c; ++k) {
                const bool first = !done[k] && load(v, k) == load(m, k);
                a[k] += first ? g[k] : 0.f;
                done[k] |= first;
              }
            }
        }
      auto *d = dx + i * p.h * p.w * p.c;
#pragma omp simd
      for (int64_t k = 0; k < p.h * p.w * p.c; ++k) store(d, k, acc[k]);
    }
  }
}

}  // namespace

std::vector<paddle::Tensor> MaxPoolForward(const paddle::Tensor &x) {
  auto s = x.shape();
  PD_CHECK(x.is_cpu() && s.size() == 4, "max_pool: a 4-D NHWC CPU tensor expected");
  const Window p = window_of(s);
  paddle::Tensor y = paddle::empty({s[0], p.oh, p.ow, s[3]}, x.dtype(), paddle::CPUPlace());
  if (x.dtype() == paddle::DataType::BFLOAT16)
    max_pool_forward(data_of<bf16>(x), data_of<bf16>(y), s[0], p);
  else if (x.dtype() == paddle::DataType::FLOAT32)
    max_pool_forward(x.data<float>(), y.data<float>(), s[0], p);
  else
    PD_THROW("max_pool: float32 or bfloat16 activations only");
  return {y, y};  // Y2: the same tensor, for a second consumer
}

std::vector<paddle::Tensor> MaxPoolBackward(const paddle::Tensor &x, const paddle::Tensor &y,
                                            const paddle::Tensor &grad_y, const paddle::Tensor &grad_y2) {
  const Window p = window_of(x.shape());
  paddle::Tensor grad_x = paddle::empty(x.shape(), x.dtype(), paddle::CPUPlace());
  auto kernel = [&](auto g) {
    using T = typename decltype(g)::type;
    max_pool_backward(data_of<T>(x), data_of<T>(y), g, data_of<T>(grad_x), x.shape()[0], p);
    return 0;
  };
  if (x.dtype() == paddle::DataType::BFLOAT16) with_grad<bf16>(grad_y, grad_y2, kernel);
  else with_grad<float>(grad_y, grad_y2, kernel);
  return {grad_x};
}

std::vector<std::vector<int64_t>> MaxPoolInferShape(const std::vector<int64_t> &x) {
  std::vector<int64_t> y = {x[0], (x[1] + 1) / 2, (x[2] + 1) / 2, x[3]};
  return {y, y};
}

std::vector<paddle::DataType> MaxPoolInferDtype(const paddle::DataType &x) { return {x, x}; }

PD_BUILD_OP(max_pool)
    .Inputs({"X"})
    .Outputs({"Y", "Y2"})
    .SetKernelFn(PD_KERNEL(MaxPoolForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MaxPoolInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MaxPoolInferDtype));

PD_BUILD_GRAD_OP(max_pool)
    .Inputs({"X", "Y", paddle::Grad("Y"), paddle::Grad("Y2")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(MaxPoolBackward));

// ------------------------------------------------------------------------ the cast
// bf16_cast: float32 to bfloat16 or bfloat16 to float32, and its gradient the other way,
// rounding to the nearest even wherever it narrows (store, above). Paddle's own CPU cast
// truncates in 2.6 (3.x rounds), so the casts the bf16 path makes around these operators
// (the image batch, a frozen BatchNorm's fp32 kernel) are this one: one rounding on both.
namespace {

template <typename From, typename To>
void cast_values(const From *x, To *y, int64_t count) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) store(y, i, load(x, i));
}

paddle::DataType other_precision(paddle::DataType t) {
  return t == paddle::DataType::FLOAT32 ? paddle::DataType::BFLOAT16 : paddle::DataType::FLOAT32;
}

}  // namespace

std::vector<paddle::Tensor> CastBf16(const paddle::Tensor &x) {
  PD_CHECK(x.is_cpu() && (x.dtype() == paddle::DataType::FLOAT32 || x.dtype() == paddle::DataType::BFLOAT16),
           "bf16_cast: a float32 or bfloat16 CPU tensor expected");
  paddle::Tensor y = paddle::empty(x.shape(), other_precision(x.dtype()), paddle::CPUPlace());
  if (x.dtype() == paddle::DataType::FLOAT32)
    cast_values(x.data<float>(), data_of<bf16>(y), x.numel());
  else
    cast_values(data_of<bf16>(x), y.data<float>(), x.numel());
  return {y};
}

std::vector<std::vector<int64_t>> CastInferShape(const std::vector<int64_t> &x) { return {x}; }

std::vector<paddle::DataType> CastInferDtype(const paddle::DataType &x) { return {other_precision(x)}; }

PD_BUILD_OP(bf16_cast)
    .Inputs({"X"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(CastBf16))
    .SetInferShapeFn(PD_INFER_SHAPE(CastInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CastInferDtype));

PD_BUILD_GRAD_OP(bf16_cast)
    .Inputs({paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(CastBf16));

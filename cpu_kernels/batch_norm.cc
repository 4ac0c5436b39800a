// batch_norm_act: BatchNorm in training with the activation after it fused (act: 0 none,
// 1 ReLU, 2 GELU), NCHW float32 or NHWC float32/bfloat16. It returns the batch mean and
// biased variance, and updates the layer's running statistics (RunningMean,
// RunningVariance) with them in place, as Paddle's kernel does: eight eager ops a layer
// less (~80 us each layer, 2-3% of a ResNet-20 step). They are written through the inputs:
// Paddle's inplace map refuses a layer's buffers as the inplace inputs of an operator that
// has a gradient. Its output twice (Y2: common.h, forked outputs). The backward finds the
// ReLU's mask in Y and recomputes GELU's input from X (one multiply-add), so nothing more
// is kept.
#include <cmath>
#include <type_traits>

#include "common.h"

using namespace cpu_kernels;

namespace {

struct Planes {  // x: [n, c, h, w] float32: channel c is n planes of h * w values
  int64_t n, c, plane;
  const float *at(const float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
  float *at(float *x, int64_t i, int64_t ch) const { return x + (i * c + ch) * plane; }
};

Planes planes_of(const paddle::Tensor &x) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "batch_norm_act: float32 CPU tensors only");
  auto s = x.shape();
  PD_CHECK(s.size() == 4, "batch_norm_act: a 4-D input expected");
  return Planes{s[0], s[1], s[2] * s[3]};
}

// f(std::integral_constant<int, act>()): each loop compiled for its activation.
template <typename F>
auto with_act(int act, F f) {
  PD_CHECK(act == kNone || act == kRelu || act == kGelu, "batch_norm_act: act must be 0 (none), 1 (relu) or 2 (gelu)");
  if (act == kRelu) return f(std::integral_constant<int, kRelu>());
  if (act == kGelu) return f(std::integral_constant<int, kGelu>());
  return f(std::integral_constant<int, kNone>());
}

template <int A>
inline float activate(float z) { return A == kRelu ? relu(z) : A == kGelu ? gelu(z) : z; }

// The gradient at the activation's input z, from the gradient g at its output y.
template <int A>
inline float through(float g, float y, float z) {
  return A == kRelu ? (y > 0.f ? g : 0.f) : A == kGelu ? g * gelu_grad(z) : g;
}

}  // namespace

// y = act(((x - mean) / sqrt(var + eps) * scale + shift) with the batch's mean and biased
// variance per channel, each computed in two passes as Paddle's kernel does
// (phi/kernels/cpu/batch_norm_kernel.cc), summed in double. Channels are shared out over
// the threads; every inner loop runs over one contiguous plane.
template <int A>
std::vector<paddle::Tensor> NormForwardNCHW(const paddle::Tensor &x, const paddle::Tensor &scale,
                                            const paddle::Tensor &shift, float epsilon) {
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
#pragma omp simd
      for (int64_t k = 0; k < p.plane; ++k) out[k] = activate<A>(v[k] * a + b);
    }
    pm[c] = m;
    pv[c] = var;
  }
  return {y, mean, variance};
}

// The gradients through BN and its activation: with g = dy through the activation (the
// ReLU's mask where y > 0, GELU's derivative at its input) and xhat = (x - mean) *
// inv_std, dscale = sum(g * xhat), dshift = sum(g) and
// dx = scale * inv_std * (g - dshift / count - xhat * dscale / count).
template <int A>
std::vector<paddle::Tensor> NormBackwardNCHW(const paddle::Tensor &x, const paddle::Tensor &scale,
                                             const paddle::Tensor &shift, const paddle::Tensor &y,
                                             const paddle::Tensor &mean, const paddle::Tensor &variance,
                                             const paddle::Tensor &grad_y, float epsilon) {
  Planes p = planes_of(x);
  paddle::Tensor grad_x = floats_like(x.shape()), grad_scale = floats_like({p.c}), grad_shift = floats_like({p.c});
  const float *px = x.data<float>(), *pw = scale.data<float>(), *pb = shift.data<float>(), *py = y.data<float>(),
              *pm = mean.data<float>(), *pv = variance.data<float>(), *pg = grad_y.data<float>();
  float *gx = grad_x.data<float>(), *gw = grad_scale.data<float>(), *gb = grad_shift.data<float>();
  const double count = double(p.n * p.plane);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < p.c; ++c) {
    const float m = pm[c], inv_std = 1.f / std::sqrt(pv[c] + epsilon);
    const float za = pw[c] * inv_std, zb = pb[c] - m * za;  // the activation's input: x * za + zb
    double sum_g = 0, sum_gx = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *v = p.at(px, i, c), *g = p.at(pg, i, c), *out = p.at(py, i, c);
      float s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
      for (int64_t k = 0; k < p.plane; ++k) {
        const float gk = through<A>(g[k], out[k], v[k] * za + zb);
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
#pragma omp simd
      for (int64_t k = 0; k < p.plane; ++k) {
        const float gk = through<A>(g[k], out[k], v[k] * za + zb);
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

template <typename T, int A>
std::vector<paddle::Tensor> NormForwardNHWC(const paddle::Tensor &x, const paddle::Tensor &scale,
                                            const paddle::Tensor &shift, float epsilon) {
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
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) store(out, k, activate<A>(load(v, k) * a[k] + b[k]));
  }
  return {y, mean, variance};
}

template <int A, typename G>
std::vector<paddle::Tensor> NormBackwardNHWC(const paddle::Tensor &x, const paddle::Tensor &scale,
                                             const paddle::Tensor &shift, const paddle::Tensor &y,
                                             const paddle::Tensor &mean, const paddle::Tensor &variance, G grad_y,
                                             float epsilon) {
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
  std::vector<float> za_c(c), zb_c(c);  // the activation's input: x * za + zb
  for (int64_t k = 0; k < c; ++k) {
    za_c[k] = pw[k] / std::sqrt(pv[k] + epsilon);
    zb_c[k] = shift.data<float>()[k] - mean.data<float>()[k] * za_c[k];
  }
  const std::vector<float> wide_za = wide.repeat(za_c.data(), c), wide_zb = wide.repeat(zb_c.data(), c);
  const float *za = wide_za.data(), *zb = wide_zb.data();
  std::vector<double> sums = wide.fold(channel_sums(wide.rows, w, 2, [&](int64_t r, float *acc) {
    const T *v = px + r * w, *out = py + r * w;
    const auto g = grad_y.row(r * w);
#pragma omp simd
    for (int64_t k = 0; k < w; ++k) {
      const float gk = through<A>(g[k], load(out, k), load(v, k) * za[k] + zb[k]);
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
      const float gk = through<A>(g[k], load(out, k), load(v, k) * za[k] + zb[k]);
      store(dx, k, a[k] * (gk - mean_g[k] - (load(v, k) - m[k]) * k_x[k]));
    }
  }
  return {grad_x, grad_scale, grad_shift};
}

std::vector<paddle::Tensor> NormForward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                        const paddle::Tensor &shift, float epsilon, int act, bool nhwc) {
  PD_CHECK(x.is_cpu() && x.shape().size() == 4, "batch_norm_act: a 4-D CPU tensor expected");
  return with_act(act, [&](auto a) {
    constexpr int A = decltype(a)::value;
    return with_dtype(x.dtype(), "batch_norm_act", [&](auto tag) {
      using T = decltype(tag);
      if (nhwc) return NormForwardNHWC<T, A>(x, scale, shift, epsilon);
      PD_CHECK((std::is_same<T, float>::value), "batch_norm_act: bfloat16 runs on NHWC tensors");
      return NormForwardNCHW<A>(x, scale, shift, epsilon);
    });
  });
}

// running = running * momentum + batch * (1 - momentum), in float, as Paddle's kernel
// (phi/kernels/cpu/batch_norm_kernel.cc) updates its running mean and variance.
void update_running(const paddle::Tensor &running, const paddle::Tensor &batch, float momentum) {
  PD_CHECK(running.is_cpu() && running.dtype() == paddle::DataType::FLOAT32 && running.numel() == batch.numel(),
           "batch_norm_act: running statistics: one float32 CPU value per channel");
  float *r = const_cast<float *>(running.data<float>());
  const float *b = batch.data<float>();
  const float rest = float(1. - momentum);
  for (int64_t k = 0; k < batch.numel(); ++k) r[k] = r[k] * momentum + b[k] * rest;
}

std::vector<paddle::Tensor> NormForwardForked(const paddle::Tensor &x, const paddle::Tensor &scale,
                                              const paddle::Tensor &shift, const paddle::Tensor &running_mean,
                                              const paddle::Tensor &running_variance, float epsilon, float momentum,
                                              int act, bool nhwc) {
  std::vector<paddle::Tensor> out = NormForward(x, scale, shift, epsilon, act, nhwc);
  update_running(running_mean, out[1], momentum);
  update_running(running_variance, out[2], momentum);
  out.push_back(out[0]);  // Y2: the same tensor, for a second consumer
  return out;
}

std::vector<paddle::Tensor> NormBackward(const paddle::Tensor &x, const paddle::Tensor &scale,
                                         const paddle::Tensor &shift, const paddle::Tensor &y,
                                         const paddle::Tensor &mean, const paddle::Tensor &variance,
                                         const paddle::Tensor &grad_y, const paddle::Tensor &grad_y2, float epsilon,
                                         float /*momentum*/, int act, bool nhwc) {
  return with_act(act, [&](auto a) {
    constexpr int A = decltype(a)::value;
    if (!nhwc) {
      PD_CHECK(!grad_y2.initialized(), "batch_norm_act: a second consumer of Y (Y2) runs on NHWC only");
      return NormBackwardNCHW<A>(x, scale, shift, y, mean, variance, grad_y, epsilon);
    }
    return with_grad(grad_y, grad_y2, "batch_norm_act",
                     [&](auto g) { return NormBackwardNHWC<A>(x, scale, shift, y, mean, variance, g, epsilon); });
  });
}

std::vector<std::vector<int64_t>> NormInferShape(const std::vector<int64_t> &x, const std::vector<int64_t> &scale,
                                                 const std::vector<int64_t> &shift,
                                                 const std::vector<int64_t> &running_mean,
                                                 const std::vector<int64_t> &running_variance, float epsilon,
                                                 float momentum, int act, bool nhwc) {
  const int64_t c = nhwc ? x[3] : x[1];
  return {x, {c}, {c}, x};
}

std::vector<paddle::DataType> NormInferDtype(const paddle::DataType &x, const paddle::DataType &scale,
                                             const paddle::DataType &shift, const paddle::DataType &running_mean,
                                             const paddle::DataType &running_variance) {  // statistics: float32
  return {x, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32, x};
}

// Evaluation: y = act(x * a + b) with a = scale / sqrt(running variance + eps) and b =
// shift - running mean x a, per channel, NHWC, one pass over the rows on every thread
// (Paddle's kernel and its GELU after it run on one). Forward only: the kernel calls it
// where no gradient is recorded.
std::vector<paddle::Tensor> NormInfer(const paddle::Tensor &x, const paddle::Tensor &scale,
                                      const paddle::Tensor &shift, const paddle::Tensor &running_mean,
                                      const paddle::Tensor &running_variance, float epsilon, int act) {
  auto s = x.shape();
  PD_CHECK(x.is_cpu() && s.size() == 4, "batch_norm_act_infer: a 4-D NHWC CPU tensor expected");
  const int64_t c = s[3], rows = s[0] * s[1] * s[2];
  const Wide wide(rows, c);
  const int64_t w = wide.width;
  std::vector<float> a_c(c), b_c(c);
  for (int64_t k = 0; k < c; ++k) {
    a_c[k] = scale.data<float>()[k] / std::sqrt(running_variance.data<float>()[k] + epsilon);
    b_c[k] = shift.data<float>()[k] - running_mean.data<float>()[k] * a_c[k];
  }
  const std::vector<float> wide_a = wide.repeat(a_c.data(), c), wide_b = wide.repeat(b_c.data(), c);
  const float *a = wide_a.data(), *b = wide_b.data();
  paddle::Tensor y = paddle::empty(s, x.dtype(), paddle::CPUPlace());
  with_act(act, [&](auto tag_act) {
    constexpr int A = decltype(tag_act)::value;
    with_dtype(x.dtype(), "batch_norm_act_infer", [&](auto tag) {
      using T = decltype(tag);
      const T *px = data_of<T>(x);
      T *py = data_of<T>(y);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < wide.rows; ++r) {
#pragma omp simd
        for (int64_t k = 0; k < w; ++k) store(py + r * w, k, activate<A>(load(px + r * w, k) * a[k] + b[k]));
      }
    });
  });
  return {y};
}

PD_BUILD_OP(batch_norm_act_infer)
    .Inputs({"X", "Scale", "Shift", "RunningMean", "RunningVariance"})
    .Outputs({"Y"})
    .Attrs({"epsilon: float", "act: int"})
    .SetKernelFn(PD_KERNEL(NormInfer));

PD_BUILD_OP(batch_norm_act)
    .Inputs({"X", "Scale", "Shift", "RunningMean", "RunningVariance"})
    .Outputs({"Y", "Mean", "Variance", "Y2"})
    .Attrs({"epsilon: float", "momentum: float", "act: int", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(NormForwardForked))
    .SetInferShapeFn(PD_INFER_SHAPE(NormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(NormInferDtype));

PD_BUILD_GRAD_OP(batch_norm_act)
    .Inputs({"X", "Scale", "Shift", "Y", "Mean", "Variance", paddle::Grad("Y"), paddle::Grad("Y2")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Shift")})
    .Attrs({"epsilon: float", "momentum: float", "act: int", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(NormBackward));

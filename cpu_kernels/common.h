// What the loop operators share (batch_norm.cc, residual_join.cc, mean_pool.cc, max_pool.cc,
// bf16_cast.cc; the convolution, conv.cc, is oneDNN's): loads and stores of float32 or
// bfloat16 activations, the one dtype dispatch, and the gradient of a forked output.
//
// The loops are plain loops over NCHW planes or NHWC rows, shared out over the OpenMP
// threads oneDNN runs on inside Paddle (its libiomp5: cpu_kernels.build.openmp_link_flags),
// one pass per read of a tensor. Paddle's own CPU kernels for these run on one thread
// (relu_grad alone took 2.4 ms a call on ResNet-20's largest tensor).
//
// Forked outputs: batch_norm_relu, residual_join and max_pool return their output twice
// (the same memory). A block's input feeds its first convolution and its shortcut; given
// one output each, the two gradients come back to the operator's backward, which adds
// them in the pass it makes anyway. With one tensor used twice, Paddle would add them
// itself (TensorAdd: one thread, and for bfloat16 an element at a time: ~20 ms of a ~115
// ms ResNet-20 step). Unused, the second gradient arrives uninitialized and counts as zero.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace cpu_kernels {

using bf16 = paddle::bfloat16;

inline paddle::Tensor floats_like(const std::vector<int64_t> &shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

// bfloat16 activations: loaded as float, stored rounded to the nearest even (as oneDNN and
// PyTorch round). A NaN may come out as inf, which stops a run as surely (engine.check_finite).
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
template <typename T>
T *data_of(paddle::Tensor &t) { return t.data<T>(); }

// The dtype dispatch: f(T()) with T the element type of `dtype`, float (float32) or bf16
// (bfloat16); any other is an error that names the operator. f reads T as decltype(tag).
template <typename F>
auto with_dtype(paddle::DataType dtype, const char *op, F f) {
  if (dtype == paddle::DataType::BFLOAT16) return f(bf16());
  PD_CHECK(dtype == paddle::DataType::FLOAT32, op, ": float32 or bfloat16 activations only");
  return f(float());
}

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

// f(Grad<T, kTwo>{...}) with T the gradients' element type (with_dtype) and kTwo whether
// `second` holds a gradient.
template <typename F>
auto with_grad(const paddle::Tensor &first, const paddle::Tensor &second, const char *op, F f) {
  return with_dtype(first.dtype(), op, [&](auto tag) {
    using T = decltype(tag);
    if (second.initialized()) return f(Grad<T, true>{first.data<T>(), second.data<T>()});
    return f(Grad<T, false>{first.data<T>(), nullptr});
  });
}

inline float relu(float v) { return std::max(v, 0.f); }

// The activations after a BatchNorm (batch_norm.cc's act attribute).
enum Act : int { kNone = 0, kRelu = 1, kGelu = 2 };

// exp(x) for x <= 0, in float, written out so that a vector loop keeps it (a call to the
// library's expf, or std::floor without -ffast-math, stops GCC 12 from vectorising the
// loop: the GELU loops ran 15x slower): x = n ln2 + r with n = x / ln2 rounded to the
// nearest integer by adding and taking away 1.5 x 2^23 (exact for |n| < 2^22; the build
// has no -ffast-math, which could fold it), exp(r) by Cephes' expf polynomial, 2^n put
// into the exponent bits. Within 8e-8 relative of exp (1 ulp) over [-87, 0]; below -87 it
// returns ~2^-126, as good as 0 where it is used (the weight of a GELU's tail).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// GELU, the exact one (x times the normal CDF, Paddle's gelu with approximate=False and
// PyTorch's default), and its derivative. The CDF by Abramowitz and Stegun 7.1.26: erfc(z)
// = poly(t) exp(-z^2), t = 1 / (1 + 0.3275911 z), z = |x| / sqrt(2), absolute error under
// 1.5e-7 (under float32's rounding of the CDF near 1). Both sides of zero use erfc, so
// the far left tail keeps its relative precision instead of cancelling in 1 - erf.
struct Gelu {
  float cdf, pdf;  // of the standard normal at x
  explicit Gelu(float x) {
    const float z = std::fabs(x) * 0.70710678118654752f, t = 1.f / (1.f + 0.3275911f * z);
    const float e = exp_nonpositive(-z * z);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                       t * 1.061405429f))));
    const float half_erfc = 0.5f * poly * e;
    cdf = x >= 0.f ? 1.f - half_erfc : half_erfc;
    pdf = 0.39894228040143268f * e;
  }
};
inline float gelu(float x) { return x * Gelu(x).cdf; }
inline float gelu_grad(float x) {  // d/dx x Phi(x) = Phi(x) + x phi(x)
  const Gelu g(x);
  return g.cdf + x * g.pdf;
}

}  // namespace cpu_kernels

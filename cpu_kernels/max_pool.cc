#include <limits>

#include "common.h"

using namespace cpu_kernels;

// max_pool: a k x k max pool with stride s and padding p of NHWC activations (the ImageNet
// stem's 3x3/2 padding 1; the fast network's 2x2/2 and its final 3x3/3), as Paddle's
// kernel computes it (floor mode) (phi/kernels/funcs/pooling.cc, which runs on one thread and
// has no bfloat16): each window's max over its positions inside the image, and backward
// each output's gradient to the first position of its window, row by row, equal to that
// max. Images are shared out over the threads, so the backward's scatter never races; its
// sums (an input can win two overlapping windows) are made in float, rounded once. Its
// output twice, as the join's (Y2: the first block's convolution and its shortcut).
namespace {

struct Window {  // an NHWC image h x w of c channels, pooled by k x k windows at stride s, padding p, to oh x ow
  int64_t h, w, c, k, s, p, oh, ow;
  int64_t first(int64_t o) const { return std::max<int64_t>(o * s - p, 0); }
  int64_t end(int64_t o, int64_t size) const { return std::min<int64_t>(o * s - p + k, size); }
};

int64_t pooled(int64_t size, int k, int s, int p) { return (size + 2 * p - k) / s + 1; }

Window window_of(const std::vector<int64_t> &x, int k, int s, int p) {
  PD_CHECK(k >= 1 && s >= 1 && 0 <= p && p < k && x[1] + 2 * p >= k && x[2] + 2 * p >= k,
           "max_pool: the window must fit the padded image, with padding below the window");
  return Window{x[1], x[2], x[3], k, s, p, pooled(x[1], k, s, p), pooled(x[2], k, s, p)};
}

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

std::vector<paddle::Tensor> MaxPoolForward(const paddle::Tensor &x, int kernel, int stride, int padding) {
  auto s = x.shape();
  PD_CHECK(x.is_cpu() && s.size() == 4, "max_pool: a 4-D NHWC CPU tensor expected");
  const Window p = window_of(s, kernel, stride, padding);
  paddle::Tensor y = paddle::empty({s[0], p.oh, p.ow, s[3]}, x.dtype(), paddle::CPUPlace());
  with_dtype(x.dtype(), "max_pool", [&](auto tag) {
    using T = decltype(tag);
    max_pool_forward(data_of<T>(x), data_of<T>(y), s[0], p);
  });
  return {y, y};  // Y2: the same tensor, for a second consumer
}

std::vector<paddle::Tensor> MaxPoolBackward(const paddle::Tensor &x, const paddle::Tensor &y,
                                            const paddle::Tensor &grad_y, const paddle::Tensor &grad_y2, int kernel,
                                            int stride, int padding) {
  const Window p = window_of(x.shape(), kernel, stride, padding);
  paddle::Tensor grad_x = paddle::empty(x.shape(), x.dtype(), paddle::CPUPlace());
  with_grad(grad_y, grad_y2, "max_pool", [&](auto g) {
    using T = typename decltype(g)::type;
    max_pool_backward(data_of<T>(x), data_of<T>(y), g, data_of<T>(grad_x), x.shape()[0], p);
  });
  return {grad_x};
}

std::vector<std::vector<int64_t>> MaxPoolInferShape(const std::vector<int64_t> &x, int kernel, int stride,
                                                    int padding) {
  std::vector<int64_t> y = {x[0], pooled(x[1], kernel, stride, padding), pooled(x[2], kernel, stride, padding), x[3]};
  return {y, y};
}

std::vector<paddle::DataType> MaxPoolInferDtype(const paddle::DataType &x) { return {x, x}; }

PD_BUILD_OP(max_pool)
    .Inputs({"X"})
    .Outputs({"Y", "Y2"})
    .Attrs({"kernel: int", "stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(MaxPoolForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MaxPoolInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MaxPoolInferDtype));

PD_BUILD_GRAD_OP(max_pool)
    .Inputs({"X", "Y", paddle::Grad("Y"), paddle::Grad("Y2")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"kernel: int", "stride: int", "padding: int"})
    .SetKernelFn(PD_KERNEL(MaxPoolBackward));

// residual_join: relu(a + shortcut(b)) (relu=false: the sum alone) in one pass, forward and backward, where
// shortcut(b) is b itself (same shape) or the paper's option A (b subsampled by the
// stride, zero channels appended), read straight from the block input: no slice, no
// zeros, no concat (Paddle's strided-slice gradient took 9 ms a call, and add's backward
// copies its gradient twice). Its backward writes both gradients in the same pass. Its
// output twice (Out2: common.h, forked outputs).
#include <type_traits>

#include "common.h"

using namespace cpu_kernels;

namespace {

struct Join {
  int64_t n, c, h, w;      // a and the output: [n, c, h, w] (NCHW) or [n, h, w, c] (NHWC)
  int64_t cb, hb, wb;      // b, in the same layout; its cb <= c channels are added
  int64_t stride;
  bool nhwc, relu;
  bool identity() const { return stride == 1 && cb == c; }
  float out(float sum) const { return relu ? std::max(sum, 0.f) : sum; }  // -O3 takes the test out of the loops
  float grad(float y, float g) const { return !relu || y > 0.f ? g : 0.f; }
};

Join join_of(const paddle::Tensor &a, const std::vector<int64_t> &b, int stride, bool nhwc, bool relu) {
  PD_CHECK(a.is_cpu(), "residual_join: CPU tensors only");
  auto s = a.shape();
  PD_CHECK(s.size() == 4 && b.size() == 4 && b[0] == s[0], "residual_join: bad shapes");
  Join j = nhwc ? Join{s[0], s[3], s[1], s[2], b[3], b[1], b[2], stride, true, relu}
                : Join{s[0], s[1], s[2], s[3], b[1], b[2], b[3], stride, false, relu};
  PD_CHECK(j.cb <= j.c && (j.hb + stride - 1) / stride == j.h && (j.wb + stride - 1) / stride == j.w,
           "residual_join: b subsampled by the stride must match a");
  return j;
}

}  // namespace

// The identity join (any layout: one flat pass) and option A in NHWC (each output row of
// c channels reads b's row at (h * s, w * s)), for float32 or bfloat16 activations.
template <typename T>
void join_forward(const Join &j, const T *pa, const T *pb, T *po) {
  if (j.identity()) {
    const int64_t size = j.n * j.c * j.h * j.w;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < size; ++i) store(po, i, j.out(load(pa, i) + load(pb, i)));
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < j.n * j.h * j.w; ++row) {
    const int64_t n = row / (j.h * j.w), h = row / j.w % j.h, w = row % j.w;
    const T *x = pa + row * j.c, *s = pb + ((n * j.hb + h * j.stride) * j.wb + w * j.stride) * j.cb;
    T *y = po + row * j.c;
    for (int64_t k = 0; k < j.cb; ++k) store(y, k, j.out(load(x, k) + load(s, k)));
    for (int64_t k = j.cb; k < j.c; ++k) store(y, k, j.out(load(x, k)));  // the zero channels
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
        const float v = j.grad(load(po, i), g[i]);
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
      const float v = j.grad(load(y, k), g[k]);
      store(da, k, v);
      store(db, k, v);
    }
#pragma omp simd
    for (int64_t k = j.cb; k < j.c; ++k) store(da, k, j.grad(load(y, k), g[k]));  // the zero channels
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
      for (int64_t i = 0; i < plane; ++i) y[i] = j.out(x[i]);
    } else {
      for (int64_t r = 0; r < j.h; ++r)
        for (int64_t q = 0; q < j.w; ++q)
          y[r * j.w + q] = j.out(x[r * j.w + q] + s[r * j.stride * j.wb + q * j.stride]);
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
      for (int64_t i = 0; i < plane; ++i) da[i] = j.grad(y[i], g[i]);
    } else {
      float *db = gb + (n * j.cb + c) * plane_b;
      std::memset(db, 0, sizeof(float) * plane_b);  // the positions the subsample skipped
      for (int64_t r = 0; r < j.h; ++r)
        for (int64_t q = 0; q < j.w; ++q) {
          float v = j.grad(y[r * j.w + q], g[r * j.w + q]);
          da[r * j.w + q] = v;
          db[r * j.stride * j.wb + q * j.stride] = v;
        }
    }
  }
}

std::vector<paddle::Tensor> JoinForward(const paddle::Tensor &a, const paddle::Tensor &b, int stride, bool nhwc,
                                        bool relu) {
  Join j = join_of(a, b.shape(), stride, nhwc, relu);
  PD_CHECK(b.dtype() == a.dtype(), "residual_join: both inputs of one dtype");
  paddle::Tensor out = paddle::empty(a.shape(), a.dtype(), paddle::CPUPlace());
  with_dtype(a.dtype(), "residual_join", [&](auto tag) {
    using T = decltype(tag);
    if (nhwc || j.identity()) return join_forward(j, data_of<T>(a), data_of<T>(b), data_of<T>(out));
    PD_CHECK((std::is_same<T, float>::value), "residual_join: bfloat16 joins NHWC tensors");
    join_forward_nchw(j, a.data<float>(), b.data<float>(), out.data<float>());
  });
  return {out, out};  // Out2: the same tensor, for a second consumer
}

std::vector<paddle::Tensor> JoinBackward(const paddle::Tensor &b, const paddle::Tensor &out,
                                         const paddle::Tensor &grad_out, const paddle::Tensor &grad_out2,
                                         int stride, bool nhwc, bool relu) {
  Join j = join_of(out, b.shape(), stride, nhwc, relu);
  paddle::Tensor grad_a = paddle::empty(out.shape(), out.dtype(), paddle::CPUPlace());
  paddle::Tensor grad_b = paddle::empty(b.shape(), b.dtype(), paddle::CPUPlace());
  if (nhwc || j.identity()) {
    with_grad(grad_out, grad_out2, "residual_join", [&](auto g) {
      using T = typename decltype(g)::type;
      join_backward(j, data_of<T>(out), g, data_of<T>(grad_a), data_of<T>(grad_b));
    });
  } else {
    PD_CHECK(out.dtype() == paddle::DataType::FLOAT32, "residual_join: bfloat16 joins NHWC tensors");
    PD_CHECK(!grad_out2.initialized(), "residual_join: a second consumer of Out (Out2) runs on NHWC only");
    join_backward_nchw(j, out.data<float>(), grad_out.data<float>(), grad_a.data<float>(), grad_b.data<float>());
  }
  return {grad_a, grad_b};
}

std::vector<std::vector<int64_t>> JoinInferShape(const std::vector<int64_t> &a, const std::vector<int64_t> &b,
                                                 int stride, bool nhwc, bool relu) {
  return {a, a};
}

std::vector<paddle::DataType> JoinInferDtype(const paddle::DataType &a, const paddle::DataType &b) { return {a, a}; }

PD_BUILD_OP(residual_join)
    .Inputs({"A", "B"})
    .Outputs({"Out", "Out2"})
    .Attrs({"stride: int", "nhwc: bool", "relu: bool"})
    .SetKernelFn(PD_KERNEL(JoinForward))
    .SetInferShapeFn(PD_INFER_SHAPE(JoinInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(JoinInferDtype));

PD_BUILD_GRAD_OP(residual_join)
    .Inputs({"B", "Out", paddle::Grad("Out"), paddle::Grad("Out2")})
    .Outputs({paddle::Grad("A"), paddle::Grad("B")})
    .Attrs({"stride: int", "nhwc: bool", "relu: bool"})
    .SetKernelFn(PD_KERNEL(JoinBackward));

#include <type_traits>

#include "common.h"

using namespace cpu_kernels;

// bf16_cast: float32 to bfloat16 or bfloat16 to float32, and its gradient the other way,
// rounding to the nearest even wherever it narrows (common.h, store). Paddle's own CPU cast
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
  PD_CHECK(x.is_cpu(), "bf16_cast: a CPU tensor expected");
  paddle::Tensor y = paddle::empty(x.shape(), other_precision(x.dtype()), paddle::CPUPlace());
  with_dtype(x.dtype(), "bf16_cast", [&](auto tag) {
    using From = decltype(tag);
    using To = typename std::conditional<std::is_same<From, float>::value, bf16, float>::type;
    cast_values(data_of<From>(x), data_of<To>(y), x.numel());
  });
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

// A 2-D convolution for training on the CPU, on oneDNN primitives, as a Paddle custom
// operator: forward, and one backward that gives the input and the weight gradients.
//
// Covers what ResNets use: float32 or bfloat16 NCHW (or, with nhwc, NHWC) input, float32
// OIHW weights (converted to bfloat16 per call for a bfloat16 input; their gradient is
// float32 either way), square kernel, one stride
// and one padding for both axes, no bias, no dilation, groups 1. The Python side
// (cpu_kernels.covered, kernels.conv2d) checks that before calling and falls back to
// Paddle's conv2d otherwise. Tensors stay in Paddle's plain layouts between calls (the
// activations NHWC on the network's NHWC path, else NCHW; weights OIHW): each call
// reorders what oneDNN wants in another layout and back (README.md beside this file).
// Primitives are built once per shape and cached.
#include <mutex>
#include <unordered_map>
#include <vector>

// The headers (onednn-devel 3.2.0) are configured with the experimental sparse API,
// which Paddle's build of the library leaves out: undefine it so that no call needs it.
#include "oneapi/dnnl/dnnl_config.h"
#undef DNNL_EXPERIMENTAL_SPARSE
#include "oneapi/dnnl/dnnl.hpp"
#include "paddle/extension.h"

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dims = memory::dims;

dnnl::engine &cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream &cpu_stream() {
  static dnnl::stream stream(cpu_engine());
  return stream;
}

// One convolution shape: batch, in/out channels, input size, kernel, stride, padding.
struct Shape {
  int64_t n, c, h, w, k, r, stride, pad;
  bool nhwc;  // the activations' layout: NHWC tensors, or NCHW
  bool bf16;  // the activations (and their gradients) in bfloat16; weights and their gradients float32
  bool operator==(const Shape &o) const {
    return n == o.n && c == o.c && h == o.h && w == o.w && k == o.k && r == o.r &&
           stride == o.stride && pad == o.pad && nhwc == o.nhwc && bf16 == o.bf16;
  }
  memory::data_type act() const { return bf16 ? memory::data_type::bf16 : memory::data_type::f32; }
  Tag user() const { return nhwc ? Tag::nhwc : Tag::nchw; }
  // the primitives' activations: NHWC as they are (no reorder); for NCHW, oneDNN's choice
  Tag inside() const { return nhwc ? Tag::nhwc : Tag::any; }
  std::vector<int64_t> out_shape() const {
    return nhwc ? std::vector<int64_t>{n, out_h(), out_w(), k} : std::vector<int64_t>{n, k, out_h(), out_w()};
  }
  int64_t out_h() const { return (h + 2 * pad - r) / stride + 1; }
  int64_t out_w() const { return (w + 2 * pad - r) / stride + 1; }
  memory::desc src(Tag tag) const { return {{n, c, h, w}, act(), tag}; }
  memory::desc dst(Tag tag) const { return {{n, k, out_h(), out_w()}, act(), tag}; }
  // the parameter (and its gradient) as Paddle holds it: float32 OIHW
  memory::desc weights_user() const { return {{k, c, r, r}, memory::data_type::f32, Tag::oihw}; }
  // what the primitives read: the activations' type, oneDNN's layout (converted per call)
  memory::desc weights_inside() const { return {{k, c, r, r}, act(), Tag::any}; }
  memory::desc diff_weights_inside() const { return {{k, c, r, r}, memory::data_type::f32, Tag::any}; }
  Dims strides() const { return {stride, stride}; }
  Dims padding() const { return {pad, pad}; }
};

struct ShapeHash {
  size_t operator()(const Shape &s) const {
    size_t h = 0;
    for (int64_t v : {s.n, s.c, s.h, s.w, s.k, s.r, s.stride, s.pad, int64_t(s.nhwc), int64_t(s.bf16)})
      h = h * 1000003u + size_t(v);
    return h;
  }
};

// The primitives of one shape. The backward ones are made on the first backward call.
struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  bool has_backward = false;
  dnnl::convolution_backward_data::primitive_desc data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::mutex cache_mutex;

Primitives &primitives_for(const Shape &s, bool backward) {
  static std::unordered_map<Shape, Primitives, ShapeHash> cache;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(s);
  if (it == cache.end()) {
    Primitives p;
    p.fwd_pd = dnnl::convolution_forward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        s.src(s.inside()), s.weights_inside(), s.dst(s.inside()), s.strides(), s.padding(),
        s.padding(), user_scratchpad());
    p.fwd = dnnl::convolution_forward(p.fwd_pd);
    it = cache.emplace(s, std::move(p)).first;
  }
  Primitives &p = it->second;
  if (backward && !p.has_backward) {
    p.data_pd = dnnl::convolution_backward_data::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, s.src(s.inside()), s.weights_inside(),
        s.dst(s.inside()), s.strides(), s.padding(), s.padding(), p.fwd_pd, user_scratchpad());
    p.bwd_data = dnnl::convolution_backward_data(p.data_pd);
    p.weights_pd = dnnl::convolution_backward_weights::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, s.src(s.inside()), s.diff_weights_inside(),
        s.dst(s.inside()), s.strides(), s.padding(), s.padding(), p.fwd_pd, user_scratchpad());
    p.bwd_weights = dnnl::convolution_backward_weights(p.weights_pd);
    p.has_backward = true;
  }
  return p;
}

// Working memory from Paddle's CPU allocator (which keeps freed blocks for reuse), kept
// alive by `keep` until the call returns.
memory scratch(const memory::desc &desc, std::vector<paddle::Tensor> *keep) {
  int64_t floats = int64_t(desc.get_size() / sizeof(float)) + 1;
  keep->push_back(paddle::empty({floats}, paddle::DataType::FLOAT32, paddle::CPUPlace()));
  return memory(desc, cpu_engine(), keep->back().data<float>());
}

// `user` in the layout `want`: itself, or a reordered copy.
memory in_layout(const memory &user, const memory::desc &want, std::vector<paddle::Tensor> *keep) {
  if (user.get_desc() == want) return user;
  memory copy = scratch(want, keep);
  dnnl::reorder(user, copy).execute(cpu_stream(), const_cast<memory &>(user), copy);
  return copy;
}

// Where a primitive writes a result that must end up in `user`: `user` itself when the
// layouts agree, else a scratch buffer that `copy_back` reorders into `user`.
memory out_layout(const memory &user, const memory::desc &have, std::vector<paddle::Tensor> *keep) {
  return user.get_desc() == have ? user : scratch(have, keep);
}

void copy_back(memory &result, memory &user) {
  if (result.get_data_handle() != user.get_data_handle())
    dnnl::reorder(result, user).execute(cpu_stream(), result, user);
}

memory wrap(const memory::desc &desc, const paddle::Tensor &t) {
  void *data = t.dtype() == paddle::DataType::BFLOAT16
                   ? static_cast<void *>(const_cast<paddle::bfloat16 *>(t.data<paddle::bfloat16>()))
                   : static_cast<void *>(const_cast<float *>(t.data<float>()));
  return memory(desc, cpu_engine(), data);
}

Shape shape_of(const paddle::Tensor &x, const paddle::Tensor &w, int stride, int padding, bool nhwc) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "onednn_conv2d: CPU tensors only");
  PD_CHECK((x.dtype() == paddle::DataType::FLOAT32 || x.dtype() == paddle::DataType::BFLOAT16) &&
               w.dtype() == paddle::DataType::FLOAT32,
           "onednn_conv2d: float32 or bfloat16 input, float32 weights");
  auto xs = x.shape(), ws = w.shape();
  PD_CHECK(xs.size() == 4 && ws.size() == 4, "onednn_conv2d: 4-D input and weight expected");
  const int64_t c = nhwc ? xs[3] : xs[1], h = nhwc ? xs[1] : xs[2], w_ = nhwc ? xs[2] : xs[3];
  PD_CHECK(ws[1] == c && ws[2] == ws[3], "onednn_conv2d: weight must be [K, C, R, R]");
  PD_CHECK(stride >= 1 && padding >= 0, "onednn_conv2d: bad stride or padding");
  return Shape{xs[0], c, h, w_, ws[0], ws[2], stride, padding, nhwc, x.dtype() == paddle::DataType::BFLOAT16};
}

void execute(dnnl::primitive &prim, const memory::desc &scratchpad,
             std::unordered_map<int, memory> args, std::vector<paddle::Tensor> *keep) {
  args.insert({DNNL_ARG_SCRATCHPAD, scratch(scratchpad, keep)});
  prim.execute(cpu_stream(), args);
}

}  // namespace

std::vector<paddle::Tensor> ConvForward(const paddle::Tensor &x, const paddle::Tensor &weight,
                                        int stride, int padding, bool input_grad, bool nhwc) {
  Shape s = shape_of(x, weight, stride, padding, nhwc);
  Primitives &p = primitives_for(s, false);
  std::vector<paddle::Tensor> keep;
  paddle::Tensor out = paddle::empty(s.out_shape(), x.dtype(), paddle::CPUPlace());
  memory out_user = wrap(s.dst(s.user()), out);
  memory src = in_layout(wrap(s.src(s.user()), x), p.fwd_pd.src_desc(), &keep);
  memory wei = in_layout(wrap(s.weights_user(), weight), p.fwd_pd.weights_desc(), &keep);
  memory dst = out_layout(out_user, p.fwd_pd.dst_desc(), &keep);
  execute(p.fwd, p.fwd_pd.scratchpad_desc(),
          {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}}, &keep);
  copy_back(dst, out_user);
  cpu_stream().wait();
  return {out};
}

std::vector<paddle::Tensor> ConvBackward(const paddle::Tensor &x, const paddle::Tensor &weight,
                                         const paddle::Tensor &grad_out, int stride, int padding,
                                         bool input_grad, bool nhwc) {
  Shape s = shape_of(x, weight, stride, padding, nhwc);
  Primitives &p = primitives_for(s, true);
  std::vector<paddle::Tensor> keep;
  paddle::Tensor grad_x = paddle::empty(input_grad ? x.shape() : std::vector<int64_t>{1}, x.dtype(),
                                        paddle::CPUPlace());
  paddle::Tensor grad_w = paddle::empty(weight.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  memory gw_user = wrap(s.weights_user(), grad_w);
  memory gy_user = wrap(s.dst(s.user()), grad_out);

  // Input gradient: grad_x = conv_transpose(grad_out, weight), unless the input needs
  // none (the images entering the first layer): then it is a placeholder of one element.
  memory gy = in_layout(gy_user, p.data_pd.diff_dst_desc(), &keep);
  if (input_grad) {
    memory wei = in_layout(wrap(s.weights_user(), weight), p.data_pd.weights_desc(), &keep);
    memory gx_user = wrap(s.src(s.user()), grad_x);
    memory gx = out_layout(gx_user, p.data_pd.diff_src_desc(), &keep);
    execute(p.bwd_data, p.data_pd.scratchpad_desc(),
            {{DNNL_ARG_DIFF_DST, gy}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_SRC, gx}}, &keep);
    copy_back(gx, gx_user);
  }

  // Weight gradient: grad_w = correlation of x with grad_out. grad_out is reordered
  // once when both primitives want it in the same layout.
  memory gy_w = p.weights_pd.diff_dst_desc() == gy.get_desc()
                    ? gy
                    : in_layout(gy_user, p.weights_pd.diff_dst_desc(), &keep);
  memory src = in_layout(wrap(s.src(s.user()), x), p.weights_pd.src_desc(), &keep);
  memory gw = out_layout(gw_user, p.weights_pd.diff_weights_desc(), &keep);
  execute(p.bwd_weights, p.weights_pd.scratchpad_desc(),
          {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, gy_w}, {DNNL_ARG_DIFF_WEIGHTS, gw}}, &keep);
  copy_back(gw, gw_user);
  cpu_stream().wait();
  return {grad_x, grad_w};
}

std::vector<std::vector<int64_t>> ConvInferShape(const std::vector<int64_t> &x,
                                                 const std::vector<int64_t> &w, int stride,
                                                 int padding, bool input_grad, bool nhwc) {
  auto out = [&](int64_t size) { return size < 0 ? size : (size + 2 * padding - w[2]) / stride + 1; };
  if (nhwc) return {{x[0], out(x[1]), out(x[2]), w[0]}};
  return {{x[0], w[0], out(x[2]), out(x[3])}};
}

std::vector<paddle::DataType> ConvInferDtype(const paddle::DataType &x, const paddle::DataType &w) {
  return {x};
}

PD_BUILD_OP(onednn_conv2d)
    .Inputs({"X", "Weight"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int", "input_grad: bool", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(ConvForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ConvInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ConvInferDtype));

PD_BUILD_GRAD_OP(onednn_conv2d)
    .Inputs({"X", "Weight", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .Attrs({"stride: int", "padding: int", "input_grad: bool", "nhwc: bool"})
    .SetKernelFn(PD_KERNEL(ConvBackward));

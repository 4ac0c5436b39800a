"""The kernels' Python side: what a layer of models/layers.py runs once ``use_in`` gave it
one of these. Each is ``kernel(layer, x, ...)``; the ones of layers that can fork return
their output twice, (y, y2) (models/layers.py, forked outputs). Each runs our operator
on CPU tensors of float32 or bfloat16 (the activations; parameters float32), and
Paddle's ops otherwise (a model moved to a GPU, evaluation's BatchNorm, frozen statistics).
``nhwc``: the activations are [N, H, W, C], as use_in set them for the whole network.
"""
import paddle
import paddle.nn.functional as F

from models.layers import normalize

from . import build


def op():
    """The compiled operators (build.load() succeeded before use_in gave any kernel)."""
    return build.loaded["op"]


def on_cpu_fp32(*tensors):
    return all(t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors)


def on_cpu_ours(x, *params):
    """``x`` float32 or bfloat16 (the operators' activations) and ``params`` float32, all on the CPU."""
    return x.dtype in (paddle.float32, paddle.bfloat16) and x.place.is_cpu_place() and on_cpu_fp32(*params)


def dense(x):
    """``x`` in its own row-major memory: the operators read it so, and a 3.x view (a
    transpose) only has strides."""
    return x.contiguous() if hasattr(x, "is_contiguous") and not x.is_contiguous() else x


def data_format(nhwc):
    return "NHWC" if nhwc else "NCHW"


def conv2d(layer, x, nhwc):
    """A Conv2D (square kernel, one stride and padding, no bias, no groups: use_in checks)."""
    stride, padding = layer._stride[0], layer._updated_padding[0]
    if not on_cpu_ours(x, layer.weight):
        return F.conv2d(x, layer.weight, stride=stride, padding=padding, data_format=data_format(nhwc))
    x = dense(x)
    return op().onednn_conv2d(x, layer.weight, stride, padding, not x.stop_gradient, nhwc)


ACTS = {None: 0, "relu": 1, "gelu": 2}  # batch_norm.cc's act attribute


def batch_norm(layer, x, nhwc):
    """A BatchNormAct2D. In training the operator computes it with its activation and
    updates the running statistics as Paddle's kernel does (momentum on the biased batch
    variance, in place on the layer's own tensors, so names and checkpoints stay).
    Evaluation without gradients (NHWC) runs on the operator's inference pass; evaluation
    with them and frozen statistics (fine-tuning's last/head) on Paddle's kernel."""
    if not layer.training and nhwc and not paddle.is_grad_enabled() and on_cpu_ours(x, layer.weight):
        y = op().batch_norm_act_infer(dense(x), layer.weight, layer.bias, layer._mean, layer._variance,
                                      layer._epsilon, ACTS[layer.act])
        return y, y
    if not layer.training or layer._use_global_stats or len(x.shape) != 4 or not on_cpu_ours(x, layer.weight):
        y = paddle_batch_norm(layer, x, nhwc)
        return y, y
    y, _, _, y2 = op().batch_norm_act(dense(x), layer.weight, layer.bias, layer._mean, layer._variance,
                                      layer._epsilon, layer._momentum, ACTS[layer.act], nhwc)
    return y, y2


def paddle_batch_norm(layer, x, nhwc):
    """``layer`` (and its activation) on Paddle's kernel, which has no bfloat16 on the CPU:
    bf16 activations (frozen statistics in bf16 fine-tuning) go through it in fp32 and
    come back bf16, their gradient too."""
    bf16 = x.dtype == paddle.bfloat16
    y = layer.activation(normalize(layer, bf16_cast(x) if bf16 else x, data_format(nhwc)))
    return bf16_cast(y) if bf16 else y


def residual_join(layer, out, identity, nhwc):
    """A ResidualJoin: relu(out + shortcut), or the sum alone. The operator reads option A
    (the stride and the zero channels) straight from the block input."""
    relu = layer.act == "relu"
    if not (on_cpu_ours(out) and identity.dtype == out.dtype):
        if nhwc:  # option A is written for NCHW
            identity = layer.option_a(identity.transpose([0, 3, 1, 2])).transpose([0, 2, 3, 1])
        else:
            identity = layer.option_a(identity)
        y = out + identity
        y = F.relu(y) if relu else y
        return y, y
    return op().residual_join(out, identity, layer.stride, nhwc, relu)


def max_pool(layer, x, nhwc):
    """A MaxPool2D (square window, one stride and padding, floor mode: use_in checks). On
    NHWC CPU activations, the operator: Paddle's kernel runs on one thread and has no
    bfloat16 (a ResNet-18 step at 224x224, batch 32, spent 28% of its time in the stem's
    pool and the casts around it)."""
    k, s, p = pool_window(layer)
    if nhwc and on_cpu_ours(x) and len(x.shape) == 4:
        return op().max_pool(dense(x), k, s, p)
    y = F.max_pool2d(x, k, s, p, data_format=data_format(nhwc))
    return y, y


def pool_window(layer):
    """(kernel, stride, padding) of a square MaxPool2D, as ints."""
    def one(v):
        return v if isinstance(v, int) else v[0]
    return one(layer.ksize), one(layer.stride if layer.stride is not None else layer.ksize), one(layer.padding)


def global_max_pool(layer, x, nhwc):
    """The max over H and W: [N, C, 1, 1] float32 of the activations (float32 or bfloat16),
    on NHWC CPU ones by the operator with one window the size of the image."""
    n, c = x.shape[0], x.shape[3] if nhwc else x.shape[1]
    if nhwc and on_cpu_ours(x) and x.shape[1] == x.shape[2]:
        y = op().max_pool(dense(x), x.shape[1], x.shape[1], 0)[0]
        return (bf16_cast(y) if y.dtype == paddle.bfloat16 else y).reshape([n, c, 1, 1])
    return x.astype("float32").max(axis=[1, 2] if nhwc else [2, 3]).reshape([n, c, 1, 1])


def mean_pool(layer, x, nhwc):
    """The global average pool: [N, C, 1, 1] float32 of the activations (float32 or
    bfloat16), in one pass each way on NHWC CPU ones."""
    n, c = x.shape[0], x.shape[3] if nhwc else x.shape[1]
    if nhwc and on_cpu_ours(x):
        return op().mean_pool(x).reshape([n, c, 1, 1])
    return x.astype("float32").mean(axis=[1, 2] if nhwc else [2, 3]).reshape([n, c, 1, 1])


def entry(layer, x, nhwc, bf16, bf16_eval=False):
    """The image batch [N, 3, H, W] float32 in the network's layout, and in bf16 (from the
    first convolution on) in training, and in evaluation too with ``bf16_eval``."""
    if nhwc:
        x = x.transpose([0, 2, 3, 1])
    return bf16_cast(x) if bf16 and (layer.training or bf16_eval) else x


def bf16_cast(x):
    """``x`` (float32 or bfloat16) in the other precision, and its gradient back, rounded to
    the nearest even: on the CPU by the operator (Paddle 2.6's CPU cast truncates, 3.x's
    rounds), elsewhere by Paddle's cast."""
    if x.place.is_cpu_place() and build.loaded.get("op") is not None:
        return op().bf16_cast(dense(x))
    return x.astype("float32" if x.dtype == paddle.bfloat16 else "bfloat16")

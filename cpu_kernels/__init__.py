"""Our CPU kernels for training: the whole CPU training step of the networks of models/,
float32 or bfloat16, as Paddle custom operators on the oneDNN library Paddle ships.

    import cpu_kernels
    op, why_not = cpu_kernels.load()                 # compiled on first use, cached, self-checked
    cpu_kernels.use_in(model)                        # its layers now compute on them
    cpu_kernels.use_in(model, dtype="bfloat16")      # bf16 activations in training

The operators (one C++ file each, over common.h): the convolution (conv.cc, oneDNN's
primitives), BatchNorm with its ReLU (batch_norm.cc), the residual join with the paper's
option A inside (residual_join.cc), the stem's max pool and the global mean pool
(max_pool.cc, mean_pool.cc), and the bf16 cast (bf16_cast.cc). ``use_in`` gives each
layer of models/layers.py its kernel and the network its layout (NHWC from the input to
the pooled features) and training dtype, once; the layers' own forward does the rest,
and a layer without a kernel computes with Paddle's ops. Parameters, their names,
checkpoints and exports are untouched. Where the library cannot be built (no headers, no
compiler), ``load()`` says why in one line and training runs on Paddle's kernels.
build.py builds and checks the library; kernels.py is the kernels' Python side;
README.md beside this file has the build, the header match and the measurements.
"""
import functools

import paddle.nn as nn

from . import build, kernels
from .build import Unavailable, load

__all__ = ["Unavailable", "covered", "load", "use_in"]


def covered(layer):
    """Whether our convolution computes ``layer`` (a models.layers.Conv2D): a square kernel,
    one stride and one padding, no bias, no groups, no dilation, NCHW zero padding."""
    from models.layers import Conv2D
    if not isinstance(layer, Conv2D) or layer.bias is not None or layer._groups != 1:
        return False
    if layer._data_format != "NCHW" or layer._padding_mode != "zeros" or layer._padding_algorithm != "EXPLICIT":
        return False
    kernel, stride, padding = list(layer._kernel_size), list(layer._stride), list(layer._updated_padding)
    return (list(layer._dilation) == [1, 1] and kernel[0] == kernel[1] and len(set(stride)) == 1
            and len(set(padding)) == 1)


def pool_covered(layer):
    """Whether our max pool computes ``layer`` (a models.layers.MaxPool2D): a square window,
    one stride and one padding, floor mode, NCHW."""
    def square(v):
        return isinstance(v, int) or len(set(v)) == 1
    return (not layer.ceil_mode and not layer.return_mask and layer.data_format == "NCHW"
            and isinstance(layer.padding, (int, list, tuple)) and all(map(square, (layer.ksize, layer.padding)))
            and (layer.stride is None or square(layer.stride)))


def runs_nhwc(model, convs):
    """Whether ``model`` can run NHWC from its entry to its pooled features: a network of
    models/ (an entry, a pool and a classifier) whose convolutions and pools are all ours."""
    from models import layers
    pools = [layer for layer in model.sublayers() if isinstance(layer, layers.MaxPool2D)]
    return (isinstance(getattr(model, "entry", None), layers.InputCast) and hasattr(model, "shared_outputs")
            and model.with_pool and model.num_classes > 0 and all(covered(layer) for layer in convs)
            and all(pool_covered(layer) for layer in pools))


def use_in(model, dtype="float32", layout="nhwc", bf16_eval=False):
    """Give the layers of ``model`` (built from models/layers.py) their kernels on our
    operators (load() must have succeeded): every covered Conv2D, every BatchNormAct2D and
    ResidualJoin, and, for a network of models/ with its pool and classifier whose
    convolutions and pools are all covered, the entry, the pools and the NHWC layout
    (``layout="nchw"`` keeps NCHW, where oneDNN reorders every convolution's activations). ``dtype="bfloat16"`` (NHWC only)
    trains with bf16 activations and gradients between the operators; weights, their
    gradients, BN statistics and the classifier stay fp32, and evaluation runs in fp32,
    or with ``bf16_eval`` in bf16 as training does (the model in eval mode, without gradients).
    Returns how many layers took each kind of kernel, with the layout and dtype."""
    if not build.loaded.get("op"):
        raise RuntimeError("cpu_kernels.load() did not succeed: " + str(build.loaded.get("why_not")))
    from models import layers
    convs = [layer for layer in model.sublayers() if isinstance(layer, nn.Conv2D)]
    nhwc = layout == "nhwc" and runs_nhwc(model, convs)
    if dtype == "bfloat16" and not nhwc:
        raise ValueError("bfloat16 training runs on the NHWC path: a network of models/ with its pool and classifier")
    counts = dict(conv=0, norm=0, join=0, pool=0, layout="nhwc" if nhwc else "nchw", dtype=dtype)
    for layer in model.sublayers(include_self=True):
        kind, kernel = kernel_for(layer, nhwc, dtype == "bfloat16", layers, bf16_eval)
        if hasattr(layer, "kernel"):  # ours: set anew, so a second use_in leaves no earlier kernel behind
            layer.kernel = kernel
        if kernel is not None:
            counts[kind] = counts.get(kind, 0) + 1
        if hasattr(layer, "fork"):
            layer.fork = False
    if nhwc:  # outputs that feed two consumers (models/layers.py, forked outputs)
        for layer in model.shared_outputs():
            layer.fork = True
    return counts


def kernel_for(layer, nhwc, bf16, layers, bf16_eval=False):
    """(what it is, its kernel) for one layer of models/layers.py, or (None, None)."""
    bind = functools.partial
    if isinstance(layer, layers.Conv2D):
        return ("conv", bind(kernels.conv2d, nhwc=nhwc)) if covered(layer) else (None, None)
    if isinstance(layer, layers.BatchNormAct2D):
        return "norm", bind(kernels.batch_norm, nhwc=nhwc)
    if isinstance(layer, layers.ResidualJoin):
        return "join", bind(kernels.residual_join, nhwc=nhwc)
    if not nhwc:  # the entry and the pools keep Paddle's NCHW ops
        return None, None
    if isinstance(layer, layers.MaxPool2D):
        return "pool", bind(kernels.max_pool, nhwc=nhwc)
    if isinstance(layer, layers.GlobalAvgPool2D):
        return "pool", bind(kernels.mean_pool, nhwc=nhwc)
    if isinstance(layer, layers.GlobalMaxPool2D):
        return "pool", bind(kernels.global_max_pool, nhwc=nhwc)
    if isinstance(layer, layers.InputCast):
        return "entry", bind(kernels.entry, nhwc=nhwc, bf16=bf16, bf16_eval=bf16 and bf16_eval)
    return None, None

"""The layers the networks of models/ are built from, where the CPU path chooses the computation.

Each layer computes with Paddle's ops, as its Paddle parent does, until it is given a
``kernel``: ``cpu_kernels.use_in(model)`` gives one to each, once, for training on the
CPU on our operators (cpu_kernels/), and with it the layout (NHWC) and the training dtype
(bfloat16). Nothing else changes a layer: a Conv2D and a BatchNormAct2D are Paddle's
Conv2D and BatchNorm2D with Paddle's parameters and names, so checkpoints, exports and
paddle.vision's weights are the same whoever computes. A kernel is ``kernel(layer, x)``
(the join's ``kernel(layer, out, identity)``); the kernels of the layers that can fork
return their output twice, (y, y2).

Forked outputs: the output that feeds both a residual block's first convolution and its
shortcut comes from a layer with ``fork = True``, which returns it twice. Our kernels give
two tensors on one memory and add their two gradients inside the backward they already
run; Paddle would add them itself on one thread (~17% of a ResNet-20 bf16 step,
docs/speed.md). Paddle's ops give the same tensor twice. A block takes the pair apart
with ``block_inputs``.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


ACTIVATIONS = (None, "relu", "gelu")


def activate(y, act):
    """``y`` through ``act``: None, "relu" or "gelu" (the exact one, with erf)."""
    if act == "relu":
        return F.relu(y)
    if act == "gelu":
        return F.gelu(y)
    return y


def block_inputs(x):
    """(the input of a block's first convolution, the input of its shortcut): the two
    tensors of a forked output, or ``x`` twice."""
    return x if isinstance(x, tuple) else (x, x)


def forked(layer, y, y2):
    return (y, y2) if layer.fork else y


class Conv2D(nn.Conv2D):
    """Paddle's Conv2D; the CPU path may compute it on oneDNN (cpu_kernels.kernels.conv2d)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = None

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(self, x)
        return nn.Conv2D.forward(self, x)  # named: Paddle 2.6's to_static cannot compile a bare super()


class BatchNormAct2D(nn.BatchNorm2D):
    """BatchNorm2D, then its activation: ``act`` None, "relu" or "gelu" (the exact GELU,
    Paddle's default and PyTorch's), as timm's BatchNormAct2d.
    A BatchNorm2D subclass, so its parameters are Paddle's (``weight``, ``bias``, ``_mean``,
    ``_variance``) and a frozen one (``_use_global_stats``) stays frozen.
    x: [N, C, H, W] -> the same shape (NHWC [N, H, W, C] when the CPU path says so)."""

    def __init__(self, num_features, act=None, **kwargs):
        super().__init__(num_features, **kwargs)
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be None, 'relu' or 'gelu', got {act!r}")
        self.act, self.kernel, self.fork = act, None, False

    def forward(self, x):
        if self.kernel is not None:
            return forked(self, *self.kernel(self, x))
        y = self.activation(normalize(self, x, self._data_format))
        return forked(self, y, y)

    def activation(self, y):
        return activate(y, self.act)

    def extra_repr(self):
        return nn.BatchNorm2D.extra_repr(self) + (f", act={self.act}" if self.act else "")


def normalize(layer, x, data_format):
    """A BatchNorm2D ``layer`` of ``x`` on Paddle's kernel, its activation not applied: a
    frozen scale through shift_after_norm, anything else through BatchNorm2D's own forward,
    or F.batch_norm in another layout than the layer's (our kernels' NHWC fallback)."""
    if frozen_scale(layer):
        return shift_after_norm(layer, x, data_format)
    if data_format == layer._data_format:  # not F.batch_norm: Paddle 2.6's to_static then fails on
        return nn.BatchNorm2D.forward(layer, x)  # resnet20 ("not found in the scope", tests/test_speed.py)
    return F.batch_norm(x, layer._mean, layer._variance, layer.weight, layer.bias, training=layer.training,
                        momentum=layer._momentum, epsilon=layer._epsilon, data_format=data_format,
                        use_global_stats=layer._use_global_stats)


def frozen_scale(layer):
    """Whether ``layer``, a BatchNorm2D in training, trains its shift and not its scale (the
    fast network's). Evaluation and exports take Paddle's batch_norm as it is."""
    return layer.training and layer.weight.stop_gradient and not layer.bias.stop_gradient


def shift_after_norm(layer, x, data_format):
    """A BatchNorm2D ``layer`` in training whose scale is frozen, its scale and shift applied
    after Paddle's batch_norm of scale 1 and shift 0: given a scale that needs no gradient,
    Paddle's batch_norm gives the shift none either (its backward skips both; reproduced on
    3.3.1's CPU kernel). The 1 and 0 are float32 tensors, not None: the GPU kernel makes a
    missing one in the activations' dtype and reads it as float32
    (phi/kernels/gpu/batch_norm_kernel.cu)."""
    y = F.batch_norm(x, layer._mean, layer._variance, paddle.ones_like(layer.weight), paddle.zeros_like(layer.bias),
                     training=True, momentum=layer._momentum, epsilon=layer._epsilon, data_format=data_format,
                     use_global_stats=layer._use_global_stats)
    shape = [1, -1, 1, 1] if data_format == "NCHW" else [1, 1, 1, -1]
    return y * layer.weight.reshape(shape) + layer.bias.reshape(shape)


class ResidualJoin(nn.Layer):
    """relu(out + shortcut), where a residual block ends (``act=None``: the sum alone, as
    in Page's ResNet-9, whose residual branch ends in its own activation). With ``stride``
    > 1 or ``extra`` > 0 the shortcut is the paper's option A (section 4.2): the block
    input subsampled by the stride, with ``extra`` zero channels after its own; no
    parameters.
    out: [N, C, H, W], identity: [N, C - extra, H * stride, W * stride] -> [N, C, H, W]"""

    def __init__(self, stride=1, extra=0, act="relu"):
        super().__init__()
        if act not in (None, "relu"):
            raise ValueError(f"act must be None or 'relu', got {act!r}")
        self.stride, self.extra, self.act, self.kernel, self.fork = stride, extra, act, None, False

    def forward(self, out, identity):
        if self.kernel is not None:
            return forked(self, *self.kernel(self, out, identity))
        y = activate(out + self.option_a(identity), self.act)
        return forked(self, y, y)

    def option_a(self, x):
        """The option-A shortcut of ``x`` (NCHW): subsampled, zero channels appended."""
        if self.stride > 1:  # strided_slice: to_static (SOT) cannot parse a slice whose step it traces as a variable
            x = paddle.strided_slice(x, axes=[2, 3], starts=[0, 0], ends=x.shape[2:], strides=[self.stride] * 2)
        if self.extra:  # zero channels made from x itself: paddle.zeros_like warns when
            # exported and F.pad aborts Paddle Inference 3.3.1
            x = paddle.concat([x, x[:, :self.extra] * 0], axis=1)
        return x

    def extra_repr(self):
        return f"stride={self.stride}, extra={self.extra}, act={self.act}"


class MaxPool2D(nn.MaxPool2D):
    """Paddle's MaxPool2D (the ImageNet stem's 3x3/2, the fast network's 2x2/2); the CPU
    path may compute it on our operator, which has bf16 and more than one thread
    (cpu_kernels.kernels.max_pool)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel, self.fork = None, False

    def forward(self, x):
        if self.kernel is not None:
            return forked(self, *self.kernel(self, x))
        y = nn.MaxPool2D.forward(self, x)
        return forked(self, y, y)


class GlobalAvgPool2D(nn.AdaptiveAvgPool2D):
    """The mean over H and W: [N, C, H, W] -> [N, C, 1, 1] float32 (the CPU path's kernel
    takes NHWC float32 or bfloat16 activations and gives the same)."""

    def __init__(self):
        super().__init__((1, 1))
        self.kernel = None

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(self, x)
        return nn.AdaptiveAvgPool2D.forward(self, x)


class GlobalMaxPool2D(nn.AdaptiveMaxPool2D):
    """The max over H and W: [N, C, H, W] -> [N, C, 1, 1] float32 (the CPU path's kernel
    takes NHWC float32 or bfloat16 activations and gives the same)."""

    def __init__(self):
        super().__init__((1, 1))
        self.kernel = None

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(self, x)
        return nn.AdaptiveMaxPool2D.forward(self, x)


class InputCast(nn.Layer):
    """The image batch as the layers after it take it: unchanged [N, 3, H, W] float32 for
    Paddle's ops; in the CPU path's layout (NHWC), and in training in its dtype (bfloat16),
    once its kernel is set. No parameters."""

    def __init__(self):
        super().__init__()
        self.kernel = None

    def forward(self, x):
        if self.kernel is not None:
            return self.kernel(self, x)
        return x

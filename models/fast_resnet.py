"""The fast CIFAR network: airbench94's shape (Jordan 2024, arXiv:2404.00498) with an
identity shortcut over the second convolution of each group, for configs/fast94.yaml.

    whitening   2x2 conv 3 -> 24, padding 0, fixed to the whitening of 2x2 image patches
                (``init_whitening``), then BatchNorm + GELU          32x32 -> 31x31
    3 groups    conv3x3 -> max pool 2x2 -> BN + GELU -> conv3x3 -> BN + GELU, plus the
                group's pooled input (the shortcut)   31 -> 15 -> 7 -> 3; widths 64/256/256
    head        max over the 3x3 map, a linear layer without bias, x 1/9

What differs from airbench94, and why:
- the shortcut (``shortcut=True``): airbench96 adds them over the last convolutions of its
  groups; ``fast_plain`` is airbench94's own plain shape, for the comparison.
- the whitening layer's bias is a BatchNorm's shift (its scale frozen at 1, as all of
  them here): our convolution has no bias, and whitened patches already have unit variance.
- the exact GELU in every group (airbench's nn.GELU() is the exact one too).
- ``fast_resnet9`` (for the Muon recipe): a third conv inside the last group's shortcut,
  branches that start from PyTorch's default, the head at 1/13 (its factory says why);
  ``fast_plain9`` is it without its shortcuts, for the comparison.

Initialisation is PyTorch's default, which airbench's learning rates are tuned for:
weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Paddle's default is a normal 2.4x wider, and
behind BatchNorm a weight's scale sets its effective step), then each convolution's first
in_channels filters are the identity ("dirac", airbench's step 2). BatchNorm: scale 1 and
frozen, momentum 0.6 (PyTorch's 0.4), and Paddle's epsilon 1e-5, not airbench's 1e-12:
cuDNN takes nothing below 1e-5, and Paddle's GPU kernel logs an error on every call that
asks for less (phi/kernels/gpu/batch_norm_kernel.cu). The names follow models/resnet.py
(``conv1``, ``bn1``, ``fc``), so checkpoints, exports and the summary work the same.
x: [N, 3, 32, 32] float32 -> logits [N, num_classes]
"""
import math

import numpy as np
import paddle
import paddle.nn as nn

from .layers import BatchNormAct2D, Conv2D, GlobalMaxPool2D, InputCast, MaxPool2D, ResidualJoin, block_inputs


def frozen_scale_norm(channels):
    """BatchNorm + GELU with its scale fixed at 1: only its shift trains."""
    norm = BatchNormAct2D(channels, act="gelu", momentum=0.6)
    norm.weight.stop_gradient = True
    return norm


def init_like_pytorch(layer):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a Conv2D's or a Linear's weight."""
    weight = layer.weight
    fan_in = int(np.prod(weight.shape[1:])) if len(weight.shape) == 4 else weight.shape[0]
    bound = 1 / math.sqrt(fan_in)
    nn.initializer.Uniform(-bound, bound)(weight)


def conv3x3_uniform(in_channels, out_channels):
    """A 3x3 conv (padding 1, no bias) with PyTorch's default weights."""
    conv = Conv2D(in_channels, out_channels, 3, padding=1, bias_attr=False)
    init_like_pytorch(conv)
    return conv


def conv3x3_dirac(in_channels, out_channels):
    """A 3x3 conv (padding 1, no bias) whose first in_channels filters pass their input
    through unchanged (an identity "dirac" kernel), the others PyTorch's default."""
    conv = conv3x3_uniform(in_channels, out_channels)
    w = conv.weight.numpy()
    n = min(in_channels, out_channels)
    w[:n] = 0
    w[np.arange(n), np.arange(n), 1, 1] = 1
    conv.weight.set_value(w)
    return conv


class ConvGroup(nn.Layer):
    """conv3x3 -> max pool 2x2 -> BN + GELU -> conv3x3 -> BN + GELU, and with ``shortcut``
    the pooled activations added to the end (a residual block around the second conv).
    ``branch_convs=2`` puts one more conv3x3 -> BN + GELU (``conv3``, ``bn3``) inside the
    shortcut; ``dirac_branch=False`` starts the conv after the pool from PyTorch's default
    instead of the identity (the shortcut already carries the identity).
    x: [N, in_channels, H, W] -> [N, channels, H // 2, W // 2]"""

    def __init__(self, in_channels, channels, shortcut=True, branch_convs=1, dirac_branch=True):
        super().__init__()
        if branch_convs not in (1, 2):
            raise ValueError(f"branch_convs must be 1 or 2, got {branch_convs!r}")
        self.conv1 = conv3x3_dirac(in_channels, channels)
        self.pool = MaxPool2D(2)
        self.bn1 = frozen_scale_norm(channels)
        self.conv2 = conv3x3_dirac(channels, channels) if dirac_branch else conv3x3_uniform(channels, channels)
        self.bn2 = frozen_scale_norm(channels)
        if branch_convs == 2:
            self.conv3 = conv3x3_dirac(channels, channels)
            self.bn3 = frozen_scale_norm(channels)
        self.branch_convs = branch_convs
        # the sum alone: the branch ends in its own GELU (Page's ResNet-9 ends its blocks so)
        self.join = ResidualJoin(act=None) if shortcut else None

    def forward(self, x):
        x, identity = block_inputs(self.bn1(self.pool(self.conv1(x))))
        out = self.bn2(self.conv2(x))
        if self.branch_convs == 2:
            out = self.bn3(self.conv3(out))
        if self.join is None:  # a plain group
            return out
        return self.join(out, identity)


class FastResNet(nn.Layer):
    """The whitening layer, three ConvGroups, the max over the last map and a linear head
    (see the module's docstring). widths: the groups' channels; shortcut: identity
    shortcuts in the groups (False: airbench94's plain network); branch_convs: each
    group's convolutions inside its shortcut; dirac_branch: whether the first of them
    starts as the identity; scale: the head's.
    x: [N, 3, 32, 32] float32 -> logits [N, num_classes]"""
    whiten_size = 2  # the whitening layer's patches: 2x2, so 2 x (3 x 2 x 2) = 24 filters

    def __init__(self, num_classes=10, widths=(64, 256, 256), shortcut=True, scale=1 / 9, branch_convs=(1, 1, 1),
                 dirac_branch=True):
        super().__init__()
        self.num_classes, self.with_pool, self.scale = num_classes, True, scale
        whiten_width = 2 * 3 * self.whiten_size ** 2
        self.entry = InputCast()  # no parameters: the CPU path's layout and dtype, where it has set them
        self.conv1 = Conv2D(3, whiten_width, self.whiten_size, padding=0, bias_attr=False)
        self.conv1.weight.stop_gradient = True  # fixed: set from the training images by init_whitening
        self.bn1 = frozen_scale_norm(whiten_width)
        if len(branch_convs) != len(widths):
            raise ValueError(f"branch_convs needs one count per group: {len(widths)} widths, got {branch_convs!r}")
        channels = [whiten_width] + list(widths)
        self.groups = nn.LayerList([ConvGroup(a, b, shortcut, convs, dirac_branch)
                                    for a, b, convs in zip(channels, channels[1:], branch_convs)])
        self.stages = list(self.groups)  # as ResNet's: finetune.py --strategy last trains the last
        self.pool = GlobalMaxPool2D()
        self.fc = nn.Linear(widths[-1], num_classes, bias_attr=False)
        init_like_pytorch(self.fc)
        self.num_features = widths[-1]

    def init_whitening(self, images, eps=5e-4):
        """Set the first conv to whiten 2x2 patches: its filters are the eigenvectors of the
        patches' covariance (uncentred, as airbench) over ``images`` (float32 [N, 3, H, W],
        normalised), each divided by sqrt(its eigenvalue + eps), and their negatives."""
        k = self.whiten_size
        n, c, h, w = images.shape
        patches = np.stack([images[:, :, dy:h - k + 1 + dy, dx:w - k + 1 + dx]
                            for dy in range(k) for dx in range(k)], axis=-1)  # [n, c, h', w', k*k]
        patches = patches.transpose(0, 2, 3, 1, 4).reshape(-1, c * k * k)  # rows: (c, dy, dx), a filter's order
        covariance = (patches.T.astype(np.float64) @ patches) / len(patches)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors[:, ::-1] / np.sqrt(eigenvalues[::-1] + eps)).T.reshape(-1, c, k, k)
        self.conv1.weight.set_value(np.concatenate([filters, -filters]).astype(np.float32))

    def shared_outputs(self):
        """The layers whose output feeds two consumers (a group's second conv and its
        shortcut): cpu_kernels.use_in forks them (models/layers.py)."""
        return [group.bn1 for group in self.groups if group.join is not None]

    def forward_features(self, x):
        """x: [N, 3, 32, 32] -> the last group's map [N, widths[-1], 3, 3]."""
        x = self.bn1(self.conv1(self.entry(x)))
        for group in self.groups:
            x = group(x)
        return x

    def forward(self, x):
        x = self.pool(self.forward_features(x))
        return self.fc(paddle.flatten(x, 1)) * self.scale


def _fast(name, num_classes, stem, zero_init_residual, **kwargs):
    if stem != "cifar":
        raise ValueError(f"{name} is a CIFAR network: it has only its whitening stem; use stem 'cifar'")
    if zero_init_residual:
        raise ValueError(f"{name} starts its groups from identity (dirac) kernels, not from zero BN scales; "
                         "drop zero_init_residual")
    return FastResNet(num_classes, **kwargs)


def fast_resnet(num_classes=10, stem="cifar", zero_init_residual=False, **kwargs):
    """The fast CIFAR network with identity shortcuts (configs/fast94.yaml).

    >>> list(fast_resnet()(paddle.rand([1, 3, 32, 32])).shape)
    [1, 10]
    """
    return _fast("fast_resnet", num_classes, stem, zero_init_residual, **kwargs)


def fast_plain(num_classes=10, stem="cifar", zero_init_residual=False, **kwargs):
    """fast_resnet without its shortcuts: airbench94's plain network."""
    return _fast("fast_plain", num_classes, stem, zero_init_residual, shortcut=False, **kwargs)


# fast_resnet9's settings, which fast_plain9 shares
RESNET9 = dict(branch_convs=(1, 1, 2), dirac_branch=False, scale=1 / 13)


def fast_resnet9(num_classes=10, stem="cifar", zero_init_residual=False, **kwargs):
    """The residual network for the Muon recipe (configs/fast94_resnet9.yaml; its final
    runs are in docs/results.md): fast_resnet with a third convolution in its last
    group (inside the shortcut: 9 layers with weights, and 4.5% more multiply-adds), each
    group's branch starting from PyTorch's default instead of the identity (the shortcut
    already carries it), and the head at 1/13: its input starts 1.49x as large as
    fast_plain's (rms 2.92 against 1.96, seeds 0-2), and 9 x 1.49 = 13.4. On the
    45,000/5,000 split, seed 0, Muon for 8 epochs: val 93.26% (fast_resnet 92.46%, fast_plain 92.98%).

    >>> list(fast_resnet9()(paddle.rand([1, 3, 32, 32])).shape)
    [1, 10]
    """
    return _fast("fast_resnet9", num_classes, stem, zero_init_residual, **{**RESNET9, **kwargs})


def fast_plain9(num_classes=10, stem="cifar", zero_init_residual=False, **kwargs):
    """fast_resnet9 without its shortcuts, all else its own (the branches' start, the third
    conv, the head at 1/13): what the shortcuts buy configs/fast94_resnet9.yaml. Test set,
    seeds 0-2: 94.20% against fast_resnet9's 94.26% (docs/results.md)."""
    return _fast("fast_plain9", num_classes, stem, zero_init_residual, **{**RESNET9, "shortcut": False, **kwargs})


def fast_resnet_small(num_classes=10, stem="cifar", zero_init_residual=False, **kwargs):
    """fast_resnet with 128 channels in its last two groups, as airbench93's network: 46%
    of the multiply-adds, about 2x the speed on a CPU; the README's first run."""
    return _fast("fast_resnet_small", num_classes, stem, zero_init_residual, widths=(64, 128, 128), **kwargs)

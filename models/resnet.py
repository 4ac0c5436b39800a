"""ResNet layers, blocks and networks (He et al. 2015, arXiv:1512.03385).

Parameter names follow ``paddle.vision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``) so Paddle's pretrained
weights load unchanged.

Weight initialisation is Paddle's default, the same as paddle.vision's ResNet:
Conv2D weights ~ Normal(0, sqrt(2 / fan_in)) (He et al. 2015, arXiv:1502.01852,
the initialisation the ResNet paper uses), BatchNorm scale 1 and shift 0, Linear
weights Xavier-uniform and bias 0.
"""
import paddle
import paddle.nn as nn

from .layers import BatchNormAct2D, Conv2D, GlobalAvgPool2D, InputCast, MaxPool2D, ResidualJoin, block_inputs


class ConvBNLayer(nn.Sequential):
    """Conv2D (no bias: BN's shift replaces it) + BatchNorm2D with an optional ReLU.

    A Sequential, so its parameters are named ``0.weight`` (conv) and ``1.weight``,
    ``1._mean``, ... (BN): used as a projection shortcut it gives the names
    ``downsample.0`` / ``downsample.1`` that paddle.vision's weights use.
    x: [N, in_channels, H, W] -> [N, out_channels, H / stride, W / stride]
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, act=None):
        super().__init__(
            Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                   padding=(kernel_size - 1) // 2, groups=groups, bias_attr=False),
            BatchNormAct2D(out_channels, act=act))


def conv3x3(in_channels, out_channels, stride=1, groups=1):
    return Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias_attr=False)


def conv1x1(in_channels, out_channels):
    return Conv2D(in_channels, out_channels, 1, bias_attr=False)


def _shortcut(kind, in_channels, out_channels, stride):
    """(the projection shortcut or None, the join that ends the block or None).

    kind: "B" projection (1x1 conv + BN) where the shape changes, identity elsewhere
    (torchvision, paddle.vision); "A" zero padding inside the join (the paper's CIFAR
    nets); None: a plain network, no shortcut and no join.
    """
    if kind is None:
        return None, None
    if stride == 1 and in_channels == out_channels:
        return None, ResidualJoin()
    if kind == "B":
        return ConvBNLayer(in_channels, out_channels, 1, stride=stride), ResidualJoin()
    if kind == "A":
        if not in_channels <= out_channels <= 2 * in_channels:
            raise ValueError("option A pads at most in_channels zero channels")
        return None, ResidualJoin(stride, out_channels - in_channels)
    raise ValueError(f"shortcut must be 'A', 'B' or None, got {kind!r}")


class ResidualBlock(nn.Layer):
    """The basic block: two 3x3 convs, expansion 1.

    x: [N, in_channels, H, W] -> [N, channels, H / stride, W / stride]
    """
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, shortcut="B", groups=1, width_per_group=64):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("ResidualBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = BatchNormAct2D(channels, act="relu")
        self.conv2 = conv3x3(channels, channels)
        # a plain block (no shortcut) ends in BN + ReLU; a residual one in BN, then the join's ReLU
        self.bn2 = BatchNormAct2D(channels, act=None if shortcut else "relu")
        self.downsample, self.join = _shortcut(shortcut, in_channels, channels, stride)

    def zero_init_last(self):
        """Scale of the last BN to 0: the block starts as relu(shortcut(x))."""
        nn.initializer.Constant(0.0)(self.bn2.weight)

    def last_norm(self):
        return self.bn2

    def forward(self, x):
        x, identity = block_inputs(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        if self.join is None:  # a plain network
            return out
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.join(out, identity)


class BottleneckBlock(nn.Layer):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand x4).

    The stride sits on the 3x3 conv ("ResNet V1.5", as torchvision and paddle.vision;
    the paper puts it on the first 1x1). groups / width_per_group give ResNeXt and
    wide ResNets as in paddle.vision: inner width = channels * width_per_group / 64 * groups.
    x: [N, in_channels, H, W] -> [N, 4 * channels, H / stride, W / stride]
    """
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, shortcut="B", groups=1, width_per_group=64):
        super().__init__()
        width = int(channels * (width_per_group / 64.0)) * groups
        out_channels = channels * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = BatchNormAct2D(width, act="relu")
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = BatchNormAct2D(width, act="relu")
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = BatchNormAct2D(out_channels, act=None if shortcut else "relu")
        self.downsample, self.join = _shortcut(shortcut, in_channels, out_channels, stride)

    def zero_init_last(self):
        nn.initializer.Constant(0.0)(self.bn3.weight)

    def last_norm(self):
        return self.bn3

    def forward(self, x):
        x, identity = block_inputs(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.join is None:  # a plain network
            return out
        if self.downsample is not None:
            identity = self.downsample(identity)
        return self.join(out, identity)


BasicBlock = ResidualBlock  # torchvision's and paddle.vision's name


class ResNet(nn.Layer):
    """A stem, one stage per entry of ``layers`` (the first at stride 1, the others at
    stride 2), global average pooling and a linear classifier.

    block: ResidualBlock or BottleneckBlock. layers: blocks per stage, e.g. (2, 2, 2, 2).
    widths: channels of each stage before expansion; the stem has widths[0] channels.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
    shortcut: "B" (projection), "A" (zero padding) or None (plain network).
    with_pool=False / num_classes<=0 give a feature extractor (as paddle.vision).
    zero_init_residual: last BN scale of every block 0 (Goyal et al. 2017, arXiv:1706.02677).
    x: [N, 3, H, W] float32 -> logits [N, num_classes]
    (or features [N, C, 1, 1] without fc, [N, C, H/32, W/32] without pool either).
    """

    def __init__(self, block, layers, num_classes=1000, stem="imagenet",
                 widths=(64, 128, 256, 512), shortcut="B", with_pool=True,
                 groups=1, width_per_group=64, zero_init_residual=False):
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"one width per stage: layers={layers}, widths={widths}")
        self.num_classes = num_classes
        self.with_pool = with_pool
        self.stem = stem
        self.entry = InputCast()  # no parameters: the CPU path's layout and dtype, where it has set them
        if stem == "imagenet":
            self.conv1 = Conv2D(3, widths[0], 7, stride=2, padding=3, bias_attr=False)
            self.maxpool = MaxPool2D(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = conv3x3(3, widths[0])
            self.maxpool = None
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = BatchNormAct2D(widths[0], act="relu")

        in_channels = widths[0]
        self.stages = []
        for i, (num_blocks, channels) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_channels, channels, stride, shortcut=shortcut,
                                    groups=groups, width_per_group=width_per_group))
                in_channels = channels * block.expansion
            stage = nn.Sequential(*blocks)
            setattr(self, f"layer{i + 1}", stage)  # layer1 .. layer4, paddle.vision's names
            self.stages.append(stage)
        self.num_features = in_channels
        if with_pool:
            self.avgpool = GlobalAvgPool2D()
        if num_classes > 0:
            self.fc = nn.Linear(in_channels, num_classes)

        if zero_init_residual:
            if shortcut is None:
                raise ValueError("zero_init_residual needs shortcuts: a plain network would output zeros")
            for layer in self.sublayers():
                if isinstance(layer, (ResidualBlock, BottleneckBlock)):
                    layer.zero_init_last()

    def shared_outputs(self):
        """The layers whose output feeds two consumers, a residual block's first convolution
        and its shortcut: the stem's (its pool's, when it has one) and each block's before a
        residual block. cpu_kernels.use_in forks them (models/layers.py)."""
        blocks = [block for stage in self.stages for block in stage]
        outputs = [self.maxpool if self.maxpool is not None else self.bn1]
        outputs += [block.join if block.join is not None else block.last_norm() for block in blocks[:-1]]
        return [output for output, block in zip(outputs, blocks) if block.join is not None]

    def forward_features(self, x):
        """x: [N, 3, H, W] -> feature map of the last stage, before pooling."""
        x = self.bn1(self.conv1(self.entry(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x):
        x = self.forward_features(x)
        if self.with_pool:
            x = self.avgpool(x)
        if self.num_classes > 0:
            x = self.fc(paddle.flatten(x, 1))
        return x


# Model variants are data: (block, blocks per stage). Depths 18..152: Table 1 of the paper.
IMAGENET_LAYERS = {
    18: (ResidualBlock, (2, 2, 2, 2)),
    34: (ResidualBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
    101: (BottleneckBlock, (3, 4, 23, 3)),
    152: (BottleneckBlock, (3, 8, 36, 3)),
}


def _resnet(depth, num_classes=1000, stem="imagenet", **kwargs):
    block, layers = IMAGENET_LAYERS[depth]
    return ResNet(block, layers, num_classes=num_classes, stem=stem, **kwargs)


def _cifar_net(depth, shortcut, num_classes=10, stem="cifar", **kwargs):
    """The paper's CIFAR nets (section 4.2): 6n+2 layers, n blocks per stage, 16/32/64 filters.
    ``stem`` is accepted so that every factory takes it; these nets have only the CIFAR one."""
    if stem != "cifar":
        name = ("plain" if shortcut is None else "resnet") + str(depth)
        raise ValueError(f"{name} is the paper's CIFAR network: it has only the CIFAR stem; use stem 'cifar'")
    n = (depth - 2) // 6
    return ResNet(ResidualBlock, (n, n, n), num_classes=num_classes, stem="cifar",
                  widths=(16, 32, 64), shortcut=shortcut, **kwargs)


def resnet18(num_classes=1000, stem="imagenet", **kwargs):
    """ResNet-18. ``resnet18(num_classes=10, stem="cifar")`` for 32x32 images.

    >>> list(resnet18()(paddle.rand([1, 3, 224, 224])).shape)
    [1, 1000]
    """
    return _resnet(18, num_classes, stem, **kwargs)


def resnet34(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(34, num_classes, stem, **kwargs)


def resnet50(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(50, num_classes, stem, **kwargs)


def resnet101(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(101, num_classes, stem, **kwargs)


def resnet152(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(152, num_classes, stem, **kwargs)


def resnext50_32x4d(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(50, num_classes, stem, groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(num_classes=1000, stem="imagenet", **kwargs):
    return _resnet(50, num_classes, stem, width_per_group=128, **kwargs)


def resnet20(num_classes=10, stem="cifar", **kwargs):
    """The paper's ResNet-20 for CIFAR (option A shortcuts, 269,722 parameters)."""
    return _cifar_net(20, "A", num_classes, stem, **kwargs)


def resnet32(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(32, "A", num_classes, stem, **kwargs)


def resnet44(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(44, "A", num_classes, stem, **kwargs)


def resnet56(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(56, "A", num_classes, stem, **kwargs)


def resnet110(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(110, "A", num_classes, stem, **kwargs)


def plain20(num_classes=10, stem="cifar", **kwargs):
    """ResNet-20 without shortcuts: the paper's plain baseline (Fig. 6, left)."""
    return _cifar_net(20, None, num_classes, stem, **kwargs)


def plain32(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(32, None, num_classes, stem, **kwargs)


def plain44(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(44, None, num_classes, stem, **kwargs)


def plain56(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(56, None, num_classes, stem, **kwargs)


def plain110(num_classes=10, stem="cifar", **kwargs):
    return _cifar_net(110, None, num_classes, stem, **kwargs)

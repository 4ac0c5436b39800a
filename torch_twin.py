"""The networks of models/ written in PyTorch, for bench.py's comparison rows only.

PyTorch is never a dependency (``pip install torch==2.13.0`` for these rows).
torchvision does not install beside the CPU torch wheel here, and has neither the CIFAR
stem nor the paper's CIFAR nets, so the twin is written here, layer for layer as
models/resnet.py: the same convolutions, BatchNorms, shortcuts (option A zero padding
for the CIFAR nets, B projections for the others), pool and classifier.

    model = torch_twin.build("resnet20", "cifar", num_classes=10)
"""
import torch.nn as tnn
import torch.nn.functional as TF

# the fast networks, as models/fast_resnet.py's factories: (shortcut, widths, the
# convolutions inside each group's shortcut, the head's scale)
FAST = dict(fast_resnet=(True, (64, 256, 256), (1, 1, 1), 1 / 9), fast_plain=(False, (64, 256, 256), (1, 1, 1), 1 / 9),
            fast_resnet_small=(True, (64, 128, 128), (1, 1, 1), 1 / 9),
            fast_resnet9=(True, (64, 256, 256), (1, 1, 2), 1 / 13),
            fast_plain9=(False, (64, 256, 256), (1, 1, 2), 1 / 13))
# the networks written here: the ImageNet-family ResNets, the paper's CIFAR ones, the fast ones
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
          "resnet20", "resnet32", "resnet44", "resnet56", "resnet110") + tuple(FAST)


class Block(tnn.Module):
    expansion = 1

    def __init__(self, cin, c, stride, shortcut):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)
        self.shortcut, self.downsample, self.extra, self.stride = shortcut, None, c - cin, stride
        if shortcut == "B" and (stride != 1 or cin != c):
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, c, 1, stride, bias=False), tnn.BatchNorm2d(c))

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            x = self.downsample(x)
        elif self.shortcut == "A" and (self.stride != 1 or self.extra):
            x = x[:, :, ::self.stride, ::self.stride]
            x = TF.pad(x, (0, 0, 0, 0, 0, self.extra))
        return TF.relu(out + x)


class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin, c, stride, shortcut):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(cin, c, 1, bias=False), tnn.BatchNorm2d(c)
        self.conv2, self.bn2 = tnn.Conv2d(c, c, 3, stride, 1, bias=False), tnn.BatchNorm2d(c)
        self.conv3, self.bn3 = tnn.Conv2d(c, 4 * c, 1, bias=False), tnn.BatchNorm2d(4 * c)
        self.downsample = None
        if stride != 1 or cin != 4 * c:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, 4 * c, 1, stride, bias=False), tnn.BatchNorm2d(4 * c))

    def forward(self, x):
        out = TF.relu(self.bn1(self.conv1(x)))
        out = TF.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return TF.relu(out + (x if self.downsample is None else self.downsample(x)))


class Net(tnn.Module):
    def __init__(self, block, layers, widths, stem, shortcut, num_classes):
        super().__init__()
        k, s = (3, 1) if stem == "cifar" else (7, 2)
        self.conv1 = tnn.Conv2d(3, widths[0], k, s, k // 2, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0])
        self.maxpool = tnn.Identity() if stem == "cifar" else tnn.MaxPool2d(3, 2, 1)
        blocks, cin = [], widths[0]
        for i, (n, c) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(block(cin, c, 2 if i > 0 and j == 0 else 1, shortcut))
                cin = c * block.expansion
        self.blocks = tnn.Sequential(*blocks)
        self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(TF.relu(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        return self.fc(TF.adaptive_avg_pool2d(x, 1).flatten(1))


def frozen_scale_norm(c):
    """BatchNorm + (in forward) GELU, its scale fixed at 1 (models/fast_resnet.py)."""
    norm = tnn.BatchNorm2d(c, momentum=0.4)
    norm.weight.requires_grad = False
    return norm


class ConvGroup(tnn.Module):
    def __init__(self, cin, c, shortcut, branch_convs):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(cin, c, 3, 1, 1, bias=False), frozen_scale_norm(c)
        self.branch = tnn.ModuleList([tnn.Sequential(tnn.Conv2d(c, c, 3, 1, 1, bias=False), frozen_scale_norm(c))
                                      for _ in range(branch_convs)])
        self.shortcut = shortcut

    def forward(self, x):
        x = TF.gelu(self.bn1(TF.max_pool2d(self.conv1(x), 2)))
        out = x
        for conv_norm in self.branch:
            out = TF.gelu(conv_norm(out))
        return out + x if self.shortcut else out


class FastNet(tnn.Module):
    """models/fast_resnet.py's FastResNet: the whitening conv (frozen), three groups, the
    max over the last map, a linear head without bias, x scale."""

    def __init__(self, num_classes, shortcut, widths, branch_convs, scale):
        super().__init__()
        self.scale = scale
        self.conv1, self.bn1 = tnn.Conv2d(3, 24, 2, bias=False), frozen_scale_norm(24)
        self.conv1.weight.requires_grad = False
        channels = (24,) + widths
        self.groups = tnn.Sequential(*[ConvGroup(a, b, shortcut, convs)
                                       for a, b, convs in zip(channels, channels[1:], branch_convs)])
        self.fc = tnn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x):
        x = self.groups(TF.gelu(self.bn1(self.conv1(x))))
        return self.fc(TF.adaptive_max_pool2d(x, 1).flatten(1)) * self.scale


def build(name, stem, num_classes):
    """The twin of models.get_model(name, stem=stem, num_classes=num_classes)."""
    from models.resnet import IMAGENET_LAYERS
    if name not in MODELS:
        raise ValueError(f"no PyTorch twin of {name}; there is one of {', '.join(MODELS)}")
    if name in FAST:
        return FastNet(num_classes, *FAST[name])
    depth = int(name[len("resnet"):])
    if depth in IMAGENET_LAYERS:
        block, layers = IMAGENET_LAYERS[depth]
        return Net(Bottleneck if block.expansion == 4 else Block, layers, (64, 128, 256, 512), stem, "B", num_classes)
    n = (depth - 2) // 6
    return Net(Block, (n, n, n), (16, 32, 64), "cifar", "A", num_classes)

"""ResNet in Paddle: ``from models import resnet18, get_model``.

Importing this package changes nothing in the process; the CPU settings the scripts use
(threads, MKL's CPU type, malloc) are cpu_settings.py's, imported before Paddle.
"""
# Paddle 2.6 bundles a zlib that, loaded before Pillow's, breaks Pillow's PNG decoding and
# can crash the process (inflateReset2): Pillow first, whoever imports models first.
import PIL.Image  # noqa: F401
from .fast_resnet import ConvGroup, FastResNet, fast_plain, fast_plain9, fast_resnet, fast_resnet9, fast_resnet_small
from .layers import (BatchNormAct2D, Conv2D, GlobalAvgPool2D, GlobalMaxPool2D, InputCast, MaxPool2D, ResidualJoin,
                     block_inputs)
from .registry import CIFAR_ONLY, MODELS, get_model
from .resnet import (
    BasicBlock, BottleneckBlock, ConvBNLayer, ResidualBlock, ResNet, plain20, plain32, plain44, plain56, plain110, resnet18, resnet20, resnet32,
    resnet34, resnet44, resnet50, resnet56, resnet101, resnet110, resnet152,
    resnext50_32x4d, wide_resnet50_2)
from .weights import load_weights

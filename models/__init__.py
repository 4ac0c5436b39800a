"""ResNet in Paddle: ``from models import resnet18, get_model``."""
import os

# Paddle sets OMP_NUM_THREADS=1 when it is imported with the variable unset, which uses
# one core of the CPU; default to every core this process may use (a user's value wins).
# It only takes effect if paddle is not imported yet.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else str(os.cpu_count() or 1))

from .resnet import (  # noqa: E402
    MODELS, BasicBlock, BottleneckBlock, ConvBNLayer, ResidualBlock, ResNet, ZeroPadShortcut,
    get_model, plain20, plain32, plain44, plain56, plain110, resnet18, resnet20, resnet32,
    resnet34, resnet44, resnet50, resnet56, resnet101, resnet110, resnet152,
    resnext50_32x4d, wide_resnet50_2)
from .weights import load_weights  # noqa: E402

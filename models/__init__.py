"""ResNet in Paddle: ``from models import resnet18, get_model``."""
import os


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# CPU settings, read by Paddle's libraries when they load, so only effective if paddle is
# not imported yet; a value the user set always wins.
# - Paddle sets OMP_NUM_THREADS=1 when it is unset, using one core: use every core we may
#   (ResNet-18/CIFAR training on 2 cores: 23.7 img/s with 1 thread, 30.0 with 2).
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))
# - Paddle's bundled MKL takes a slow generic path on AMD processors; type 5 selects its
#   AVX2 kernels (ResNet-18/CIFAR training 7.1 -> 9.8 img/s here; Paddle issue #75760).
if _cpu_vendor() == "AuthenticAMD":
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

# Paddle 2.6 bundles a zlib that, when it loads before Pillow's, breaks Pillow's PNG
# decoding ("OSError: codec configuration error"): load Pillow first.
import PIL.Image  # noqa: E402,F401

from .resnet import (  # noqa: E402
    MODELS, BasicBlock, BottleneckBlock, ConvBNLayer, ResidualBlock, ResNet, ZeroPadShortcut,
    get_model, plain20, plain32, plain44, plain56, plain110, resnet18, resnet20, resnet32,
    resnet34, resnet44, resnet50, resnet56, resnet101, resnet110, resnet152,
    resnext50_32x4d, wide_resnet50_2)
from .weights import load_weights  # noqa: E402

"""Every network of models/ by its factory's name: ``get_model("resnet18", num_classes=10,
stem="cifar")``. Each factory takes ``num_classes`` and ``stem``."""
from . import resnet
from .fast_resnet import fast_plain, fast_plain9, fast_resnet, fast_resnet9, fast_resnet_small

MODELS = {f.__name__: f for f in (
    resnet.resnet18, resnet.resnet34, resnet.resnet50, resnet.resnet101, resnet.resnet152,
    resnet.resnext50_32x4d, resnet.wide_resnet50_2,
    resnet.resnet20, resnet.resnet32, resnet.resnet44, resnet.resnet56, resnet.resnet110,
    resnet.plain20, resnet.plain32, resnet.plain44, resnet.plain56, resnet.plain110,
    fast_resnet, fast_plain, fast_resnet_small, fast_resnet9, fast_plain9)}
# the networks that have the CIFAR stem only
CIFAR_ONLY = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain20", "plain32", "plain44", "plain56",
              "plain110", "fast_resnet", "fast_plain", "fast_resnet_small", "fast_resnet9", "fast_plain9")

# the networks whose BatchNorm scales are frozen (shift_after_norm in models/layers.py)
FROZEN_SCALE = ("fast_resnet", "fast_plain", "fast_resnet_small", "fast_resnet9", "fast_plain9")


def get_model(name, **kwargs):
    """Build a model by factory name: ``get_model("resnet18", num_classes=10, stem="cifar")``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)

"""Convert a torchvision ResNet state dict to Paddle's layout.

    python -m models.convert resnet50-0676ba61.pth resnet50.pdparams

torchvision and paddle.vision name ResNet's layers identically; the differences are
BN's running statistics (``running_mean`` -> ``_mean``, ``running_var`` ->
``_variance``), BN's ``num_batches_tracked`` (Paddle has none: dropped) and Linear
weights, stored [out, in] by PyTorch and [in, out] by Paddle (transposed).
Reading a .pth file needs PyTorch installed (``pip install torch``); converting an
in-memory dict of numpy arrays does not.
"""
import argparse
import sys

import numpy as np


def torchvision_to_paddle(state, linear_keys=("fc.weight",)):
    """{torchvision name: array} -> {paddle name: float32 array}."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value, dtype=np.float32)
        if key in linear_keys:
            value = value.T
        key = key.replace("running_mean", "_mean").replace("running_var", "_variance")
        out[key] = value
    return out


def read_torch_file(path):
    """A .pth file's state dict as numpy arrays (unwrapping {'state_dict': ...} / {'model': ...})."""
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"reading {path} needs PyTorch: pip install torch (CPU build is enough)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    prefix = "module."  # saved from DataParallel
    return {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().numpy() for k, v in obj.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a torchvision ResNet .pth to a Paddle .pdparams.")
    parser.add_argument("input", help="torchvision state dict (.pth)")
    parser.add_argument("output", help="Paddle weights to write (.pdparams)")
    args = parser.parse_args(argv)
    import paddle
    try:
        state = torchvision_to_paddle(read_torch_file(args.input))
    except (RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
    paddle.save(state, args.output)
    print(f"wrote {args.output}: {len(state)} tensors")


if __name__ == "__main__":
    main()

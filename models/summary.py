"""Per-layer table and totals: parameters, output shapes, multiply-accumulates.

    python -m models.summary resnet50 --input-size 224
    python -m models.summary resnet18 --stem cifar --num-classes 10 --input-size 32
    python -m models.summary vgg16 --input-size 224        # paddle.vision's VGG-16

We count MACs ourselves instead of calling ``paddle.flops``: on Paddle 3.3.1 with
numpy >= 2.4 it crashes on ResNet (``TypeError: only 0-dimensional arrays can be
converted to Python scalars``, from ``int()`` of a shape-[1] tensor), and where it
runs it also adds a bias term per output and 2 per BN element (ResNet-50 @224:
4,111,514,624 against 4,089,184,256 for conv + fc alone). Here MACs are the
multiply-accumulates of Conv2D and Linear layers only, for one image.
"""
import argparse
import sys

import numpy as np


def _macs(layer, output):
    import paddle.nn as nn
    if isinstance(layer, nn.Conv2D):
        kh, kw = layer.weight.shape[2:]
        in_per_group = layer.weight.shape[1]
        return int(np.prod(output.shape[1:])) * in_per_group * kh * kw
    if isinstance(layer, nn.Linear):
        in_f, out_f = layer.weight.shape
        return int(np.prod(output.shape[1:-1])) * in_f * out_f
    return 0


def summary(model, input_size=224, channels=3, print_fn=print):
    """Run one image of ``input_size`` through ``model`` and tabulate every leaf layer.

    Returns a dict: ``rows`` (name, type, weight shape, trainable params, output shape,
    MACs), ``trainable_params``, ``non_trainable_params``, ``macs``. Prints the table
    with ``print_fn`` unless it is None.
    """
    import paddle
    rows, hooks = [], []

    def hook_for(name):
        def hook(layer, inputs, output):
            weight = getattr(layer, "weight", None)
            own = [p for p in layer.parameters(include_sublayers=False) if not p.stop_gradient]
            rows.append(dict(
                name=name, type=type(layer).__name__,
                weight_shape=list(weight.shape) if weight is not None else [],
                params=sum(int(np.prod(p.shape)) for p in own),
                output_shape=list(output.shape), macs=_macs(layer, output)))
        return hook

    for name, layer in model.named_sublayers():
        if not layer.sublayers():  # leaves only: containers would count twice
            hooks.append(layer.register_forward_post_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros([1, channels, input_size, input_size]))
    finally:
        for h in hooks:
            h.remove()
        if was_training:
            model.train()

    params = model.parameters()
    result = dict(
        rows=rows,
        trainable_params=sum(int(np.prod(p.shape)) for p in params if not p.stop_gradient),
        non_trainable_params=sum(int(np.prod(p.shape)) for p in params if p.stop_gradient),
        macs=sum(r["macs"] for r in rows))
    if print_fn is not None:
        print_fn(format_table(result))
    return result


def format_table(result):
    header = f"{'Layer':<28} {'Type':<16} {'Weight shape':<18} {'Params':>11} {'Output shape':<20} {'MACs':>15}"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['name']:<28} {r['type']:<16} {str(r['weight_shape']):<18} {r['params']:>11,} "
                     f"{str(r['output_shape']):<20} {r['macs']:>15,}")
    lines += ["-" * len(header),
              f"Trainable params: {result['trainable_params']}",
              f"Non-trainable params: {result['non_trainable_params']} (BN running mean and variance, and any frozen weight)",
              f"MACs: {result['macs']}",
              f"MACs (G): {result['macs'] / 1e9:.3f}  (Conv2D + Linear, one image)"]
    return "\n".join(lines)


def build(name, num_classes=None, stem=None):
    """A model of ours by factory name, or ``vgg16``/``vgg19``... from paddle.vision."""
    import models
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if stem is not None:
        kwargs["stem"] = stem
    if name in models.MODELS:
        return models.get_model(name, **kwargs)
    import paddle.vision.models as pvm
    if name.startswith("vgg") and hasattr(pvm, name):
        kwargs.pop("stem", None)
        return getattr(pvm, name)(**kwargs)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(models.MODELS)}, vgg11, vgg13, vgg16, vgg19")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-layer table and totals: parameters, output shapes, "
                                     "multiply-accumulates.")  # not __doc__: python -OO strips it
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, as the scripts
    parser.add_argument("model", help="a factory name (resnet50, resnet20, plain56, ...) or vgg16")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default=None)
    args = parser.parse_args(argv)
    try:
        model = build(args.model, args.num_classes, args.stem)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    summary(model, args.input_size)


if __name__ == "__main__":
    main()

"""Fine-tune a ResNet on a folder of images, one sub-folder per class.

    python finetune.py --data-dir flowers/ --depth 34 --pretrained imagenet --strategy full
    python finetune.py --data-dir flowers/ --depth 18 --pretrained runs/cifar10/best.pdckpt --image-size 64
    python finetune.py --data-dir flowers/ --pretrained resnet34.pth --strategy head   # torchvision weights

Three fine-tuning strategies:
  full  load the weights and train every layer;
  last  freeze the stem and all stages but the last; train the last stage and a new classifier;
  head  freeze the whole backbone (a fixed feature extractor); train a new classifier only.
Frozen layers get no gradient and their BatchNorm statistics stay as loaded.
"""
import os

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import checkpoint
import config
import data
import engine
import errors
import models
import progress
from models.weights import WeightsMismatchError, pretrained_state

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}


def freeze(layer):
    """No gradient for ``layer``'s parameters; its BN layers normalise with the running
    statistics they were loaded with and stop updating them, in training mode too."""
    import paddle.nn as nn
    for p in layer.parameters():
        p.stop_gradient = True
    for sub in [layer] + layer.sublayers():
        if isinstance(sub, nn.layer.norm._BatchNormBase):
            sub._use_global_stats = True


def apply_strategy(model, strategy):
    """Freeze what ``strategy`` keeps fixed; returns the parameters left to train."""
    if strategy in ("last", "head"):
        freeze_all_but(model, [model.fc] + ([model.stages[-1]] if strategy == "last" else []))
    return [p for p in model.parameters() if not p.stop_gradient]


def freeze_all_but(layer, kept):
    """Freeze every sublayer of ``layer`` outside the ``kept`` ones; a container that holds
    one of them (the fast networks' ``groups``) is entered, not frozen whole."""
    for child in layer.children():
        if any(child is k for k in kept):
            continue
        if any(sub is k for sub in child.sublayers() for k in kept):
            freeze_all_but(child, kept)
        else:
            freeze(child)


def load_pretrained(model, cfg, num_classes):
    """Load cfg.pretrained into ``model``; the classifier is replaced when the class
    count differs, every other weight must load."""
    if cfg.pretrained == "none":
        return
    try:
        state = pretrained_state(cfg.pretrained, cfg.model)
        fc = state.get("fc.weight")
        same_head = fc is not None and list(fc.shape) == list(model.fc.weight.shape)
        keys = models.load_weights(model, state, skip_classifier=not same_head)
    except (ValueError, WeightsMismatchError) as e:
        raise errors.UserError(str(e))
    progress.log(f"loaded {len(keys)} tensors from {cfg.pretrained}"
               + ("" if same_head else f"; new {num_classes}-class classifier"))


def main(argv=None):
    parser = errors.ArgumentParser(description="Fine-tune a ResNet on an image folder.")
    config.add_run_arguments(parser, config.FinetuneConfig, DEPTHS)
    args = parser.parse_args(argv)
    with errors.user_errors():
        cfg, resume_state = config.run_config(args, config.FinetuneConfig, DEPTHS.get(args.depth),
                                              checkpoint.load_run(args.resume))
        if resume_state is None and cfg.pretrained.endswith(".pdckpt") and os.path.isfile(cfg.pretrained):
            # a checkpoint of ours: its architecture (a CIFAR stem, say) decides the model
            source = config.from_checkpoint(checkpoint.load(cfg.pretrained))
            cfg = config.make_config(dict(model=source.model, stem=checkpoint.stem_of(source)), base=cfg)
        loaded = data.load(cfg)
        classes = loaded.classes
        import paddle
        import device as devices
        # the device first: a model built before it would put its weights on GPU 0 of a GPU
        # build even with --device cpu (GPU audit 2, N1); fit chooses the same one again
        devices.select_device(cfg.device)
        paddle.seed(cfg.seed)  # the new classifier's initial weights
        model = checkpoint.build_model(cfg, len(classes))
        if resume_state is None:
            load_pretrained(model, cfg, len(classes))
        parameters = apply_strategy(model, cfg.strategy)
        learnable = [p for k, p in model.named_parameters() if not k.endswith(("_mean", "_variance"))]
        progress.log(f"strategy {cfg.strategy}: {sum(p.size for p in parameters):,} of "
                   f"{sum(p.size for p in learnable):,} parameters trainable; classes: {', '.join(classes)}")
        return engine.fit(cfg, loaded, resume_state=resume_state, model=model, parameters=parameters)


if __name__ == "__main__":
    main()

"""Loading weights that never skips silently.

Paddle's ``Layer.set_state_dict`` only warns about missing or unexpected keys and
shape mismatches; a fine-tuning run then trains from a half-random model without
anyone noticing. ``load_weights`` makes every mismatch an error that lists it.
"""
import numpy as np


class WeightsMismatchError(ValueError):
    pass


def classifier_keys(model):
    """State-dict keys of the final classifier (``fc.weight``, ``fc.bias``)."""
    return [k for k in model.state_dict() if k.startswith("fc.")]


def load_weights(model, state_dict, skip_classifier=False):
    """Load ``state_dict`` (name -> array or tensor) into ``model``, strictly.

    skip_classifier=True leaves ``fc.*`` out on both sides (the model keeps its own,
    freshly initialised classifier): the fine-tuning case. Any other missing key,
    unexpected key or shape mismatch raises WeightsMismatchError listing all of them.
    Returns the list of keys loaded.
    """
    own = model.state_dict()
    skip = set(classifier_keys(model)) if skip_classifier else set()
    if skip_classifier:
        skip |= {k for k in state_dict if k.startswith("fc.")}
    missing = sorted(k for k in own if k not in state_dict and k not in skip)
    unexpected = sorted(k for k in state_dict if k not in own and k not in skip)
    misshapen = sorted(k for k in own if k in state_dict and k not in skip
                       and list(own[k].shape) != list(np.shape(state_dict[k])))
    wrong_shape = [f"{k}: model {list(own[k].shape)}, weights {list(np.shape(state_dict[k]))}" for k in misshapen]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if wrong_shape:
        problems.append(f"wrong shape {len(wrong_shape)}: {'; '.join(wrong_shape[:10])}{' ...' if len(wrong_shape) > 10 else ''}")
    if problems:
        raise WeightsMismatchError("weights do not fit the model: " + " | ".join(problems)
                                   + mismatch_hint(own, state_dict, missing + unexpected + misshapen, skip_classifier))
    keys = [k for k in own if k not in skip]
    for k in keys:  # set_value, not set_state_dict: that one warns about the skipped fc
        own[k].set_value(state_dict[k])
    return keys


STEMS = {7: "imagenet", 3: "cifar"}  # the first convolution's kernel size -> the stem= it belongs to


def mismatch_hint(own, state_dict, bad_keys, skip_classifier):
    """What to do about a mismatch: build the model with the weights' stem when the first
    convolutions differ; pass skip_classifier=True when only the classifier does."""
    theirs, ours = state_dict.get("conv1.weight"), own.get("conv1.weight")
    if theirs is not None and ours is not None and list(np.shape(theirs)) != list(ours.shape):
        k_theirs, k_ours = np.shape(theirs)[-1], ours.shape[-1]
        stem = STEMS.get(k_theirs)
        build = f": build the model with stem=\"{stem}\"" if stem else ""
        return f" (the weights have a {k_theirs}x{k_theirs} stem and the model a {k_ours}x{k_ours} one{build})"
    if not skip_classifier and all(k.startswith("fc.") for k in bad_keys):
        return " (fine-tuning to other classes? pass skip_classifier=True)"
    return ""


def pretrained_state(source, arch):
    """A state dict for ``arch`` from ``source``:

    'imagenet'      Paddle's official ImageNet weights (paddle.vision's own URLs and md5s),
                    downloaded once to ~/.cache/paddle/hapi/weights;
    '*.pdparams'    Paddle weights saved with paddle.save(model.state_dict());
    '*.pth'/'*.pt'  a torchvision state dict, converted (models/convert.py);
    '*.pdckpt'      a checkpoint of ours (its model weights).
    Raises ValueError with one line when it cannot be had.
    """
    import os
    import paddle
    if source == "imagenet":
        from paddle.utils.download import get_weights_path_from_url
        from paddle.vision.models.resnet import model_urls
        if arch not in model_urls:
            raise ValueError(f"Paddle publishes no ImageNet weights for {arch}; available: {', '.join(model_urls)}")
        url, md5 = model_urls[arch]
        try:
            path = get_weights_path_from_url(url, md5)
        except Exception as e:
            raise ValueError(f"could not download {url} ({type(e).__name__}); with no network, "
                             f"download it elsewhere and pass --pretrained PATH/{os.path.basename(url)}")
        return paddle.load(path)
    if not os.path.isfile(source):
        raise ValueError(f"--pretrained {source}: no such file (or use 'imagenet' or 'none')")
    if source.endswith((".pth", ".pt")):
        from .convert import read_torch_file, torchvision_to_paddle
        try:
            return torchvision_to_paddle(read_torch_file(source))
        except RuntimeError as e:
            raise ValueError(str(e))
    try:
        state = paddle.load(source)
    except Exception as e:
        raise ValueError(f"--pretrained {source} could not be read ({type(e).__name__}); truncated or not Paddle weights")
    if isinstance(state, dict) and "model" in state and "config" in state:
        state = state["model"]  # a checkpoint of ours
    return state

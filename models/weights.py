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
    wrong_shape = sorted(
        f"{k}: model {list(own[k].shape)}, weights {list(np.shape(state_dict[k]))}"
        for k in own if k in state_dict and k not in skip
        and list(own[k].shape) != list(np.shape(state_dict[k])))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if wrong_shape:
        problems.append(f"wrong shape {len(wrong_shape)}: {'; '.join(wrong_shape[:10])}{' ...' if len(wrong_shape) > 10 else ''}")
    if problems:
        hint = "" if skip_classifier else " (fine-tuning to other classes? pass skip_classifier=True)"
        raise WeightsMismatchError("weights do not fit the model: " + " | ".join(problems) + hint)
    keys = [k for k in own if k not in skip]
    for k in keys:  # set_value, not set_state_dict: that one warns about the skipped fc
        own[k].set_value(state_dict[k])
    return keys

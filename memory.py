"""Whether a training step fits in this machine's memory, said before the first step.

Out of memory on a CPU, Linux does not fail an allocation: it kills the process (the
shell says "Killed"; a notebook says its kernel died), with no word of which setting to
change. So before training we count the activations a step keeps for its backward pass
(the outputs of every layer, from one image through the network: models.summary) and
compare them with the memory free:

- the activations alone above the free memory and swap: the step cannot fit, one error;
- twice them above the free memory: a warning. Measured on the CPU (the peak RSS of short
  runs, Paddle 3.3.1), a step takes 1.7-2.1x its activations in fp32 (ResNet-20 at batch 128,
  ResNet-18 at 32-128, fast_resnet9 at 500-2000 and, on 224x224 images, at 64) and 2.5x them
  in bf16 (fast_resnet9 at 2000): "about", not to the last GiB.
"""
import numpy as np

from errors import UserError

GIB = 2 ** 30
STEP_OVER_ACTIVATIONS = 2  # what a step takes, about, for each byte of activations (see above)


def free_bytes(meminfo="/proc/meminfo"):
    """(memory available, swap free) in bytes, or None where /proc/meminfo is not (not Linux)."""
    try:
        with open(meminfo) as f:
            kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:2]}
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in kib:
        return None
    return kib["MemAvailable"] * 1024, kib.get("SwapFree", 0) * 1024


def activations_per_image(model, image_size):
    """The number of values the layers of ``model`` output for one image of ``image_size``."""
    from models.summary import summary
    rows = summary(model, image_size, print_fn=None)["rows"]
    return sum(int(np.prod(row["output_shape"][1:])) for row in rows)


def check_step_fits(model, name, batch, image_size, bytes_per_value, free=None):
    """Raise a UserError if a training step of ``batch`` images cannot fit in the memory
    free; return a warning line if it may not, else None. ``free``: free_bytes()'s pair."""
    free = free if free is not None else free_bytes()
    if free is None:
        return None
    available, swap = free
    per_image = activations_per_image(model, image_size) * bytes_per_value
    activations = per_image * batch
    fits = max(1, int(available / (STEP_OVER_ACTIVATIONS * per_image)))
    what = f"{name} on batches of {batch} {image_size}x{image_size} images"
    if activations > available + swap:
        raise UserError(f"a training step of {what} keeps {activations / GIB:.1f} GiB of activations, and "
                        f"{(available + swap) / GIB:.1f} GiB are free: it cannot fit; try --batch-size {fits}"
                        + (" or a smaller --image-size" if image_size > 32 else ""))
    if STEP_OVER_ACTIVATIONS * activations > available:
        return (f"warning: a training step of {what} takes about {STEP_OVER_ACTIVATIONS * activations / GIB:.1f} "
                f"GiB, and {available / GIB:.1f} GiB are free: the system may kill the run; --batch-size {fits} fits")
    return None

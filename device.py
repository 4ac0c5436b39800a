"""Which device a run uses: the GPU when this Paddle has a usable one, else the CPU."""
import paddle

from config import UserError


def has_gpu():
    """True when this Paddle is a CUDA build and sees at least one GPU."""
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def select_device(name):
    """'auto' (GPU when this Paddle has one), 'cpu' or 'gpu' -> the device now set."""
    gpu = has_gpu()
    if name == "gpu" and not gpu:
        raise UserError("--device gpu: this Paddle has no usable GPU (CPU build or no CUDA device); "
                        "use --device cpu, or install a GPU build of Paddle (see README, GPU)")
    device = "gpu" if name == "gpu" or (name == "auto" and gpu) else "cpu"
    paddle.set_device(device)
    return device


def describe(device):
    """The device by name, for a result's evidence: the GPU's, or the CPU model and cores."""
    if device == "gpu":
        return paddle.device.cuda.get_device_name()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or 'CPU'} ({cores} cores)"

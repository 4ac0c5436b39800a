"""Which device a run uses, and whether the GPU and the options asked for can work on it.

Everything GPU-specific is decided here, before training starts, from plain facts
(``gpu_facts()``: Paddle's version and build, each GPU's compute capability), so a
combination that cannot work is refused at once, and the decisions are tested on a CPU
with the facts injected. Sources are Paddle's own (2.6 and 3.x), cited where used.
"""
import os
import shutil

import paddle

from cpu_settings import cpu_info
from errors import UserError
from models.registry import FROZEN_SCALE

# Paddle's auto_cast and decorate turn themselves off, with only a warning, below these
# compute capabilities, and the run trains in fp32 (python/paddle/amp/auto_cast.py).
MIN_CAPABILITY = {"float16": (7, 0), "bfloat16": (8, 0)}
# PyPI's newest GPU wheel (2.6.2, CUDA 11.8) has code for these and no PTX (its libphi.so; docs/gpu.md)
PYPI_26_ARCHS = (61, 70, 75, 80, 86)
NEW_PADDLE = ("install a Paddle 3.x GPU build for CUDA 12 from Paddle's own package index "
              "(README, GPU set-up), then run python check_env.py")


def has_gpu():
    """True when this Paddle is a CUDA build and sees at least one GPU."""
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def select_device(name):
    """'auto' (GPU when this Paddle has one), 'cpu' or 'gpu' -> the device now set.
    A GPU that this Paddle cannot run (no kernels for it) is an error here, with the fix,
    instead of a CUDA error inside the first epoch."""
    gpu = has_gpu()
    if name == "gpu" and not gpu:
        raise UserError("--device gpu: this Paddle has no usable GPU (CPU build or no CUDA device); "
                        "use --device cpu, or install a GPU build of Paddle (README, GPU set-up)")
    device = "gpu" if name == "gpu" or (name == "auto" and gpu) else "cpu"
    paddle.set_device(device)
    if device == "gpu":
        problem = gpu_problem(gpu_facts(probe=True))
        if problem:
            raise UserError(problem)
    return device


def check_device(name):
    """select_device's answer and checks, with Paddle's own place left as it was: for
    paddle.inference, which places its work itself (GPU audit 2, N8)."""
    before = paddle.get_device()
    try:
        return select_device(name)
    finally:
        paddle.set_device(before)


# ------------------------------------------------------------------------- facts
def gpu_facts(probe=False):
    """What this Paddle and this machine offer, as plain data. ``probe``: run one tiny
    convolution on GPU 0 and record the error, for Paddle builds that cannot list the
    architectures they carry (2.6 has no paddle.version.cuda_archs)."""
    facts = dict(paddle=paddle.__version__, cuda_build=paddle.is_compiled_with_cuda(),
                 cuda=paddle.version.cuda(), cudnn=paddle.version.cudnn(), cuda_archs=None, gpus=[],
                 probed=False, conv_error=None, shm_mb=None, cpu_threads=os.environ.get("OMP_NUM_THREADS"))
    if hasattr(paddle.version, "cuda_archs"):  # 3.x
        facts["cuda_archs"] = list(paddle.version.cuda_archs() or []) or None
    if os.path.isdir("/dev/shm"):
        facts["shm_mb"] = shutil.disk_usage("/dev/shm").total // 2 ** 20
    if facts["cuda_build"]:
        for i in range(paddle.device.cuda.device_count()):
            p = paddle.device.cuda.get_device_properties(i)
            facts["gpus"].append(dict(name=p.name, capability=(p.major, p.minor), memory_mb=p.total_memory // 2 ** 20))
    if probe and facts["gpus"]:
        facts["conv_error"], facts["probed"] = probe_conv(), True
    return facts


def probe_conv():
    """None when a 3x3 convolution runs on the current GPU and gets it right, else what
    went wrong: the error's first line, or the wrong sum (a kernel that runs and computes
    garbage is no better than one that does not run)."""
    try:
        x = paddle.ones([1, 3, 8, 8])
        total = paddle.nn.functional.conv2d(x, paddle.ones([4, 3, 3, 3])).sum().item()
    except Exception as e:  # "no kernel image is available for execution on the device"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    expected = 4 * 6 * 6 * 27  # 4 output maps of 6x6, each value the sum of 3x3x3 ones
    return None if total == expected else f"a test convolution of ones summed to {total:g}, not {expected}"


def capability(facts, device="gpu:0"):
    """The compute capability (major, minor) of ``device`` ('gpu:N', what paddle.get_device()
    says; under launch each rank has its own), or None without a GPU."""
    index = int(device.partition(":")[2] or 0)
    return tuple(facts["gpus"][index]["capability"]) if len(facts["gpus"]) > index else None


def amp_dtypes(cap):
    """The AMP dtypes that really run at compute capability ``cap``."""
    return [d for d, need in MIN_CAPABILITY.items() if cap is not None and tuple(cap) >= need]


def gpu_problem(facts):
    """One line saying why the GPU cannot be used, and the fix; None when it can (or
    when this is a CPU build, which is not a problem: training runs on the CPU)."""
    if not facts["cuda_build"]:
        return None
    if not facts["gpus"]:
        return ("this is a GPU build of Paddle but it sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES), "
                "or install the CPU build: pip install paddlepaddle")
    archs = facts["cuda_archs"] or (list(PYPI_26_ARCHS) if facts["paddle"].startswith("2.6") else None)
    for i, gpu in enumerate(facts["gpus"]):
        sm = gpu["capability"][0] * 10 + gpu["capability"][1]
        # GPU code for sm_XY runs on sm_XZ, Z >= Y; a probe (a real convolution) overrules the list
        covered = archs is None or any(a // 10 == sm // 10 and a <= sm for a in archs)
        failed = facts["conv_error"] if facts.get("probed") else (not covered and f"built for sm_{'/'.join(map(str, archs))}")
        if failed and (i == 0 or not covered):
            return f"GPU {i} ({gpu['name']}, sm_{sm}) cannot run this Paddle {facts['paddle']} ({failed}); {fix_for(facts, failed)}"
    return None


MISSING_LIBRARY = ("cudnn", "libcu", "dynload", "shared object", "dlopen", "cannot open", "load library")


def fix_for(facts, failure):
    """The fix for a GPU this Paddle cannot run: the system CUDA/cuDNN libraries when the
    probe failed loading one (2.6.2 needs them installed), else a Paddle built for it."""
    if any(word in str(failure).lower() for word in MISSING_LIBRARY):
        return (f"install the CUDA {facts['cuda']} and cuDNN {facts['cudnn']} libraries this Paddle was built "
                "against (README, GPU set-up), then run python check_env.py")
    return NEW_PADDLE


# -------------------------------------------------------------- training options
def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo), empty where there is none."""
    return cpu_info("flags").split()


def cpu_bf16_units(flags):
    """Which units would run bf16 training on a CPU with ``flags``: "AMX" (amx_bf16, Intel
    Sapphire Rapids and later), "AVX512-BF16" (avx512_bf16 alone, e.g. AMD Zen 4), or None."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


# Intel's avx512_bf16 without AMX (Cooper Lake, or a later Xeon whose hypervisor hides AMX;
# measured on the latter): its bf16 dot product, vdpbf16ps (32 multiply-adds an
# instruction), gave half the multiply-adds a second of fp32's FMA (16 an instruction) on
# an Intel Xeon of model 207, 41 against 82 G a core (docs/peak_rate.c), and our bf16
# training steps ran at 0.71x (ResNet-20, batch 128) to 0.85x (fast_resnet9, batch 2000)
# the fp32 ones (docs/speed.md); on AMD's Zen 4 (avx512_bf16, no AMX) they run 1.5x the
# fp32 ones (ResNet-20).
SLOW_BF16 = ("bf16 trains slower than fp32 here: this Intel CPU has avx512_bf16 without AMX, whose bf16 "
             "multiply-adds run at half fp32's rate (bench.py --compare ours+onednn,ours+bf16 measures it)")


def bf16_slower_than_fp32(flags, vendor):
    """Whether bf16 training on a CPU with ``flags`` from ``vendor`` (/proc/cpuinfo's vendor_id)
    is expected to run slower than fp32 (SLOW_BF16 says why)."""
    return cpu_bf16_units(flags) == "AVX512-BF16" and vendor == "GenuineIntel"


# oneDNN ISAs below AVX512_CORE, where its bf16 convolutions do not run: a bf16 step under
# ONEDNN_MAX_CPU_ISA=AVX2 ends in an uncaught dnnl::error and SIGABRT (AVX512_CORE trains)
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def onednn_isa_limit(environ=None):
    """(variable, value) of the oneDNN ISA limit the environment sets, or None."""
    environ = os.environ if environ is None else environ
    return next(((name, environ[name]) for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if environ.get(name)),
                None)


def cpu_amp_plan(cfg, flags, isa_limit=None):
    """``--amp`` on the CPU: bf16 O1 on our CPU kernels (cpu_kernels/), where the CPU has bf16
    units (Paddle's own CPU kernels have no bf16 training path). Returns the units."""
    if cfg.amp_dtype != "bfloat16":
        raise UserError("--amp-dtype float16 needs a GPU; a CPU trains in bf16 where it has bf16 units: "
                        "--amp --amp-dtype bfloat16, or drop --amp")
    units = cpu_bf16_units(flags)
    if units is None:
        raise UserError("--amp --amp-dtype bfloat16 on the CPU needs bf16 units: this CPU's flags have neither "
                        "amx_bf16 nor avx512_bf16; drop --amp")
    if isa_limit is not None and isa_limit[1].upper() in NO_BF16_ISAS:
        name, value = isa_limit
        raise UserError(f"--amp --amp-dtype bfloat16 needs oneDNN's AVX512 code, and {name}={value} keeps it from "
                        f"it: unset {name} (or set AVX512_CORE or above), or drop --amp")
    if cfg.amp_level != "O1":
        raise UserError("--amp-level O2 is for GPUs; on the CPU bf16 runs as O1 (fp32 weights, bf16 compute): "
                        "drop --amp-level O2")
    if cfg.cpu_kernels != "ours" or cfg.to_static:
        raise UserError("bf16 on the CPU runs on our CPU kernels (cpu_kernels/): drop --cpu-kernels paddle and "
                        "--to-static")
    return units


def training_plan(cfg, paddle_version, device, cap=None, world=1, flags=(), isa_limit=None, vendor=""):
    """The settings a training run will really use on ``device`` (compute capability
    ``cap`` for a GPU, CPU ``flags`` and ``vendor``, oneDNN's ``isa_limit``: onednn_isa_limit()), or
    UserError for a combination that cannot work. Pure: the facts come in as arguments,
    so every combination is tested anywhere."""
    major = int(paddle_version.split(".")[0])  # a develop build says 0.0.0: treat it as new
    if cfg.to_static and major == 2 and cfg.model in FROZEN_SCALE:
        # 2.6's dy2static loses a parameter used after batch_norm ("not found in the scope"); 3.3.1 compiles it
        raise UserError(f"--to-static cannot compile {cfg.model}'s frozen-scale BatchNorm on Paddle 2.6: "
                        "drop --to-static, or use Paddle 3.x")
    if cfg.amp and device != "gpu":
        units = cpu_amp_plan(cfg, flags, isa_limit)
        return dict(amp=True, amp_dtype="bfloat16", amp_level="O1", loss_scaling=False, fp32_eval_copy=False,
                    cudnn_deterministic=False, cpu_bf16=units, cpu_bf16_slower=bf16_slower_than_fp32(flags, vendor))
    if cfg.amp:
        need = MIN_CAPABILITY[cfg.amp_dtype]
        if cap is not None and tuple(cap) < need:
            other = amp_dtypes(cap)
            raise UserError(f"--amp-dtype {cfg.amp_dtype} needs compute capability {need[0]}.{need[1]}, this GPU has "
                            f"{cap[0]}.{cap[1]}: Paddle would silently train in fp32; "
                            + (f"use --amp-dtype {other[0]}" if other else "drop --amp"))
        if cfg.amp_dtype == "bfloat16" and cfg.to_static and major == 2:
            # 2.6's dy2static casts its AMP programs to fp16 whatever the dtype (GPU audit #6)
            raise UserError("--to-static with --amp-dtype bfloat16 trains in fp16 without loss scaling on Paddle 2.6; "
                            "use --amp-dtype float16, or drop --to-static, or use Paddle 3.x")
        if cfg.amp_dtype == "bfloat16" and cfg.amp_level == "O2" and cfg.optimizer == "sgd":
            # Paddle's GPU momentum kernel is registered for float, double and float16 only (GPU audit #7)
            raise UserError("--amp-level O2 with --amp-dtype bfloat16 has no momentum (SGD) kernel in Paddle; "
                            "use --amp-level O1, or --optimizer adam")
    if cfg.sync_bn and world > 1 and device != "gpu":
        raise UserError("--sync-bn needs GPUs: Paddle has no CPU kernel for SyncBatchNorm; drop --sync-bn")
    return dict(amp=cfg.amp, amp_dtype=cfg.amp_dtype, amp_level=cfg.amp_level,
                loss_scaling=cfg.amp and cfg.amp_dtype == "float16",  # bf16 has fp32's range: no scaler
                fp32_eval_copy=cfg.amp and cfg.amp_level == "O2",
                cudnn_deterministic=device == "gpu" and cfg.deterministic, cpu_bf16=None, cpu_bf16_slower=False)


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or 'CPU'} ({cores} cores)"

"""The process-wide CPU settings: threads, OpenMP's wait, MKL's CPU type, glibc's malloc.

    import cpu_settings  # noqa: F401  (first: before anything imports paddle)

The ordering rule: these are read by Paddle's libraries (MKL, oneDNN, the OpenMP runtime,
malloc) when they load, so this module must be imported before ``paddle`` is, and every
script of this project imports it first. Imported after Paddle it changes only what it
still can (the thread count, through the OpenMP runtimes), and says nothing. A value the
user set in the environment always wins. Importing ``models`` changes nothing: a
notebook that wants these settings imports this module first, as the scripts do.
"""
import os
import sys


def cpu_info(field, path="/proc/cpuinfo"):
    """A field of the first processor in /proc/cpuinfo ("flags", "vendor_id"), "" where there is none."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


# CPU settings, read by Paddle's libraries when they load, so only effective if paddle is
# not imported yet; a value the user set always wins.
# - Paddle sets OMP_NUM_THREADS=1 when it is unset, using one core: use every core we may
#   (ResNet-18/CIFAR training on 2 cores: 23.7 img/s with 1 thread, 30.0 with 2). Paddle's
#   import prints "WARNING: OMP_NUM_THREADS set to 2, not 1 ... PLEASE USE OMP_NUM_THREADS
#   WISELY" for any value above 1 (paddle/base/__init__.py, __bootstrap__): it imports
#   with 1, and the OpenMP runtimes get the count right after (use_threads, below).
def _threads():
    """OMP_NUM_THREADS as the user set it (a whole number), else every core we may use,
    shared out between the ranks a launch runs on this machine (PADDLE_LOCAL_SIZE, set by
    paddle.distributed.launch): two ranks on two cores take one each, not two each."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = os.environ.get("PADDLE_LOCAL_SIZE", "")
        return max(cores // int(local), 1) if local.isdigit() and int(local) > 0 else cores
    if not value.isdigit() or int(value) < 1:
        sys.exit(f"error: OMP_NUM_THREADS={value} is not a number of threads: set it to a whole number such as 2, "
                 "or unset it")
    return int(value)


# - An address-space limit (ulimit -v) too small for Paddle's libraries: Paddle 3.3.1 fails
#   to load under 1,000,000 KB (an ImportError), cannot start its threads under 1,200,000
#   and trains ResNet-20 under 1,300,000: below 1.5 GiB, one line instead of those.
MIN_ADDRESS_SPACE = 3 << 29


def _check_address_space():
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        sys.exit(f"error: the address-space limit (ulimit -v) is {soft >> 20} MB; Paddle needs about 1.5 GB of "
                 "addresses to load and train: raise it (ulimit -v unlimited)")


# - python -OO strips docstrings, and Paddle 2.x builds some of its own from them at import
#   (paddle/tensor/layer_function_generator.py, templatedoc): a TypeError traceback there.
def _check_docstrings():
    if sys.flags.optimize < 2:
        return
    from importlib import metadata
    for name in ("paddlepaddle", "paddlepaddle-gpu"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if version.startswith("2."):
            sys.exit(f"error: Paddle {version} cannot be imported under python -OO (it builds its docstrings "
                     "at import): run without -OO, or use Paddle 3.x")


if "paddle" not in sys.modules:
    _check_address_space()
    _check_docstrings()
THREADS = _threads()
if "paddle" not in sys.modules:
    os.environ["OMP_NUM_THREADS"] = "1"
# - One OpenMP thread team, and its idle workers spin 20 ms before they sleep. Inside
#   Paddle, oneDNN's parallel regions bind to Paddle's libiomp5 (not the libgomp it names),
#   and cpu_kernels/ links the same runtime (cpu_kernels.build.openmp_link_flags): one worker
#   beside the main thread. Sleeping at once (blocktime 0), every parallel region waits
#   for a worker to wake (~40 us on these VMs, some 250 regions a step); spinning for 20 ms
#   bridges the gaps between regions (ResNet-20 training, AMD EPYC, 2 cores: bf16 717 ->
#   985 img/s; a fp32 step 198 -> 178 ms). OMP_WAIT_POLICY=PASSIVE stays for libgomp, which no
#   longer runs a team here: when our loops ran on it, its spinning worker took the core
#   oneDNN's needed (370 -> 620 img/s with PASSIVE, before the one team).
# RESNET_CPU_TUNING=off leaves these, and the memory setting below, as they are (bench.py's
# PyTorch rows run so, as PyTorch does out of the box).
TUNED = os.environ.get("RESNET_CPU_TUNING", "on") != "off"
if TUNED:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "20")
# - Paddle's bundled MKL takes a slow generic path on AMD processors; type 5 selects its
#   AVX2 kernels (ResNet-18/CIFAR training 7.1 -> 9.8 img/s here; Paddle issue #75760).
if cpu_info("vendor_id") == "AuthenticAMD":
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

# - Freed memory stays in the process (glibc's malloc only; nothing elsewhere). Paddle's CPU
#   tensors come from malloc, and glibc hands every block above its mmap threshold (at most
#   32 MiB) back to the kernel when it is freed: each step then takes fresh, zeroed pages,
#   50-80k minor page faults per ResNet-20 batch-128 step and 442k per ResNet-18 one, 16-20%
#   of the process's CPU time in the kernel (counted with getrusage; README, Speed).
#   No mmap for large blocks and no trimming keeps them for the next step; the cost is that
#   the resident memory stays at its peak (README, Speed). Must run before Paddle allocates.
#   Trimming is off (-1, mallopt(3)), not a high threshold: with 1 GiB, fast_resnet9's fp32
#   step at batch 2000 still gave back its freed top, 314k page faults a step (534 img/s;
#   with -1, 23k and 579 img/s: docs/speed.md).
def keep_freed_memory():
    if not TUNED or not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc, not musl: mallopt's numbers are glibc's
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)
                and libc.mallopt(M_TOP_PAD, 256 * 2 ** 20))


KEEPS_FREED_MEMORY = keep_freed_memory()

# Paddle 3.x imports its C++ extension builder with paddle itself, and the builder warns
# "No ccache found" on import when ccache is not installed (paddle/utils/cpp_extension/
# extension_utils.py, find_ccache_home): advice for whoever rebuilds extensions often, not
# about this run (cpu_kernels/ compiles once and is cached). Only that warning is silenced.
import warnings  # noqa: E402
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

# Paddle 2.6 bundles a zlib that, when it loads before Pillow's, breaks Pillow's PNG
# decoding ("OSError: codec configuration error"): load Pillow first.
import PIL.Image  # noqa: E402,F401


def use_threads(n):
    """Give both OpenMP runtimes of this process (Paddle's libiomp5: MKL, oneDNN and
    cpu_kernels/; libgomp, loaded but idle unless Paddle ships no libiomp5) ``n`` threads,
    and the environment too, for the processes started later."""
    import ctypes
    import paddle
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    for lib in ("libgomp.so.1", os.path.join(libs, "libiomp5.so")):
        try:
            ctypes.CDLL(lib).omp_set_num_threads(n)
        except (OSError, AttributeError):  # a runtime this build does not ship
            pass
    os.environ["OMP_NUM_THREADS"] = str(n)


use_threads(THREADS)

import own_modules  # noqa: E402  (a notebook's own config.py in our config's place is one line)
own_modules.check()

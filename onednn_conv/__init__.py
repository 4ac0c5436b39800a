"""oneDNN convolutions for training on the CPU, as a Paddle custom operator (conv.cc).

    import onednn_conv
    op, why_not = onednn_conv.load()   # compiled on first use, cached, self-checked
    onednn_conv.use_in(model)          # its Conv2D layers now run on oneDNN

``use_in`` changes only how the model's own ``nn.Conv2D`` layers compute: parameter
names, checkpoints and exported models are untouched (export builds a fresh model).
A layer the operator does not cover (bias, groups, dilation, a non-square kernel,
NHWC) keeps Paddle's kernel, and so does any call that is not float32 on the CPU.
See README.md beside this file for the build, the header match and the measurements.
"""
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import site
import struct
import sys
import tempfile
import time
import types
import warnings

try:
    import fcntl
except ImportError:  # Windows: no file locks (the library is a Linux build anyway)
    fcntl = None

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

import device as devices

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ("conv.cc", "norm.cc")]
HEADERS_PACKAGE = "onednn-devel-cpu-gomp==2023.2.0"  # oneDNN 3.2.0 headers, as requirements-without-paddle.txt
PADDLE_LIBS = os.path.join(os.path.dirname(paddle.__file__), "libs")

_loaded = {}  # "op" -> the compiled module, or "why_not" -> the reason it cannot be used


class Unavailable(Exception):
    """Why the operator cannot be used on this machine, in one line."""


def library_version():
    """(major, minor, patch) of the libdnnl.so.3 Paddle ships, which is already loaded in
    this process (ctypes opens the same file, so no second copy is loaded)."""
    path = os.path.join(PADDLE_LIBS, "libdnnl.so.3")
    if not os.path.exists(path):
        raise Unavailable(f"this Paddle ships no oneDNN library ({path} is missing)")

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]
    lib = ctypes.CDLL(path)
    lib.dnnl_version.restype = ctypes.POINTER(Version)
    v = lib.dnnl_version().contents
    return (v.major, v.minor, v.patch)


def header_version(include_dir):
    with open(os.path.join(include_dir, "oneapi", "dnnl", "dnnl_version.h")) as f:
        text = f.read()
    return tuple(int(re.search(rf"#define DNNL_VERSION_{part} (\d+)", text).group(1))
                 for part in ("MAJOR", "MINOR", "PATCH"))


def find_headers(library):
    """The include directory of oneDNN headers that match ``library``: the same major
    version and not newer (a newer header may call what the library lacks)."""
    candidates = [os.environ.get("ONEDNN_INCLUDE_DIR"), os.path.join(sys.prefix, "include"),
                  os.path.join(site.getuserbase(), "include"), "/usr/local/include", "/usr/include"]
    seen = []
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "oneapi", "dnnl", "dnnl_version.h")):
            version = header_version(d)
            if version[0] == library[0] and version <= library:
                return d
            seen.append(f"{d} has {'.'.join(map(str, version))}")
    found = f" ({'; '.join(seen)})" if seen else ""
    raise Unavailable(f"no oneDNN headers <= {'.'.join(map(str, library))} found{found}: "
                      f"pip install {HEADERS_PACKAGE}")


@contextlib.contextmanager
def output_to(path):
    """This process's stdout and stderr (file descriptors 1 and 2, which the compiler's
    processes inherit) go to ``path`` meanwhile: Paddle's builder talks at length, and a
    training log should say one line about it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


BUILD_WAIT_S = 300  # how long a build waits for another process's build of the same folder


def cache_root():
    """$ONEDNN_CONV_CACHE, or ~/.cache/resnet-paddle when it is unset or empty."""
    return os.environ.get("ONEDNN_CONV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "resnet-paddle")


def openmp_link_flags():
    """The OpenMP runtime for norm.cc's loops: the one Paddle's oneDNN runs on. Paddle's
    libdnnl.so.3 asks for libgomp.so.1, but inside Paddle its GOMP_* calls bind to the
    libiomp5.so Paddle ships (which implements that interface too), loaded first. Linked to
    libgomp, our loops ran on a second thread team: two workers on two cores, each parallel
    region waking a sleeping one (~40 us here), and a spinning one taking the core the
    other needed. Linked to libiomp5 first, they bind there too: one team for both."""
    return ["-l:libiomp5.so"] if os.path.exists(os.path.join(PADDLE_LIBS, "libiomp5.so")) else ["-fopenmp"]


def build_dir(include_dir):
    """One cache folder per (Paddle version, source, headers): a change to any rebuilds."""
    digest = hashlib.sha1()
    digest.update(paddle.__version__.encode())
    for source in SOURCES:
        digest.update(open(source, "rb").read())
    digest.update(" ".join(devices.cpu_flags()).encode())  # built with -march=native: one build per kind of CPU
    digest.update(include_dir.encode())
    digest.update(" ".join(openmp_link_flags()).encode())
    return os.path.join(cache_root(), f"onednn_conv-{digest.hexdigest()[:12]}")


def shell_safe(path):
    """``path``, or a symlink to it with a plain name: Paddle's builder runs shell commands
    with the build folder unquoted, so a folder with a space (or any shell character)
    never builds as it is."""
    if re.fullmatch(r"[\w./+-]+", path):
        return path
    link = os.path.join(tempfile.gettempdir(), "onednn_conv-" + hashlib.sha1(path.encode()).hexdigest()[:12])
    if os.path.realpath(link) != os.path.realpath(path):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(path, link)
    return link


@contextlib.contextmanager
def build_lock(out):
    """One build of ``out`` at a time (ranks of one launch build once, not over each other).
    A holder that never lets go (a stopped process) is one line after BUILD_WAIT_S, naming it."""
    path = os.path.join(out, ".lock")
    with open(path, "a+") as lock:
        if fcntl is not None:
            deadline = time.monotonic() + BUILD_WAIT_S
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        lock.seek(0)
                        holder = lock.read().strip() or "unknown"
                        raise Unavailable(f"the build folder {out} is locked by process {holder} for over "
                                          f"{BUILD_WAIT_S} s (a build that hangs, or a stopped process: end it)")
                    time.sleep(0.2)
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
        yield


def whole_library(path):
    """Whether the shared library at ``path`` is all there: its section headers, which the
    linker writes last, end inside the file. Loading one cut short (a build stopped while
    it linked) does not raise: the process dies of SIGBUS (seen with Paddle 2.6.2)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return False
    offset, = struct.unpack_from("<Q", head, 0x28)  # e_shoff
    entry_size, count = struct.unpack_from("<HH", head, 0x3A)  # e_shentsize, e_shnum
    return os.path.getsize(path) >= offset + entry_size * count


def compile_op():
    """Build (or load from the cache) the operator. Raises Unavailable. A cached library cut
    short (a build stopped while it linked) or that does not load is removed and built
    again, once."""
    if not shutil.which(os.environ.get("CXX", "c++")):
        raise Unavailable("no C++ compiler on this machine (install g++)")
    include_dir = find_headers(library_version())
    out = build_dir(include_dir)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"the build folder {out} cannot be made ({e.strerror or e}); set ONEDNN_CONV_CACHE")
    with build_lock(out), output_to(os.path.join(out, "build.log")):
        from paddle.utils import cpp_extension
        cached = os.path.join(out, "onednn_conv_op")
        library = os.path.join(cached, "onednn_conv_op.so")
        if os.path.exists(library) and not whole_library(library):
            print("the cached build is cut short: building it again", flush=True)
            shutil.rmtree(cached)
        for attempt in range(2):
            try:
                return cpp_extension.load(
                    name="onednn_conv_op", sources=SOURCES, extra_include_paths=[include_dir],
                    # -march=native: its loops vectorise for this CPU (AVX-512 where there is one)
                    extra_cxx_cflags=["-O3", "-march=native", "-fopenmp"], build_directory=shell_safe(out),
                    extra_ldflags=[f"-L{PADDLE_LIBS}", *openmp_link_flags(), "-l:libdnnl.so.3",
                                   f"-Wl,-rpath,{PADDLE_LIBS}"])
            except Exception:  # a compiler error (the details are in build.log), or a broken cached build
                if attempt or not os.path.isdir(cached):
                    break
                print("the cached build does not load: building it again", flush=True)
                shutil.rmtree(cached)
    raise Unavailable(f"the operator did not compile; the compiler's output is in {out}/build.log")


def self_check(op):
    """Forward and both gradients against Paddle's conv2d on two small shapes, and the
    running mean that BatchNorm updates in place, on the CPU whatever the default device
    is (on a GPU build it is GPU 0, where the operator does not run: GPU audit 2, N4)."""
    rng = np.random.default_rng(0)
    cpu = paddle.CPUPlace()
    for stride, padding, r in ((1, 1, 3), (2, 0, 1)):
        x = paddle.to_tensor(rng.standard_normal((2, 8, 7, 7), dtype=np.float32), place=cpu, stop_gradient=False)
        w = paddle.to_tensor(rng.standard_normal((16, 8, r, r), dtype=np.float32), place=cpu, stop_gradient=False)
        ours = op.onednn_conv2d(x, w, stride, padding, True, False)
        ref = F.conv2d(x, w, stride=stride, padding=padding)
        grad = paddle.to_tensor(rng.standard_normal(ref.shape, dtype=np.float32), place=cpu)
        pairs = zip([ours, *paddle.grad([ours], [x, w], [grad])], [ref, *paddle.grad([ref], [x, w], [grad])])
        for a, b in pairs:
            error = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
            if not error <= 1e-4:
                raise Unavailable(f"self-check failed: relative error {error:.1e} against Paddle's conv2d")
    x = paddle.to_tensor(rng.standard_normal((2, 3, 3, 4), dtype=np.float32), place=cpu)
    ones, zeros = (paddle.to_tensor(np.full(4, v, np.float32), place=cpu) for v in (1, 0))
    running = paddle.to_tensor(np.zeros(4, np.float32), place=cpu)  # BatchNorm writes it in place
    batch_mean = op.batch_norm_relu(x, ones, zeros, running, ones.clone(), 1e-5, 0.9, False, True)[1]
    if not np.allclose(running.numpy(), batch_mean.numpy() * np.float32(0.1), rtol=1e-5):
        raise Unavailable("self-check failed: batch_norm_relu did not update the running mean it was given")


def load():
    """(module, None) when the operator builds and passes its self-check here, else
    (None, a one-line reason). Built once per process."""
    if not _loaded:
        try:
            op = compile_op()
            self_check(op)
            _loaded.update(op=op, why_not=None)
        except Unavailable as e:
            _loaded.update(op=None, why_not=str(e))
        except Exception as e:  # anything else the library, the build or the self-check raised
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _loaded.update(op=None, why_not=f"the operator failed its start-up check ({type(e).__name__}: {first})")
    return _loaded["op"], _loaded["why_not"]


def covered(layer):
    """The stride and padding of a Conv2D the operator computes, or None."""
    if type(layer) is not nn.Conv2D or layer.bias is not None or layer._groups != 1:
        return None
    if layer._data_format != "NCHW" or layer._padding_mode != "zeros" or layer._padding_algorithm != "EXPLICIT":
        return None
    kernel, stride, padding = list(layer._kernel_size), list(layer._stride), list(layer._updated_padding)
    if list(layer._dilation) != [1, 1] or kernel[0] != kernel[1] or len(set(stride)) != 1 or len(set(padding)) != 1:
        return None
    return stride[0], padding[0]


def on_cpu_fp32(*tensors):
    return all(t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors)


def on_cpu_ours(x, *params):
    """``x`` float32 or bfloat16 (the operators' activations) and ``params`` float32, all on the CPU."""
    return x.dtype in (paddle.float32, paddle.bfloat16) and x.place.is_cpu_place() and on_cpu_fp32(*params)


def dense(x):
    """``x`` in its own row-major memory: the operators read it so, and a 3.x view (a
    transpose) only has strides."""
    return x.contiguous() if hasattr(x, "is_contiguous") and not x.is_contiguous() else x


def conv_forward(layer, x):
    """Conv2D.forward of a covered layer (bound to it by use_in), on activations in the
    layout use_in chose (layer._onednn_nhwc)."""
    stride, padding = layer._onednn_conv
    if not on_cpu_ours(x, layer.weight):
        return F.conv2d(x, layer.weight, stride=stride, padding=padding,
                        data_format="NHWC" if layer._onednn_nhwc else "NCHW")
    x = dense(x)
    return _loaded["op"].onednn_conv2d(x, layer.weight, stride, padding, not x.stop_gradient, layer._onednn_nhwc)


def batch_norm(layer, x, relu=False, nhwc=False, fork=False):
    """``layer`` (a BatchNorm2D) on ``x`` (NCHW, or NHWC with ``nhwc``), then the ReLU when
    ``relu``. In training it runs on the operator, which also updates the running
    statistics as Paddle's kernel does: momentum on the biased batch variance, in place
    on the layer's tensors, so names and checkpoints stay. Evaluation, frozen statistics
    (fine-tuning's last/head) and anything but float32 or bfloat16 on the CPU keep
    Paddle's kernel. ``fork``: the output twice (see ``forked``), for a next block's
    convolution and its shortcut."""
    if not layer.training or layer._use_global_stats or len(x.shape) != 4 or not on_cpu_ours(x, layer.weight):
        return forked(paddle_batch_norm(layer, x, relu, nhwc), fork)
    y, _, _, y2 = _loaded["op"].batch_norm_relu(dense(x), layer.weight, layer.bias, layer._mean, layer._variance,
                                                layer._epsilon, layer._momentum, relu, nhwc)
    return (y, y2) if fork else y


def paddle_batch_norm(layer, x, relu, nhwc):
    """``layer`` (and the ReLU) on Paddle's kernel, which has no bfloat16 on the CPU: bf16
    activations (frozen statistics in bf16 fine-tuning) go through it in fp32 and come back
    bf16, their gradient too."""
    bf16 = x.dtype == paddle.bfloat16
    y = F.batch_norm(bf16_cast(x) if bf16 else x, layer._mean, layer._variance, layer.weight, layer.bias,
                     training=layer.training, momentum=layer._momentum, epsilon=layer._epsilon,
                     data_format="NHWC" if nhwc else "NCHW", use_global_stats=layer._use_global_stats)
    y = F.relu(y) if relu else y
    return bf16_cast(y) if bf16 else y


def bf16_cast(x):
    """``x`` (float32 or bfloat16) in the other precision, and its gradient back, rounded to
    the nearest even: on the CPU by the operator (Paddle 2.6's CPU cast truncates, 3.x's
    rounds), elsewhere by Paddle's cast."""
    if x.place.is_cpu_place() and _loaded.get("op") is not None:
        return _loaded["op"].bf16_cast(dense(x))
    return x.astype("float32" if x.dtype == paddle.bfloat16 else "bfloat16")


def forked(y, fork):
    """(y, y) for ``fork``, else y. The operators return their output twice, as two
    tensors on one memory: the convolution takes one and the shortcut the other, and the
    operator's backward adds their gradients itself (Paddle would add the gradients of one
    tensor used twice on one thread). Paddle's kernels (the fallbacks) give one tensor."""
    return (y, y) if fork else y


def join(out, x, downsample, nhwc=False, fork=False):
    """relu(out + shortcut(x)) for a residual block: the shortcut is x itself, its
    projection (``downsample``, a ConvBN), or option A (ZeroPadShortcut), which the
    operator reads straight from x. ``fork``: the output twice, as ``batch_norm``."""
    from models.resnet import ZeroPadShortcut
    stride = 1
    if isinstance(downsample, ZeroPadShortcut):
        stride = downsample.stride
    elif downsample is not None:
        x = downsample(x)
    if not (on_cpu_ours(out) and x.dtype == out.dtype):
        if isinstance(downsample, ZeroPadShortcut):
            x = downsample(x.transpose([0, 3, 1, 2])).transpose([0, 2, 3, 1]) if nhwc else downsample(x)
        return forked(F.relu(out + x), fork)
    y, y2 = _loaded["op"].residual_join(out, x, stride, nhwc)
    return (y, y2) if fork else y


def block_input(x):
    """(the input for the first convolution, the input for the shortcut) of a block: the
    pair a forked output gave, or one tensor twice."""
    return x if isinstance(x, tuple) else (x, x)


def residual_block_forward(block, x):
    """ResidualBlock.forward with BN+ReLU fused and the join in one operator."""
    nhwc, fork = block._onednn_nhwc, block._onednn_fork
    x, shortcut = block_input(x)
    out = batch_norm(block.bn1, block.conv1(x), relu=True, nhwc=nhwc)
    if not block.residual:
        return batch_norm(block.bn2, block.conv2(out), relu=True, nhwc=nhwc, fork=fork)
    out = batch_norm(block.bn2, block.conv2(out), nhwc=nhwc)
    return join(out, shortcut, block.downsample, nhwc, fork)


def bottleneck_block_forward(block, x):
    nhwc, fork = block._onednn_nhwc, block._onednn_fork
    x, shortcut = block_input(x)
    out = batch_norm(block.bn1, block.conv1(x), relu=True, nhwc=nhwc)
    out = batch_norm(block.bn2, block.conv2(out), relu=True, nhwc=nhwc)
    if not block.residual:
        return batch_norm(block.bn3, block.conv3(out), relu=True, nhwc=nhwc, fork=fork)
    out = batch_norm(block.bn3, block.conv3(out), nhwc=nhwc)
    return join(out, shortcut, block.downsample, nhwc, fork)


def conv_bn_forward(layer, x):
    """ConvBNLayer (a projection shortcut: conv, BN, and a ReLU when it has one)."""
    return batch_norm(layer[1], layer[0](x), relu=len(layer) > 2, nhwc=layer._onednn_nhwc)


def mean_pool(x):
    """The pooled features [N, C], float32, of NHWC activations (float32 or bfloat16)."""
    if on_cpu_ours(x):
        return _loaded["op"].mean_pool(x)
    return x.astype("float32").mean(axis=[1, 2])


def max_pool(x, nhwc, fork=False):
    """The ImageNet stem's 3x3 stride-2 max pool (padding 1). On NHWC CPU activations, the
    operator: Paddle's kernel runs on one thread and has no bfloat16 (a ResNet-18 step at
    224x224, batch 32, spent 28% of its time in it and the casts around it). ``fork``: the
    output twice, as ``batch_norm``."""
    if nhwc and on_cpu_ours(x) and len(x.shape) == 4:
        y, y2 = _loaded["op"].max_pool(dense(x))
        return (y, y2) if fork else y
    return forked(F.max_pool2d(x, 3, 2, 1, data_format="NHWC" if nhwc else "NCHW"), fork)


def resnet_forward(model, x):
    """ResNet.forward on the operators. With model._onednn_nhwc the image batch is turned
    to NHWC once here, every layer keeps that layout, and the pooled features [N, C] come
    out of a mean over H and W; otherwise the stem's BN+ReLU is fused and the rest is as
    ResNet.forward."""
    nhwc = model._onednn_nhwc
    if nhwc:
        x = x.transpose([0, 2, 3, 1])
    if model._onednn_bf16 and model.training:  # bf16 from the first convolution; evaluation stays fp32
        x = bf16_cast(x)
    pool = model.maxpool is not None  # the stem's output, forked for the first block: the pool's when it has one
    x = batch_norm(model.bn1, model.conv1(x), relu=True, nhwc=nhwc, fork=model._onednn_fork and not pool)
    if pool:
        x = max_pool(x, nhwc, fork=model._onednn_fork)
    for stage in model.stages:
        x = stage(x)
    if model.with_pool:  # the pooled features in fp32, for the classifier and the loss
        x = mean_pool(x) if nhwc else paddle.flatten(model.avgpool(x), 1)
    return model.fc(x) if model.num_classes > 0 else x


def use_in(model, ops=("conv", "norm", "join"), layout="nhwc", dtype="float32"):
    """Make ``model`` train on the operators (load() must have succeeded): every covered
    Conv2D ("conv"), and in the blocks of models/ BatchNorm with its ReLU ("norm") and the
    residual join ("join"). ``layout="nhwc"`` (with all three, for a ResNet of models/ with
    its pool and classifier) keeps the activations NHWC from the input to the pooled
    features: oneDNN's convolutions then need no reorder of them. ``dtype="bfloat16"``
    (NHWC only) trains with bf16 activations and gradients between the operators, fp32
    weights, weight gradients, BN statistics and classifier; evaluation runs in fp32.
    Only forwards change: parameters, their names and checkpoints do not. Returns how
    many layers each one took."""
    if not _loaded.get("op"):
        raise RuntimeError("onednn_conv.load() did not succeed: " + str(_loaded.get("why_not")))
    from models.resnet import BottleneckBlock, ConvBNLayer, ResidualBlock, ResNet
    fused = "norm" in ops and "join" in ops
    nhwc = (layout == "nhwc" and fused and "conv" in ops and type(model) is ResNet and model.with_pool
            and model.num_classes > 0 and all(covered(l) for l in model.sublayers() if isinstance(l, nn.Conv2D)))
    if dtype == "bfloat16" and not nhwc:
        raise ValueError("bfloat16 training runs on the NHWC path: a ResNet of models/ with its pool and classifier")
    counts = dict(conv=0, norm=0, join=0, layout="nhwc" if nhwc else "nchw", dtype=dtype)
    for layer in model.sublayers(include_self=True):
        layer._onednn_nhwc = nhwc
        layer._onednn_bf16 = dtype == "bfloat16"
        layer._onednn_fork = False
        how = covered(layer)
        if "conv" in ops and how is not None:
            layer._onednn_conv = how
            layer.forward = types.MethodType(conv_forward, layer)
            counts["conv"] += 1
        if fused and type(layer) in (ResidualBlock, BottleneckBlock):
            layer.forward = types.MethodType(
                residual_block_forward if type(layer) is ResidualBlock else bottleneck_block_forward, layer)
            counts["norm"] += 3 if type(layer) is BottleneckBlock else 2
            counts["join"] += layer.residual
        elif fused and type(layer) is ConvBNLayer:
            layer.forward = types.MethodType(conv_bn_forward, layer)
            counts["norm"] += 1
        elif fused and type(layer) is ResNet:
            layer.forward = types.MethodType(resnet_forward, layer)
            counts["norm"] += 1
    if nhwc:  # each output that a residual block takes in is forked (see forked())
        blocks = [block for stage in model.stages for block in stage]
        model._onednn_fork = blocks[0].residual
        for block, after in zip(blocks, blocks[1:]):
            block._onednn_fork = after.residual
    return counts

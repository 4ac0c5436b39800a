"""Building, caching and self-checking our CPU operators' library (the C++ files beside this).

The library is compiled on first use against oneDNN headers that match the libdnnl.so.3
Paddle ships (README.md beside this file), linked to that library and to Paddle's OpenMP
runtime, cached per (Paddle version, sources, headers, CPU kind, checkout), and checked against
Paddle's kernels before anything trains on it. ``load()`` in __init__.py calls this.
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

try:
    import fcntl
except ImportError:  # Windows: no file locks (the library is a Linux build anyway)
    fcntl = None

import numpy as np
import paddle
import paddle.nn.functional as F

import device as devices
from files import output_to

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.join(HERE, name) for name in os.listdir(HERE) if name.endswith(".cc"))
HEADERS = sorted(os.path.join(HERE, name) for name in os.listdir(HERE) if name.endswith(".h"))
HEADERS_PACKAGE = "onednn-devel-cpu-gomp==2023.2.0"  # oneDNN 3.2.0 headers, as requirements-without-paddle.txt
PADDLE_LIBS = os.path.join(os.path.dirname(paddle.__file__), "libs")

loaded = {}  # "op" -> the compiled module, or "why_not" -> the reason it cannot be used


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


BUILD_WAIT_S = 300  # how long a build waits for another process's build of the same folder


def cache_root():
    """$CPU_KERNELS_CACHE ($ONEDNN_CONV_CACHE, its old name), or ~/.cache/resnet-paddle when
    both are unset or empty."""
    return (os.environ.get("CPU_KERNELS_CACHE") or os.environ.get("ONEDNN_CONV_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "resnet-paddle"))


def openmp_link_flags():
    """The OpenMP runtime for norm.cc's loops: the one Paddle's oneDNN runs on. Paddle's
    libdnnl.so.3 asks for libgomp.so.1, but inside Paddle its GOMP_* calls bind to the
    libiomp5.so Paddle ships (which implements that interface too), loaded first. Linked to
    libgomp, our loops ran on a second thread team: two workers on two cores, each parallel
    region waking a sleeping one (~40 us here), and a spinning one taking the core the
    other needed. Linked to libiomp5 first, they bind there too: one team for both."""
    return ["-l:libiomp5.so"] if os.path.exists(os.path.join(PADDLE_LIBS, "libiomp5.so")) else ["-fopenmp"]


def build_dir(include_dir):
    """One cache folder per (Paddle version, source, headers, checkout): a change to any
    rebuilds. The checkout's folder is in it because Paddle's cpp_extension compiles again
    when the sources' paths change: two clones sharing one folder rebuilt it in turn."""
    digest = hashlib.sha1()
    digest.update(paddle.__version__.encode())
    digest.update(HERE.encode())
    for source in SOURCES + HEADERS:
        digest.update(open(source, "rb").read())
    digest.update(" ".join(devices.cpu_flags()).encode())  # built with -march=native: one build per kind of CPU
    digest.update(include_dir.encode())
    digest.update(" ".join(openmp_link_flags()).encode())
    return os.path.join(cache_root(), f"cpu_kernels-{digest.hexdigest()[:12]}")


def shell_safe(path):
    """``path``, or a symlink to it with a plain name: Paddle's builder runs shell commands
    with the build folder unquoted, so a folder with a space (or any shell character)
    never builds as it is."""
    if re.fullmatch(r"[\w./+-]+", path):
        return path
    link = os.path.join(tempfile.gettempdir(), "cpu_kernels-" + hashlib.sha1(path.encode()).hexdigest()[:12])
    if os.path.realpath(link) != os.path.realpath(path):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(path, link)
    return link


SAY_WAIT_AFTER_S = 2  # a launch's other ranks wait a moment while rank 0 loads the library: not worth a line


@contextlib.contextmanager
def build_lock(out):
    """One build of ``out`` at a time (ranks of one launch build once, not over each other).
    A wait of more than SAY_WAIT_AFTER_S says whose lock it waits for; a holder that never lets go (a stopped
    process) is one line after BUILD_WAIT_S, naming it."""
    path = os.path.join(out, ".lock")
    with open(path, "a+") as lock:
        if fcntl is not None:
            deadline, said = time.monotonic() + BUILD_WAIT_S, False
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    lock.seek(0)
                    holder = lock.read().strip() or "unknown"
                    if time.monotonic() > deadline:
                        raise Unavailable(f"the build folder {out} is locked by process {holder} for over "
                                          f"{BUILD_WAIT_S} s (a build that hangs, or a stopped process: end it)")
                    if not said and time.monotonic() > deadline - BUILD_WAIT_S + SAY_WAIT_AFTER_S:
                        print(f"waiting up to {BUILD_WAIT_S} s for the CPU operators' build in {out}: process "
                              f"{holder} holds its lock{' and is stopped (kill -CONT or end it)' if stopped(holder) else ''}",
                              file=sys.stderr, flush=True)
                        said = True
                    time.sleep(0.2)
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
        yield


def stopped(pid):
    """Whether process ``pid`` (a string) is stopped (SIGSTOP, Ctrl-Z): its state in /proc is T."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, ValueError, IndexError):
        return False


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
        raise Unavailable(f"the build folder {out} cannot be made ({e.strerror or e}); set CPU_KERNELS_CACHE")
    with build_lock(out), output_to(os.path.join(out, "build.log")):
        from paddle.utils import cpp_extension
        cached = os.path.join(out, "cpu_kernels_op")
        library = os.path.join(cached, "cpu_kernels_op.so")
        if os.path.exists(library) and not whole_library(library):
            print("the cached build is cut short: building it again", flush=True)
            shutil.rmtree(cached)
        for attempt in range(2):
            try:
                return cpp_extension.load(
                    name="cpu_kernels_op", sources=SOURCES, extra_include_paths=[include_dir],
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
    batch_mean = op.batch_norm_act(x, ones, zeros, running, ones.clone(), 1e-5, 0.9, 0, True)[1]
    if not np.allclose(running.numpy(), batch_mean.numpy() * np.float32(0.1), rtol=1e-5):
        raise Unavailable("self-check failed: batch_norm_act did not update the running mean it was given")


def load():
    """(module, None) when the operator builds and passes its self-check here, else
    (None, a one-line reason). Built once per process."""
    if not loaded:
        try:
            op = compile_op()
            self_check(op)
            loaded.update(op=op, why_not=None)
        except Unavailable as e:
            loaded.update(op=None, why_not=str(e))
        except Exception as e:  # anything else the library, the build or the self-check raised
            first = (str(e).strip().splitlines() or [""])[0][:200]
            loaded.update(op=None, why_not=f"the operator failed its start-up check ({type(e).__name__}: {first})")
    return loaded["op"], loaded["why_not"]

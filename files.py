"""Writing files so that nothing is ever half-written or written by two processes at once:
the atomic replace every saved file goes through, the lock of a run directory, and the
lock a download waits on; and ``output_to``, which sends a talkative library's output to a
log file.
"""
import contextlib
import errno
import glob
import os
import shutil
import sys
import tempfile
import warnings

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a run directory is then not locked
    fcntl = None

from errors import UserError

LOCK = ".lock"
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: there is no way to read the umask without setting it
_held = {}  # run directory -> the open lock file, held until unlock() or the end of this process


def why_not_written(path, error):
    """One line for an OSError met while writing ``path``, with the fix that fits it."""
    why = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why += ": free some disk space"
    elif error.errno == errno.EFBIG:
        why += ": a file-size limit (ulimit -f) is below it; raise it (ulimit -f unlimited)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why += f": make {os.path.dirname(os.path.abspath(path))} writable"
    return f"could not write {path} ({why})"


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside ``path`` to write; then move it onto ``path``
    atomically, so a crash never leaves half a file. The temporary name is unique (two
    processes writing one file never share it). A failed write (a full disk, a read-only
    folder) removes the temporary file, leaves ``path`` as it was and is one UserError."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it 0600: give it the mode open() would
    except OSError as e:
        raise UserError(why_not_written(path, e) + "; what was saved before is intact")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(why_not_written(path, e) + "; what was saved before is intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def writing_into(folder):
    """Yield a temporary folder inside ``folder`` (made if missing) to write files into;
    then move each onto its name in ``folder``. A failure or a stop before that removes the
    temporary folder, and ``folder`` too if it was made here and is still empty, and leaves
    ``folder``'s files as they were; an OSError is one UserError."""
    made_here, tmp, done = not os.path.isdir(folder), None, False
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".writing.", suffix=".tmp", dir=folder)
        yield tmp
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        done = True
    except OSError as e:
        raise UserError(why_not_written(folder, e) + ("; what was saved before is intact" if tmp else ""))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if made_here and not done:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only an empty folder goes: one that nothing was moved into


def write_text(path, text):
    with replacing(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


def write_yaml(path, values):
    """``values`` (a dict) as YAML at ``path``, atomically, in the order given."""
    import yaml
    with replacing(path) as tmp:
        with open(tmp, "w") as f:
            yaml.safe_dump(values, f, sort_keys=False)


def remove_leftovers(folder):
    """Temporary files a killed process left in ``folder`` (call it holding the lock)."""
    for tmp in glob.glob(os.path.join(folder, ".*.tmp")):
        os.remove(tmp)


def lock(folder):
    """Hold ``folder``'s lock until ``unlock(folder)`` (the kernel releases it when the
    process dies, kill -9 included): one writer per run directory. A second process gets
    one line naming the first one's pid. Raises UserError when the folder is not writable."""
    if fcntl is None or folder in _held:
        return
    path = os.path.join(folder, LOCK)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise UserError(f"--output-dir {folder} is not writable ({e.strerror or e}); make it writable or pick another")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{folder} is in use by another process (pid {holder}); wait for it to end or stop it, "
                        "then run again")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[folder] = f
    try:  # the lock file may be writable where the folder is not: try a new file too
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output-dir {folder} is not writable ({e.strerror or e}); make it writable or pick "
                        "another --output-dir")


@contextlib.contextmanager
def one_at_a_time(path):
    """Run the block while holding ``path`` (a lock file) exclusively, waiting for any other
    process holding it: two processes never download into one file at once."""
    if fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def unlock(folder):
    held = _held.pop(folder, None)
    if held is not None:
        held.close()  # closing the file releases the lock


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

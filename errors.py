"""The command-line contract every script keeps: a mistake a user can fix is one line and
exit status 1, Ctrl-C 130, SIGTERM 143 (after the training loop has said what it saved),
a closed stdout a quiet end; never a traceback for any of them.

    with errors.user_errors():
        run(argv)
"""
import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import threading


class UserError(Exception):
    """Anything a user can fix (an option, a path, the data, a checkpoint): the message is
    one line naming the problem and the fix. Every script prints it as ``error: ...``."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, docker stop), handled as Ctrl-C is."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes (an unknown option, an invalid choice, a missing
    argument) are one line as every other mistake, not a usage block; exit status 2 as
    argparse's. --help prints the usage."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def terminate(signum, frame):
    raise Terminated()


class AgreedStop:
    """Ctrl-C and SIGTERM under the launcher: noted when they come, raised on every rank at
    the same step once the ranks agree (``check``), so that no rank is left waiting in a
    collective for one that has gone (gloo then aborts it). The launcher sends SIGTERM to
    every rank and kills them 30 s later (paddle/distributed/launch/controllers)."""

    def __init__(self):
        self.stop = None

    def note(self, signum, frame):
        self.stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.note)

    def check(self, all_sum, world):
        """Raise the stop on every rank when any rank noted one (``all_sum``: launch.all_sum)."""
        if all_sum([self.stop is not None], world)[0]:
            raise self.stop if self.stop is not None else Terminated()


def stop_code(stop):
    """The exit status of a run stopped by ``stop``: 143 for SIGTERM, 130 for Ctrl-C, as a shell gives."""
    return 143 if isinstance(stop, Terminated) else 130


@contextlib.contextmanager
def user_errors():
    """Every script's body runs in this: a UserError is one ``error: ...`` line and exit
    status 1, Ctrl-C or SIGTERM one line and 130/143 (the training loop says what it
    saved before this), a closed stdout (``| head``) a quiet end; a dead DataLoader worker
    and a file-size limit are one line too; no traceback for any."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as stop:
        print(f"\n{'terminated' if isinstance(stop, Terminated) else 'interrupted'}: nothing was saved",
              file=sys.stderr, flush=True)
        sys.exit(stop_code(stop))
    except SystemError as e:
        lost = lost_worker(e)
        if lost is None:
            raise
        sys.exit(f"error: {lost}")
    except BrokenPipeError:  # the reader of our output went away: end quietly, as `cat` would
        quiet_stdout()
        sys.exit(141)
    except OSError as e:  # after BrokenPipeError, one of them
        if e.errno != errno.EFBIG:
            raise
        sys.exit(f"error: a file-size limit (ulimit -f) stops this process writing ({e.strerror}): raise it "
                 "(ulimit -f unlimited)")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def lost_worker(error):
    """What happened, in one line, when ``error`` is the SystemError Paddle's DataLoader
    raises (from its SIGCHLD handler, wherever the main process is) for a worker that died;
    None for any other error."""
    if "Blocking queue is killed because the data reader raises an exception" in str(error):
        return "a DataLoader worker ended unexpectedly (a signal sent to it alone?)"
    found = re.search(r"DataLoader process \(pid (\d+)\) exited (?:is killed by signal: (\w+)|unexpectedly with "
                      r"code (-?\d+))", str(error))
    if found is None:
        return None
    pid, by, code = found.groups()
    how = f"was killed by signal {by}" if by else f"exited with code {code}"
    oom = " (SIGKILL is what the kernel's out-of-memory killer sends: lower --num-workers or --batch-size)" \
        if by == "Killed" else ""
    return f"a DataLoader worker (pid {pid}) {how}{oom}"


def quiet_stdout():
    """Point stdout at /dev/null (it is a closed pipe): later prints and the interpreter's
    final flush then go nowhere instead of raising BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

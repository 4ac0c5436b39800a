"""What a training run prints: its progress lines, the time its steps will take, durations.

Only rank 0 prints under paddle.distributed.launch; every line is flushed at once, so it
reaches a log under nohup or CI as it happens.
"""
import time

import errors
import launch
from checkpoint import as_number


def log(*args):
    if launch.rank() == 0:  # under launch, only rank 0 prints
        try:
            print(*args, flush=True)
        except BrokenPipeError:  # `train_cifar10.py | head` closed our stdout: train on, say nothing
            errors.quiet_stdout()


class RunEstimate:
    """After the first steps of a run (or of a resume), one line: how long its training
    steps will take on this machine. The first SKIP steps (oneDNN primitives, DataLoader
    workers starting) are left out; the next MEASURE steps are timed."""
    SKIP, MEASURE = 2, 10

    def __init__(self, total_iterations, start_iteration):
        self.total, self.start, self.t0 = total_iterations, start_iteration, None

    def step(self, iteration):
        done = iteration - self.start
        if done == self.SKIP:
            self.t0 = time.time()
        elif done == self.SKIP + self.MEASURE and self.t0 is not None:
            left = (time.time() - self.t0) / self.MEASURE * (self.total - iteration)
            log(f"the run's {self.total - iteration:,} remaining training steps: about {rough_duration(left)} on "
                f"this machine (from steps {self.start + self.SKIP + 1}-{iteration}; validation adds to it)")


def rough_duration(s):
    """'about 40 s', '12 min', '8 h 40 min': what a reader needs to decide whether to wait."""
    if s < 60:
        return f"{max(10, round(s, -1)):.0f} s"
    if s < 3600:
        return f"{round(s / 60):.0f} min"
    hours, minutes = divmod(round(s / 600) * 10, 60)
    return f"{hours:.0f} h {minutes:.0f} min" if minutes else f"{hours:.0f} h"


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def log_step(run, epoch, steps, since, rate):
    """The line every --log-every steps: the epoch's running loss and accuracy, speed, ETA.
    ``since``: (time, seen, step) when this session's epoch began; ``rate`` in img/s."""
    elapsed = time.time() - since[0]
    eta = elapsed / max(run.step - since[2], 1) * (steps - run.step)
    loss, acc = as_number(run.loss_sum) / run.seen, as_number(run.correct) / run.seen
    log(f"epoch {epoch + 1} step {run.step}/{steps} loss {loss:.4f} acc {acc:.4f} {rate:.1f} img/s "
        f"eta {format_seconds(eta)}")
    return loss, acc


def log_resumed(cfg, run, sched, total_iterations):
    log(f"resumed from {cfg.output_dir} at epoch {run.epoch + 1}" + (f", step {run.step}" if run.step else ""))
    if run.replanned:
        keys = ", ".join(f"{k} {getattr(cfg, k)}" for k in run.replanned)
        log(f"the LR schedule is planned again for {keys} ({total_iterations} iterations "
            f"in all), as if the run had started with it: lr {sched.get_lr():.5g} at iteration {run.iteration}")


def log_start(cfg, n_train, device, world, datasets, iters_per_epoch, lr):
    sizes = " ".join(f"{k} {len(datasets[k]) if datasets.get(k) is not None else 0}" for k in ("train", "val", "test"))
    log(f"model {cfg.model}: {n_train:,} trainable parameters | device {device} x {world} | {sizes} | "
        f"batch {cfg.batch_size} per device, global batch {cfg.batch_size * world}, {iters_per_epoch} iterations/epoch, "
        f"{cfg.epochs} epochs, lr {lr:g}")


def log_epoch(cfg, row, left, mean_epoch_time):
    val_text = f"val loss {row['val_loss']:.4f} val acc {row['val_acc']:.4f} | " if row["val_acc"] != "" else ""
    log(f"epoch {row['epoch']}/{cfg.epochs} done in {format_seconds(row['epoch_time_s'])} | "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | {val_text}"
        f"lr {row['lr']:.5f} | run eta {format_seconds(mean_epoch_time * left)}")

"""Everything a run saves and how it comes back.

A checkpoint (``.pdckpt``) is one ``paddle.save``'d dict: ``model`` (the fp32 state dict),
``optimizer`` (keyed by structured names), ``scheduler``, ``scaler``, ``epoch`` (epochs
finished), ``progress`` (the position inside an interrupted epoch, or None), ``history``
(one metrics row per epoch), ``best``, ``rng``, ``config``, ``class_names``,
``paddle_version`` and what the script adds (``preprocess``: how a new image is prepared).
A run directory holds ``last.pdckpt`` and, when validation chose one, ``best.pdckpt``.
"""
import contextlib
import dataclasses
import os
import random
import shutil

import numpy as np
import paddle

import config
import files
import metrics
import models
from errors import UserError
from files import replacing

LAST, BEST, RESULTS = "last.pdckpt", "best.pdckpt", "results.yaml"


# --------------------------------------------------------------------- files
RUN_FILES = (LAST, BEST, "metrics.csv", RESULTS, "config.yaml")


def prepare_run_dir(out, resuming, writer=True):
    """Create the output directory of a run and take its lock (``writer``: the process that
    saves; under launch, rank 0). Refuse a directory that holds a run unless resuming
    (nothing saved is ever overwritten), one that is a file, or one another process uses."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output-dir {out} is a file; give a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out} cannot be created ({e.strerror or e})")
    if writer:
        files.lock(out)  # before looking inside: a run another process is writing is not ours to judge
    try:
        check_run_dir(out, resuming)
        if writer:
            files.remove_leftovers(out)
    except BaseException:  # refused: the lock goes (a notebook's next fit or a terminal's --resume may take it)
        files.unlock(out)
        raise


STARTED_ONLY = ["config.yaml"]  # what a run leaves when stopped before its first checkpoint


def check_run_dir(out, resuming):
    """Refuse a directory that holds a run, unless resuming. A run stopped before its first
    checkpoint (only its config.yaml) starts again: there is nothing to resume or to lose."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not resuming and found and found != STARTED_ONLY:
        how = f"continue it with --resume {out}, or " if LAST in found else ""
        raise UserError(f"{out} already holds a run ({', '.join(found)}); {how}pick a new --output-dir")


def save(path, state):
    """paddle.save ``state`` to ``path`` atomically (files.replacing)."""
    with replacing(path) as tmp:
        paddle.save(state, tmp)


def save_run(out, state, improved):
    """Save ``LAST``; when the epoch ``improved`` on validation, make ``BEST`` the same file
    (a hard link, or a copy where links are not possible), also atomically (timm's saver).
    A kill between the two leaves LAST holding the best epoch: ``repair_run`` links it.
    results.yaml (a finished run's report) would no longer describe the run: it goes once
    the new LAST is written and before it takes LAST's name, so a failed save (a full disk,
    a file-size limit) leaves both as they were."""
    results = os.path.join(out, RESULTS)
    with replacing(os.path.join(out, LAST)) as tmp:
        paddle.save(state, tmp)
        if os.path.exists(results):
            os.remove(results)
    if improved:
        link_best(out)


def link_best(out):
    last, best = os.path.join(out, LAST), os.path.join(out, BEST)
    with replacing(best) as tmp:
        os.remove(tmp)
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copyfile(last, tmp)


def repair_run(out, state):
    """Make BEST consistent with the run's last checkpoint ``state`` after a kill at any
    instant: killed after LAST was written and before BEST was linked, LAST holds the best
    epoch and is linked now. (metrics.csv and curves.png are rewritten from the history by
    the caller; results.yaml is removed before any later checkpoint is saved.)"""
    best_epoch, best, last = state["best"]["epoch"], os.path.join(out, BEST), os.path.join(out, LAST)
    if not best_epoch:
        return
    if best_epoch == state["epoch"] and state.get("progress") is None:
        if not (os.path.exists(best) and os.path.samefile(best, last)):
            link_best(out)
        return
    held = load(best)["epoch"] if os.path.exists(best) else None
    if held != best_epoch:
        raise UserError(f"{best} holds {'no checkpoint' if held is None else f'epoch {held}'} but the run's best "
                        f"is epoch {best_epoch} (replaced or removed by hand); put it back, or start a new run")


def resolve(path):
    """A run directory stands for its best checkpoint (its last when it has no best)."""
    if os.path.isdir(path):
        best = os.path.join(path, BEST)
        return best if os.path.exists(best) else os.path.join(path, LAST)
    return path


def load_run(run_dir):
    """The last checkpoint of the run in ``run_dir``, for --resume (None without one)."""
    if not run_dir:
        return None
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: give the run's directory (the --output-dir it was trained into)"
                        + (", not a checkpoint file" if os.path.isfile(run_dir) else ""))
    if not os.path.exists(os.path.join(run_dir, LAST)):
        started = os.path.exists(os.path.join(run_dir, STARTED_ONLY[0]))
        raise UserError(f"--resume {run_dir}: no checkpoint in it; " + (
            "the run stopped before its first one: start it again with the command that made it, without --resume"
            if started else "give the --output-dir of a run"))
    return load(run_dir)


def load(path):
    """The checkpoint dict (a directory: its last), or UserError with one line for a
    missing, truncated or foreign file."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        with on_cpu():  # not into GPU memory, whatever device the run picks later
            state = paddle.load(path)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read ({unreadable_because(e)})")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {path} is not a checkpoint of ours (no model and config in it)")
    return state


def unreadable_because(error):
    """Why paddle.load failed, for a user: numpy's major version (numpy 2 pickles its
    arrays from numpy._core, which numpy 1 has not), or the error and the versions here."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("numpy"):
        return (f"No module named '{error.name}': it was saved under another numpy major version than this "
                f"numpy {np.__version__}; read it with the numpy and Paddle it was trained with")
    return (f"{type(error).__name__}; it is truncated, not a checkpoint of ours, or saved by another Paddle than "
            f"this {paddle.__version__}")


@contextlib.contextmanager
def on_cpu():
    """Run the block with Paddle's default place set to the CPU, then put it back."""
    before = paddle.get_device()
    paddle.set_device("cpu")
    try:
        yield
    finally:
        paddle.set_device(before)


# -------------------------------------------------------------------- models
def stem_of(cfg):
    """The stem a config means: ``auto`` is a CIFAR net's only one, and for resnet18..152
    the CIFAR stem on CIFAR's 32x32 images, the ImageNet one on an image folder."""
    if cfg.stem != "auto":
        return cfg.stem
    return "cifar" if cfg.model in models.CIFAR_ONLY or cfg.dataset != "folder" else "imagenet"


def build_model(cfg, num_classes):
    """The network a config names (every factory takes ``stem``)."""
    try:
        return models.get_model(cfg.model, num_classes=num_classes, stem=stem_of(cfg),
                                zero_init_residual=cfg.zero_init_residual)
    except ValueError as e:
        raise UserError(str(e).replace("use stem 'cifar'", "pass --stem cifar"))


def model_from_checkpoint(state):
    """(config, model): a fresh fp32 model of the checkpoint's config, its weights loaded strictly."""
    cfg = config.from_checkpoint(state)
    model = build_model(cfg, len(state["class_names"]))
    try:
        models.load_weights(model, state["model"])
    except models.weights.WeightsMismatchError as e:
        raise UserError(f"checkpoint does not match model {cfg.model}: {e}")
    return cfg, model


# ----------------------------------------------------------------- optimizer
def _rename_keys(state, mapping):
    """Rename optimizer-state keys ``<param name>_<accumulator>_<n>`` by a map of param names."""
    out = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):  # AMP O2
            out[key] = {mapping.get(k, k): v for k, v in value.items()}
            continue
        new = key
        for i in range(len(key) - 1, 0, -1):  # the longest prefix that is a parameter name
            if key[i] == "_" and key[:i] in mapping:
                new = mapping[key[:i]] + key[i:]
                break
        out[new] = value
    return out


def optimizer_state(opt, model):
    """opt.state_dict() keyed by structured names (``layer1.0.conv1.weight_velocity_0``):
    Paddle keys it by generated names (``conv2d_57.w_0``) that differ between two
    models built in one process, so a plain state dict only reloads in a fresh one."""
    return _rename_keys(opt.state_dict(), {p.name: k for k, p in model.named_parameters()})


def set_optimizer_state(opt, model, state):
    state = _rename_keys(state, {k: p.name for k, p in model.named_parameters()})
    params = {p.name: p for p in model.parameters()}  # the keys are the parameters' own names now
    masters = {}
    for key, master in state.get("master_weights", {}).items():  # AMP O2: fp32 master copies
        # load() made them on the CPU: each goes where its parameter is (GPU audit 2, N6),
        # named as this model's parameter would name it, since the optimizer names its
        # accumulators after the master tensor (GPU audit #12)
        master = paddle.to_tensor(master, place=params[key].place) if key in params else master
        master.name = key + "_fp32_master_0"
        masters[key] = master
    if masters:
        state = dict(state, master_weights=masters)
    opt.set_state_dict(state)


# ----------------------------------------------------------------------- RNG
def _cpu_generator():
    # what paddle.get_rng_state("cpu") reads; that call fails on Paddle 2.6 under
    # paddle.distributed.launch ('str' object has no attribute '_convert_to_place')
    return paddle.framework.core.default_cpu_generator()


def rng_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # keys as a list: paddle.save cannot store a uint32 array (nor bytes)
    return dict(python=random.getstate(), numpy=[name, keys.tolist(), pos, has_gauss, cached],
                paddle_cpu=_cpu_generator().get_state())


def set_rng_state(state):
    """Restore Python's, numpy's and Paddle's CPU generator. Only the CPU state is kept:
    a GPU's is one entry per visible device, and nothing in training draws from it.
    Checkpoints from before 2026-12 hold a list under "paddle" that may be GPU states (a
    GeneratorState does not say its device: GPU audit 2, N15): it is not restored."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(tuple(state["python"]))
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "paddle_cpu" in state:
        _cpu_generator().set_state(state["paddle_cpu"])


# ----------------------------------------------------------------- run state
@dataclasses.dataclass
class RunState:
    """Where a training run is. ``step``..``correct`` describe the epoch in progress: they
    are non-zero in a checkpoint only when the run was interrupted inside an epoch."""
    epoch: int = 0                     # epochs finished
    iteration: int = 0                 # optimizer steps taken
    history: list = dataclasses.field(default_factory=list)  # one metrics row per finished epoch
    best: dict = dataclasses.field(default_factory=lambda: dict(val_acc=-1.0, epoch=0))
    step: int = 0                      # batches done in the current epoch
    seen: int = 0                      # images done in the current epoch
    loss_sum: object = 0.0             # sum of loss x batch size (a device tensor while training)
    correct: object = 0
    overflows: object = 0              # fp16 steps in a row whose loss overflowed (not saved)
    replanned: list = dataclasses.field(default_factory=list)  # schedule keys a resume changed

    def end_epoch(self, row):
        """Close the epoch whose metrics are ``row``; True when its val accuracy is a new best."""
        improved = row["val_acc"] != "" and row["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = dict(val_acc=row["val_acc"], epoch=row["epoch"])
        self.history.append(row)
        self.epoch = row["epoch"]
        self.step, self.seen, self.loss_sum, self.correct = 0, 0, 0.0, 0
        return improved

    def progress(self):
        """The in-epoch position as a checkpoint stores it: None at an epoch boundary."""
        if self.step == 0:
            return None
        return dict(step=self.step, seen=self.seen, loss_sum=as_number(self.loss_sum),
                    correct=as_number(self.correct), iteration=self.iteration)


def as_number(x):
    """A Python number from a number or a one-element tensor (a device sync for a GPU tensor)."""
    return x.item() if isinstance(x, paddle.Tensor) else x


def fp32_state_dict(model):
    """model.state_dict() with each fp16/bf16 tensor cast to fp32 once (the AMP O2 weights).
    decorate's save hooks would do it too, but a hook on every sublayer casts the whole
    dictionary gathered so far: 20,662 casts a call for ResNet-50 (GPU audit 2, N12)."""
    low = (paddle.float16, paddle.bfloat16)
    return {k: v.astype("float32") if v.dtype in low else v for k, v in model.state_dict(use_hook=False).items()}


def recorded_config(cfg):
    """The config as a checkpoint records it: the data paths absolute, so that eval.py and
    --resume find the data from any folder."""
    values = config.to_dict(cfg)
    for key in ("data_file", "data_dir"):
        if values.get(key):
            values[key] = os.path.abspath(values[key])
    return values


def run_state(run, model, opt, sched, scaler, cfg, class_names, extra=None, world_size=1):
    """The checkpoint dict of a training run; ``model`` is the plain network (no wrapper)."""
    return dict(model=fp32_state_dict(model), optimizer=optimizer_state(opt, model), scheduler=sched.state_dict(),
                scaler=scaler.state_dict() or None, epoch=run.epoch, progress=run.progress(),
                history=run.history, best=run.best, rng=rng_state(), config=recorded_config(cfg),
                class_names=list(class_names), paddle_version=paddle.__version__, world_size=world_size,
                **(extra or {}))


def check_same_world(state, world_size, run_dir):
    """A run resumes with the number of processes it was trained by: another number would
    change the global batch, the --scale-lr learning rate and the schedule's length, and
    a mid-epoch position would skip other images (GPU audit 2, N5). A checkpoint from
    before world_size was recorded cannot tell: it resumes as before."""
    saved = state.get("world_size")
    if saved is None or saved == world_size:
        return
    how = (f"python -m paddle.distributed.launch --nproc_per_node {saved} ... --resume {run_dir}"
           if saved > 1 else "in one process, without the launcher")
    raise UserError(f"--resume {run_dir}: the run was trained by {saved} process{'es' if saved > 1 else ''} and "
                    f"this is {world_size}; another count would change the global batch ({saved} x "
                    f"{state['config']['batch_size']}), the learning rate with --scale-lr and the schedule: "
                    f"resume it the same way ({how}), or start a new run")


def check_same_classes(state, class_names, cfg):
    """A resumed run trains on the classes it started with: a data folder whose classes
    differ would continue training under the old names (a silent relabel)."""
    saved = list(state["class_names"])
    if saved != list(class_names):
        where = f"--data-dir {cfg.data_dir}" if getattr(cfg, "data_dir", "") else "the data"
        raise UserError(f"{where} has the classes {', '.join(class_names)}, the run was trained on "
                        f"{', '.join(saved)}; --resume cannot change the classes: point --data-dir at the run's "
                        "images, or start a new run")


def repair_record(cfg, state, run):
    """What a kill at any instant may have left half-done, made consistent with the last
    checkpoint: BEST (repair_run), metrics.csv and curves.png rewritten from its
    history (results.yaml cannot be stale: checkpoint.save_run removes it first)."""
    repair_run(cfg.output_dir, state)
    if run.history:
        metrics.write_record(cfg, run.history)


def restore_run(state, cfg, model, opt, sched, scaler):
    """Load a checkpoint into the run's model, optimizer, scheduler, scaler and RNGs;
    returns its RunState. When ``cfg`` changes the schedule (a longer --epochs, a new
    --lr), ``sched`` is the new plan stepped to where the run is, as if it had been
    started with it; ``run.replanned`` says so."""
    models.load_weights(model, state["model"])
    replanned = [k for k in config.RESUME_SCHEDULE if state["config"].get(k) != getattr(cfg, k)]
    history, progress = state["history"], state.get("progress")
    iteration = progress["iteration"] if progress else history[-1]["iteration"] if history else 0
    if replanned:
        for _ in range(iteration):  # the fit loop steps the scheduler once per iteration
            sched.step()
        # the optimizer's state carries the old schedule's position: give it the new one
        state = dict(state, optimizer=dict(state["optimizer"], LR_Scheduler=sched.state_dict()))
    else:
        sched.set_state_dict(state["scheduler"])
    set_optimizer_state(opt, model, state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run = RunState(epoch=state["epoch"], history=history, best=state["best"], iteration=iteration,
                   replanned=replanned)
    if progress:
        run.step, run.seen, run.loss_sum, run.correct = (progress[k] for k in ("step", "seen", "loss_sum", "correct"))
    return run

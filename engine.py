"""The training loop shared by train_cifar10.py, finetune.py and the experiments.

Read top to bottom: devices, optimizer and schedule, checkpoints, one epoch,
evaluation, and ``fit`` which ties them together with progress, metrics.csv,
curves.png, best/last checkpoints and exact resume.
"""
import csv
import dataclasses
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml

import models
import config
from config import make_config, save_yaml, to_dict

LAST, BEST = "last.pdckpt", "best.pdckpt"
# Paddle's BatchNorm warns on every call in training mode that it tracks statistics
warnings.filterwarnings("ignore", message="When training, we now always track")


class RunError(RuntimeError):
    """A problem the user can fix: the message is one line naming it and the fix."""


def rank():
    """This process's rank under paddle.distributed.launch (0 when run alone)."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


def log(*args):
    if rank() == 0:  # under launch, only rank 0 prints
        print(*args, flush=True)  # flush: progress must reach logs under nohup/CI at once


# ---------------------------------------------------------------------------- device
def select_device(name):
    """'auto' (GPU when this Paddle has one), 'cpu' or 'gpu' -> the device set."""
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if name == "gpu" and not has_gpu:
        raise RunError("--device gpu: this Paddle has no usable GPU (CPU build or no CUDA device); "
                       "use --device cpu, or install paddlepaddle-gpu")
    device = "gpu" if name == "gpu" or (name == "auto" and has_gpu) else "cpu"
    paddle.set_device(device)
    return device


LAUNCH_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT")


def init_distributed():
    """(world_size, rank). Under ``python -m paddle.distributed.launch`` (which sets the
    PADDLE_* variables) this joins the process group; run alone it returns (1, 0).
    A half-set-up environment would hang in init_parallel_env: it is an error instead."""
    present = [k for k in LAUNCH_ENV if os.environ.get(k)]
    if not present:
        return 1, 0
    missing = [k for k in LAUNCH_ENV if k not in present]
    if missing:
        raise RunError(f"half-set-up distributed environment: {', '.join(present)} set but {', '.join(missing)} "
                       "not; start with python -m paddle.distributed.launch, or unset the PADDLE_* variables")
    world, me = int(os.environ["PADDLE_TRAINERS_NUM"]), int(os.environ["PADDLE_TRAINER_ID"])
    endpoints = os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")
    if not 0 <= me < world or len(endpoints) != world:
        raise RunError(f"inconsistent distributed environment: rank {me}, world size {world}, "
                       f"{len(endpoints)} endpoints; start with python -m paddle.distributed.launch")
    if world == 1:
        return 1, 0
    import paddle.distributed as dist
    dist.init_parallel_env()
    return dist.get_world_size(), dist.get_rank()


def all_sum(values, world_size):
    """Sum a float64 numpy array over all ranks (a no-op when alone)."""
    values = np.asarray(values, dtype=np.float64)
    if world_size == 1:
        return values
    import paddle.distributed as dist
    t = paddle.to_tensor(values)
    dist.all_reduce(t)
    return t.numpy()


def replicas_agree(model, world_size):
    """Max difference across ranks of a fingerprint (sum and sum of squares) of every
    parameter, trainable and BN statistics separately: DataParallel keeps the trainable
    weights identical; each rank's BN running statistics follow its own batches."""
    import paddle.distributed as dist
    groups = {"trainable": [], "bn_stats": []}
    for name, p in model.named_parameters():
        x = p.astype("float64")
        groups["bn_stats" if name.endswith(("_mean", "_variance")) else "trainable"] += [x.sum().item(), (x * x).sum().item()]
    out = {}
    for key, values in groups.items():
        t = paddle.to_tensor(np.asarray(values, dtype=np.float64))
        gathered = []
        dist.all_gather(gathered, t)
        stacked = np.stack([g.numpy() for g in gathered])
        out[key] = float(np.abs(stacked - stacked[0]).max()) if stacked.size else 0.0
    return out


def build_model(cfg, num_classes):
    """The network a config names; ``stem`` applies to the ImageNet-family factories."""
    kwargs = dict(num_classes=num_classes, zero_init_residual=cfg.zero_init_residual)
    if cfg.model in models.STEM_MODELS:
        kwargs["stem"] = cfg.stem
    try:
        return models.get_model(cfg.model, **kwargs)
    except ValueError as e:
        raise RunError(str(e))


# ------------------------------------------------------------- optimizer, schedule
def total_iterations(cfg, iters_per_epoch):
    total = cfg.epochs * iters_per_epoch
    return min(total, cfg.max_iters) if cfg.max_iters else total


def build_optimizer(cfg, parameters, iters_per_epoch, lr_scale=1):
    """(optimizer, LR scheduler). The scheduler is stepped once per iteration.
    lr_scale: the linear scaling rule (Goyal et al. 2017) for a larger global batch."""
    total = total_iterations(cfg, iters_per_epoch)
    cfg = dataclasses.replace(cfg, lr=cfg.lr * lr_scale)
    if cfg.schedule == "cosine":
        sched = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=max(total - cfg.warmup_iters, 1))
    elif cfg.schedule == "step":
        values = [cfg.lr * cfg.gamma ** i for i in range(len(cfg.milestones) + 1)]
        sched = paddle.optimizer.lr.PiecewiseDecay(boundaries=list(cfg.milestones), values=values)
    else:
        sched = paddle.optimizer.lr.LambdaDecay(cfg.lr, lr_lambda=lambda it: 1.0)
    if cfg.warmup_iters:
        sched = paddle.optimizer.lr.LinearWarmup(sched, cfg.warmup_iters, 0.0, cfg.lr)
    if cfg.optimizer == "sgd":
        opt = paddle.optimizer.Momentum(learning_rate=sched, momentum=cfg.momentum, parameters=parameters,
                                        use_nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        opt = paddle.optimizer.Adam(learning_rate=sched, parameters=parameters, weight_decay=cfg.weight_decay)
    return opt, sched


# --------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state):
    """Write atomically: a temporary file, then a rename, so a crash never leaves half a file."""
    tmp = path + ".tmp"
    paddle.save(state, tmp)
    os.replace(tmp, path)


def resolve_ckpt(path):
    """A run directory stands for its best checkpoint (its last when it has no best)."""
    if os.path.isdir(path):
        best = os.path.join(path, BEST)
        return best if os.path.exists(best) else os.path.join(path, LAST)
    return path


def load_checkpoint(path):
    """The checkpoint dict, or RunError with one line for a missing, truncated or foreign file."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path}: no such file")
    try:
        state = paddle.load(path)
    except Exception as e:
        raise RunError(f"checkpoint {path} could not be read ({type(e).__name__}); it is truncated or not a checkpoint of ours")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise RunError(f"checkpoint {path} is not a checkpoint of ours (no model and config in it)")
    return state


def config_from_checkpoint(state):
    cls = config.FinetuneConfig if "data_dir" in state["config"] else config.TrainConfig
    return make_config(state["config"], cls=cls)


def model_from_checkpoint(state):
    """(config, model): the model a checkpoint's config names, its weights loaded strictly."""
    cfg = config_from_checkpoint(state)
    model = build_model(cfg, len(state["class_names"]))
    try:
        models.load_weights(model, state["model"])
    except models.weights.WeightsMismatchError as e:
        raise RunError(f"checkpoint does not match model {cfg.model}: {e}")
    return cfg, model


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
    opt.set_state_dict(_rename_keys(state, {k: p.name for k, p in model.named_parameters()}))


def rng_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # keys as a list: paddle.save cannot store a uint32 array (nor bytes)
    return dict(python=random.getstate(), numpy=[name, keys.tolist(), pos, has_gauss, cached],
                paddle=paddle.get_rng_state())


def set_rng_state(state):
    name, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(tuple(state["python"]))
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    paddle.set_rng_state(state["paddle"])


def run_config(args, cls, model=None):
    """(cfg, resume_state) for a script's parsed ``args``: defaults <- --config FILE <-
    command-line keys. With --resume DIR the run's saved config is the base instead, and
    keys given on the command line (a longer --epochs, say) apply on top."""
    overrides = config.cli_overrides(args, cls)
    if model is not None:
        overrides["model"] = model
    if getattr(args, "resume", None):
        state = load_checkpoint(args.resume)
        overrides["output_dir"] = args.resume
        return make_config(overrides, base=make_config(state["config"], cls=cls)), state
    values = config.load_yaml(args.config) if args.config else {}
    return make_config({**values, **overrides}, cls=cls), None


def add_run_arguments(parser, cls, depths):
    parser.add_argument("--config", help="a YAML recipe from configs/; command-line keys override it")
    parser.add_argument("--depth", type=int, choices=sorted(depths), help="shorthand for --model")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    config.add_config_arguments(parser, cls)


# ----------------------------------------------------------------------- data loading
def _shm_ok(num_workers):
    """Paddle's DataLoader passes batches through /dev/shm; AI Studio gives it 64 MB, and
    the workers then die with a bus error. Use pipes instead when it is small."""
    if num_workers == 0 or not os.path.isdir("/dev/shm"):
        return True
    if shutil.disk_usage("/dev/shm").total < 512 * 2 ** 20:
        if not _shm_ok.noticed:  # a loader is made every epoch: say it once
            log("notice: /dev/shm is smaller than 512 MB; DataLoader uses use_shared_memory=False")
            _shm_ok.noticed = True
        return False
    return True


_shm_ok.noticed = False


def make_loader(dataset, batch_size, num_workers, batches=None):
    """A DataLoader over ``batches`` (lists of indices) or, when None, in order."""
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return paddle.io.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                use_shared_memory=_shm_ok(num_workers))


def epoch_batches(dataset, cfg, epoch, world_size=1, rank=0):
    """This rank's batches for ``epoch``: DistributedBatchSampler's shard, shuffled by (seed, epoch)."""
    sampler = paddle.io.DistributedBatchSampler(dataset, cfg.batch_size, num_replicas=world_size,
                                                rank=rank, shuffle=True, drop_last=False)
    sampler.set_epoch((cfg.seed * 1_000_003 + epoch) % 2 ** 32)  # it seeds RandomState(epoch)
    return list(sampler)


# --------------------------------------------------------------------------- evaluate
def eval_loader(dataset, batch_size, num_workers, world_size=1, rank=0):
    """This rank's share of ``dataset`` for evaluation: every world_size-th sample, no
    padding (DistributedBatchSampler pads with repeats, which would count twice)."""
    shard = list(range(rank, len(dataset), world_size))
    return make_loader(dataset, batch_size, num_workers,
                       [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)])


@paddle.no_grad()
def evaluate(model, loader, num_classes, world_size=1):
    """Top-1/top-5 accuracy, mean loss and the confusion matrix (rows: true, cols: predicted),
    summed over the ranks' shards when world_size > 1. ``model``: a Layer, or any callable
    from an image batch to logits (an inference-model predictor)."""
    if isinstance(model, paddle.nn.Layer):
        model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, top5, n = 0.0, 0, 0
    start = time.time()
    for images, labels in loader:
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, num_classes)
        topk = paddle.topk(logits, k, axis=-1)[1].numpy()
        y = labels.numpy().reshape(-1)
        top5 += int((topk == y[:, None]).any(axis=1).sum())
        np.add.at(confusion, (y, topk[:, 0]), 1)
        n += len(y)
    seconds = time.time() - start
    if world_size > 1:
        summed = all_sum(np.concatenate([confusion.ravel(), [loss_sum, top5, n]]), world_size)
        confusion = summed[:-3].round().astype(np.int64).reshape(confusion.shape)
        loss_sum, top5, n = summed[-3], int(round(summed[-2])), int(round(summed[-1]))
    correct = np.trace(confusion)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return dict(n=n, loss=loss_sum / max(n, 1), top1=float(correct / max(n, 1)), top5=top5 / max(n, 1),
                per_class=per_class.tolist(), confusion=confusion, seconds=seconds,
                images_per_s=n / seconds if seconds > 0 else float("nan"))


# ------------------------------------------------------------------------ one epoch
def train_one_epoch(model, loader, opt, sched, cfg, ctx, epoch, progress):
    """Train over ``loader``; ``progress`` carries the running sums and the iteration
    count (it is saved in a Ctrl-C checkpoint, so a resumed epoch adds up the same)."""
    model.train()
    steps = len(loader) + progress["step"]
    t0, seen0 = time.time(), progress["seen"]
    for images, labels in loader:
        with paddle.amp.auto_cast(enable=ctx["amp"], level=cfg.amp_level, dtype=cfg.amp_dtype):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if ctx["scaler"] is not None:
            ctx["scaler"].scale(loss).backward()
            ctx["scaler"].step(opt)
            ctx["scaler"].update()
        else:
            loss.backward()
            opt.step()
        opt.clear_grad()
        sched.step()
        n = labels.shape[0]
        # accumulate on the device; .item() (a GPU sync) only when printing
        progress["loss_sum"] = progress["loss_sum"] + loss.detach() * n
        progress["correct"] = progress["correct"] + (logits.argmax(-1) == labels.reshape([-1])).astype("int64").sum()
        progress["seen"] += n
        progress["step"] += 1
        progress["iteration"] += 1
        if progress["step"] % cfg.log_every == 0 or progress["step"] == steps:
            elapsed = time.time() - t0
            rate = (progress["seen"] - seen0) / elapsed if elapsed > 0 else float("nan")
            eta = elapsed / max(progress["step"] - (steps - len(loader)), 1) * (steps - progress["step"])
            log(f"epoch {epoch + 1} step {progress['step']}/{steps} "
                f"loss {as_number(progress['loss_sum']) / progress['seen']:.4f} "
                f"acc {as_number(progress['correct']) / progress['seen']:.4f} "
                f"{rate:.1f} img/s eta {format_seconds(eta)}")
        if ctx["max_iters"] and progress["iteration"] >= ctx["max_iters"]:
            break


def as_number(x):
    return x.item() if isinstance(x, paddle.Tensor) else x


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------ metrics and plot
FIELDS = ["epoch", "iteration", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "train_img_per_s"]


def write_metrics(path, history):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def plot_curves(path, history, title=""):
    """Loss and accuracy per epoch, train vs val, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax1), ("acc", ax2)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        val = [h[f"val_{key}"] for h in history]
        if not all(v == "" for v in val):
            ax.plot(epochs, val, "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ------------------------------------------------------------------------------ fit
def fit(cfg, datasets, class_names, resume_state=None, model=None, parameters=None, extra_state=None):
    """Train ``cfg.epochs`` on datasets['train'], select on datasets['val'] (if any),
    then report datasets['test'] for the final and the best model.

    model/parameters: a prepared model (fine-tuning) and the parameters to train;
    by default the model cfg names, all parameters. extra_state: saved in checkpoints.
    Returns a dict with the final and best test results and the history.
    """
    device = select_device(cfg.device)
    if cfg.amp and device != "gpu":
        raise RunError("--amp needs a GPU: Paddle's CPU kernels have no fp16/bf16 path; drop --amp")
    world, me = init_distributed()
    if cfg.sync_bn and device != "gpu" and world > 1:
        raise RunError("--sync-bn needs GPUs: Paddle has no CPU kernel for SyncBatchNorm; drop --sync-bn")
    main_rank = me == 0
    out = cfg.output_dir
    if resume_state is None and os.path.exists(os.path.join(out, LAST)):
        raise RunError(f"{out} already holds a run; continue it with --resume {out}, or pick a new --output-dir")
    os.makedirs(out, exist_ok=True)
    num_classes = len(class_names)
    paddle.seed(cfg.seed)  # the model's initial weights
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None:
        model = build_model(cfg, num_classes)
    if parameters is None:
        parameters = [p for p in model.parameters() if not p.stop_gradient]
    train_set, val_set, test_set = datasets["train"], datasets.get("val"), datasets.get("test")
    global_batch = cfg.batch_size * world
    iters_per_epoch = math.ceil(len(train_set) / global_batch)
    opt, sched = build_optimizer(cfg, parameters, iters_per_epoch, lr_scale=world if cfg.scale_lr else 1)
    scaler = paddle.amp.GradScaler() if cfg.amp and cfg.amp_dtype == "float16" else None

    start_epoch, history, best = 0, [], dict(val_acc=-1.0, epoch=0)
    progress = None
    if resume_state is not None:
        models.load_weights(model, resume_state["model"])
        set_optimizer_state(opt, model, resume_state["optimizer"])
        sched.set_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, history, best = resume_state["epoch"], resume_state["history"], resume_state["best"]
        progress = resume_state.get("progress")  # set when interrupted inside an epoch
        set_rng_state(resume_state["rng"])
        log(f"resumed from {out} at epoch {start_epoch + 1}" + (f", step {progress['step']}" if progress else ""))
    # ``model`` stays the plain network: its state dict has no wrapper prefix, so a
    # checkpoint from a launch loads in a single process and the other way round
    net = model
    if world > 1 and cfg.sync_bn:  # same parameter objects, so the optimizer still holds them
        model = net = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.amp and cfg.amp_level == "O2":  # low-precision weights, fp32 master weights in the optimizer
        net, opt = paddle.amp.decorate(models=net, optimizers=opt, level="O2", dtype=cfg.amp_dtype,
                                       save_dtype="float32")
    if cfg.to_static:
        net = paddle.jit.to_static(net)  # same parameters: checkpoints are unchanged
    if world > 1:
        net = paddle.DataParallel(net)  # broadcasts rank 0's weights, all-reduces gradients
    ctx = dict(amp=cfg.amp, scaler=scaler, max_iters=cfg.max_iters)
    if main_rank:
        save_yaml(cfg, os.path.join(out, "config.yaml"))
    n_train = sum(int(np.prod(p.shape)) for p in parameters)
    log(f"model {cfg.model}: {n_train:,} trainable parameters | device {device} x {world} | "
        f"train {len(train_set)} val {len(val_set) if val_set else 0} test {len(test_set) if test_set else 0} | "
        f"batch {cfg.batch_size} per device, global batch {global_batch}, {iters_per_epoch} iterations/epoch, "
        f"{cfg.epochs} epochs, lr {opt.get_lr():g}")

    def state(epoch, progress=None):
        return dict(model=model.state_dict(), optimizer=optimizer_state(opt, model), scheduler=sched.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch,
                    progress=progress, history=history, best=best, rng=rng_state(),
                    config=to_dict(cfg), class_names=list(class_names),
                    paddle_version=paddle.__version__, **(extra_state or {}))

    eval_bs = max(cfg.batch_size, 256)
    has_val = val_set is not None and len(val_set) > 0
    val_loader = eval_loader(val_set, eval_bs, cfg.num_workers, world, me) if has_val else None
    device_loader = None
    if cfg.loader == "device":
        from data import DeviceCifarLoader
        device_loader = DeviceCifarLoader(train_set, cfg.augment, cfg.seed)
    run_start, epoch_times = time.time(), []
    iteration = history[-1]["iteration"] if history else 0
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.max_iters and iteration >= cfg.max_iters:
                break
            t0 = time.time()
            if progress is None:
                progress = dict(step=0, seen=0, loss_sum=0.0, correct=0, iteration=iteration)
            train_set.set_epoch(epoch)
            batches = epoch_batches(train_set, cfg, epoch, world, me)[progress["step"]:]
            if device_loader is not None:
                loader = device_loader.epoch(epoch, batches)
            else:
                loader = make_loader(train_set, cfg.batch_size, cfg.num_workers, batches)
            train_one_epoch(net, loader, opt, sched, cfg, ctx, epoch, progress)
            iteration = progress["iteration"]
            train_time = time.time() - t0
            loss_sum, correct, seen = all_sum([as_number(progress["loss_sum"]), as_number(progress["correct"]),
                                               progress["seen"]], world)
            row = dict(epoch=epoch + 1, iteration=iteration, lr=opt.get_lr(), train_loss=loss_sum / seen,
                       train_acc=correct / seen, val_loss="", val_acc="",
                       train_img_per_s=seen / train_time if train_time > 0 else "")
            progress = None
            if val_loader is not None:
                v = evaluate(model, val_loader, num_classes, world)
                row.update(val_loss=v["loss"], val_acc=v["top1"])
            row["epoch_time_s"] = time.time() - t0
            history.append(row)
            epoch_times.append(row["epoch_time_s"])
            improved = val_loader is not None and row["val_acc"] > best["val_acc"]
            if improved:
                best = dict(val_acc=row["val_acc"], epoch=epoch + 1)
            if main_rank:
                save_checkpoint(os.path.join(out, LAST), state(epoch + 1))
                if improved:
                    save_checkpoint(os.path.join(out, BEST), state(epoch + 1))
                write_metrics(os.path.join(out, "metrics.csv"), history)
                plot_curves(os.path.join(out, "curves.png"), history, title=f"{cfg.model}")
            left = cfg.epochs - epoch - 1
            if cfg.max_iters:
                left = min(left, math.ceil(max(cfg.max_iters - iteration, 0) / iters_per_epoch))
            val_text = f"val loss {row['val_loss']:.4f} val acc {row['val_acc']:.4f} | " if val_loader else ""
            log(f"epoch {epoch + 1}/{cfg.epochs} done in {format_seconds(row['epoch_time_s'])} | "
                f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | {val_text}"
                f"lr {row['lr']:.5f} | run eta {format_seconds(np.mean(epoch_times) * left)}")
    except KeyboardInterrupt:
        if main_rank and progress is not None and progress["step"] > 0 and world == 1:
            progress = dict(progress, loss_sum=as_number(progress["loss_sum"]), correct=as_number(progress["correct"]))
            save_checkpoint(os.path.join(out, LAST), state(epoch, progress))
        # under launch a mid-epoch position is not saved: the ranks' sums are not reduced
        if os.path.exists(os.path.join(out, LAST)):
            log(f"\ninterrupted: checkpoint in {os.path.join(out, LAST)}; continue with --resume {out}")
        else:
            log("\ninterrupted before the first step: nothing to save")
        sys.exit(130)

    log(f"training done in {format_seconds(time.time() - run_start)}")
    if world > 1:
        agree = replicas_agree(model, world)
        log(f"replicas: trainable weights differ across {world} ranks by at most {agree['trainable']:g}; "
            f"BN running statistics by {agree['bn_stats']:g} (each rank's own batches; rank 0's are saved)")
        import paddle.distributed as dist
        dist.barrier()  # rank 0's best checkpoint is on disk before anyone reads it
    return final_report(cfg, model, test_set, num_classes, out, best, history, world, me)


def final_report(cfg, model, test_set, num_classes, out, best, history, world=1, me=0):
    """Write results.yaml: the last epoch's figures, and the test accuracy of the final
    and of the best-on-validation model (reported, never used to choose)."""
    last = history[-1]
    result = dict(model=cfg.model, epochs=last["epoch"], iterations=last["iteration"],
                  train_time_s=sum(h["epoch_time_s"] for h in history),
                  final_train_loss=last["train_loss"], final_train_acc=last["train_acc"],
                  final_val_acc=last["val_acc"] if last["val_acc"] != "" else None,
                  best_epoch=best["epoch"] or None, best_val_acc=best["val_acc"] if best["epoch"] else None)
    if test_set is not None and len(test_set):
        loader = eval_loader(test_set, max(cfg.batch_size, 256), cfg.num_workers, world, me)
        final = evaluate(model, loader, num_classes, world)
        result["final_test_acc"] = final["top1"]
        log(f"final model (epoch {last['epoch']}): test acc {final['top1']:.4f}")
        if best["epoch"]:
            b = final
            if best["epoch"] != last["epoch"]:  # else the best model is the final one
                models.load_weights(model, load_checkpoint(os.path.join(out, BEST))["model"])
                b = evaluate(model, loader, num_classes, world)
            result["best_test_acc"] = b["top1"]
            log(f"best model (epoch {best['epoch']}, chosen on val acc {best['val_acc']:.4f}): test acc {b['top1']:.4f}")
    if me != 0:
        return result
    path = os.path.join(out, "results.yaml")  # its presence marks a finished run: write atomically
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump({k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()}, f, sort_keys=False)
    os.replace(path + ".tmp", path)
    return result

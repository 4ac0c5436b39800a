"""The training loop shared by train_cifar10.py, finetune.py and degradation.py.

Read top to bottom: launch (one process, or several under paddle.distributed.launch),
optimizer and schedule, one training epoch, evaluation, and ``fit``: set up, restore,
wrap for training, loop over epochs, report. What a run saves is in checkpoint.py,
how batches are made in data.py, the options in config.py.
"""
import dataclasses
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import paddle
import paddle.nn.functional as F

import checkpoint
import config
import data
import device as devices
import files
import launch
import metrics
import models
import onednn_conv
from checkpoint import as_number
from config import UserError

# Paddle's BatchNorm warns on every call in training mode that it tracks statistics
warnings.filterwarnings("ignore", message="When training, we now always track")


def log(*args):
    if launch.rank() == 0:  # under launch, only rank 0 prints
        try:
            print(*args, flush=True)  # flush: progress must reach logs under nohup/CI at once
        except BrokenPipeError:  # `train_cifar10.py | head` closed our stdout: train on, say nothing
            config.quiet_stdout()


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


# ------------------------------------------------------------------------ one epoch
def train_one_epoch(train_net, loader, opt, sched, scaler, cfg, run, epoch, board=None, world=1, estimate=None):
    """Train over ``loader``, adding to ``run`` (a checkpoint.RunState) the epoch's running
    sums and position, so that an epoch resumed after Ctrl-C adds up the same.
    ``scaler``: a GradScaler, a pass-through when disabled (no fp16). ``board``: a
    VisualDL LogWriter or None. ``world``: the number of ranks (they stop together).
    ``estimate``: a RunEstimate, told of every step."""
    train_net.train()
    steps = run.step + len(loader)  # this epoch's batches, the ones done before a resume included
    t0, seen0, step0 = time.time(), run.seen, run.step
    autocast = cfg.amp and not paddle.get_device().startswith("cpu")  # on the CPU bf16 is onednn_conv/'s
    for images, labels in loader:
        with paddle.amp.auto_cast(enable=autocast, level=cfg.amp_level, dtype=cfg.amp_dtype):
            logits = train_net(images)
        loss = loss_of(logits, labels, cfg.label_smoothing)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.clear_grad()
        sched.step()
        n = labels.shape[0]
        # summed on the device in fp32, read (a device sync) only every --log-every steps:
        # on 3.x nothing else syncs a fp32 or bf16 step; fp16's GradScaler does (`if found_inf`)
        add_step_loss(run, loss.detach() * n, skip_overflow=scaler.is_enable())
        run.correct = run.correct + (logits.argmax(-1) == labels.reshape([-1])).astype("int64").sum()
        run.seen, run.step, run.iteration = run.seen + n, run.step + 1, run.iteration + 1
        if estimate is not None:
            estimate.step(run.iteration)
        if run.step % cfg.log_every == 0 or run.step == steps:
            check_finite(run, epoch, cfg, world=world)
            elapsed = time.time() - t0
            rate = (run.seen - seen0) / elapsed if elapsed > 0 else float("nan")
            eta = elapsed / max(run.step - step0, 1) * (steps - run.step)
            loss, acc = as_number(run.loss_sum) / run.seen, as_number(run.correct) / run.seen
            log(f"epoch {epoch + 1} step {run.step}/{steps} loss {loss:.4f} acc {acc:.4f} {rate:.1f} img/s "
                f"eta {format_seconds(eta)}")
            metrics.write_scalars(board, "step", dict(train_loss=loss, train_acc=acc, lr=opt.get_lr()), run.iteration)
        if cfg.max_iters and run.iteration >= cfg.max_iters:
            break


MAX_OVERFLOWS = 20  # fp16 steps in a row that overflow: the GradScaler has halved its scale 20 times


def add_step_loss(run, loss_times_n, skip_overflow=False):
    """Add a step's loss x batch size to the epoch's sum. ``skip_overflow`` (fp16 with the
    GradScaler, which skips such a step and lowers its scale): a step whose loss overflowed
    is left out and counted in ``run.overflows`` (steps in a row), all on the device, so
    that one overflow does not stop the run as diverged (GPU audit 2, N11)."""
    if not skip_overflow:
        run.loss_sum = run.loss_sum + loss_times_n
        return
    finite = paddle.isfinite(loss_times_n)
    run.loss_sum = run.loss_sum + paddle.where(finite, loss_times_n, paddle.zeros_like(loss_times_n))
    run.overflows = (run.overflows + 1) * (~finite).astype("int64")


def check_finite(run, epoch, cfg, model=None, world=1):
    """Stop the run with one line when the loss (or, given ``model``, a weight) is no longer
    a finite number, or fp16 steps overflowed MAX_OVERFLOWS times in a row (a diverged
    run): nothing of this epoch is saved, so the last checkpoint stays the last good one
    and never becomes 'best'. Under launch every rank stops when one does."""
    loss = as_number(run.loss_sum)
    if int(as_number(run.overflows)) >= MAX_OVERFLOWS:
        loss = float("inf")
    if model is not None and np.isfinite(loss):
        weights = paddle.add_n([p.astype("float32").abs().sum() for p in model.parameters()]).item()
        loss = loss if np.isfinite(weights) else weights
    if world > 1 and launch.all_sum([not np.isfinite(loss)], world)[0] and np.isfinite(loss):
        raise UserError(f"another rank's training loss became inf or nan at epoch {epoch + 1} step {run.step}: "
                        f"the run diverged; lower --lr (it is {cfg.lr:g}) and start again (its log says more)")
    if not np.isfinite(loss):
        last = os.path.join(cfg.output_dir, checkpoint.LAST)
        kept = (f"the last good checkpoint, {last}, is kept (epoch {run.epoch})" if os.path.exists(last)
                else "nothing was saved")
        what = (f"the training loss became {loss}" if not np.isfinite(as_number(run.loss_sum)) else
                f"the fp16 loss overflowed {MAX_OVERFLOWS} steps in a row" if int(as_number(run.overflows)) else
                f"the sum of the weights became {loss}")
        raise UserError(f"{what} at epoch {epoch + 1} step {run.step}: the run diverged; "
                        f"lower --lr (it is {cfg.lr:g}) and start again; {kept}")


def loss_of(logits, labels, label_smoothing=0.0):
    """Cross-entropy in fp32 whatever the logits' dtype: under AMP O2 the logits are fp16,
    an fp16 loss makes the epoch's running sum overflow (65504) and the first 2**16 loss
    scale inf in backward (GPU audit #2 and #11)."""
    return F.cross_entropy(logits.astype("float32"), labels, label_smoothing=label_smoothing)


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


# --------------------------------------------------------------------------- evaluate
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
        summed = launch.all_sum(np.concatenate([confusion.ravel(), [loss_sum, top5, n]]), world_size)
        confusion = summed[:-3].round().astype(np.int64).reshape(confusion.shape)
        loss_sum, top5, n = summed[-3], int(round(summed[-2])), int(round(summed[-1]))
    correct = np.trace(confusion)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return dict(n=n, loss=loss_sum / max(n, 1), top1=float(correct / max(n, 1)), top5=top5 / max(n, 1),
                per_class=per_class.tolist(), confusion=confusion, seconds=seconds,
                images_per_s=n / seconds if seconds > 0 else float("nan"))


# ------------------------------------------------------------------------------ fit
def fit(cfg, loaded, resume_state=None, model=None, parameters=None):
    """Train ``cfg.epochs`` on the train split of ``loaded`` (data.load(cfg)), select on
    its val split (if any), then report its test split for the final and the best model.

    model/parameters: a prepared model (fine-tuning) and the parameters to train;
    by default the model cfg names, all parameters. Returns the dict written to
    results.yaml. The run directory is locked meanwhile (one writer per run; files.lock).
    """
    device, world, rank, plan = set_up(cfg)
    checkpoint.prepare_run_dir(cfg.output_dir, resuming=resume_state is not None, writer=rank == 0)
    try:
        return train_and_report(cfg, loaded, device, world, rank, plan, resume_state, model, parameters)
    finally:
        files.unlock(cfg.output_dir)


def train_and_report(cfg, loaded, device, world, rank, plan, resume_state, model, parameters):
    """fit's body, in the locked run directory: set up, restore, wrap for training, loop over epochs, report."""
    # set up
    out, datasets, class_names = cfg.output_dir, loaded.splits, loaded.classes
    extra_state = dict(preprocess=loaded.preprocess)
    board = metrics.visualdl_writer(cfg, rank)  # before anything is written: a missing VisualDL stops here
    seed_everything(cfg.seed)  # the model's initial weights
    model = model if model is not None else checkpoint.build_model(cfg, len(class_names))
    parameters = parameters if parameters is not None else [p for p in model.parameters() if not p.stop_gradient]
    train_set, val_set, test_set = datasets["train"], datasets.get("val"), datasets.get("test")
    batches = data.TrainBatches(train_set, cfg, world, rank)
    opt, sched = build_optimizer(cfg, parameters, batches.per_epoch, lr_scale=world if cfg.scale_lr else 1)
    scaler = paddle.amp.GradScaler(enable=plan["loss_scaling"])
    # restore
    run = checkpoint.RunState()
    if resume_state is not None:
        check_same_classes(resume_state, class_names, cfg)
        checkpoint.check_same_world(resume_state, world, out)
        run = checkpoint.restore_run(resume_state, cfg, model, opt, sched, scaler)
        if rank == 0:
            repair_record(cfg, resume_state, run)
        log_resumed(cfg, run, sched, batches.per_epoch)
    # wrap for training: ``model`` stays the plain network, checkpoints are written from it
    conv = choose_conv(model, cfg, device, plan)
    train_net, opt = wrap_for_training(model, opt, cfg, world)
    if rank == 0:
        files.write_yaml(os.path.join(out, "config.yaml"), config.to_dict(cfg))
    log_start(cfg, parameters, device, world, datasets, batches.per_epoch, opt)
    val_loader = eval_loader(cfg, val_set, world, rank)

    def save(improved=False):
        if rank == 0:
            state = checkpoint.run_state(run, model, opt, sched, scaler, cfg, class_names, extra_state, world)
            checkpoint.save_run(out, state, improved)
    # loop over epochs
    run_start, epoch_times = time.time(), []
    estimate = RunEstimate(total_iterations(cfg, batches.per_epoch), run.iteration)
    previous = signal.signal(signal.SIGTERM, config.terminate)  # schedulers, timeout, docker stop: like Ctrl-C
    try:
        for epoch in range(run.epoch, cfg.epochs):
            if cfg.max_iters and run.iteration >= cfg.max_iters:
                break
            t0 = time.time()
            train_one_epoch(train_net, batches.epoch(epoch, run.step), opt, sched, scaler, cfg, run, epoch, board,
                            world, estimate)
            check_finite(run, epoch, cfg, model, world)
            launch.average_bn_statistics(model, world)  # one model on every rank, the one saved
            # end of epoch: validation, checkpoints, metrics
            row = epoch_row(run, epoch, opt, world, time.time() - t0)
            if val_loader is not None:
                v = evaluate(model_for_eval(model, cfg, len(class_names)), val_loader, len(class_names), world)
                row.update(val_loss=v["loss"], val_acc=v["top1"])
            row["epoch_time_s"] = time.time() - t0
            improved = run.end_epoch(row)
            save(improved)
            if rank == 0:
                metrics.record_epoch(cfg, run.history, board)
            epoch_times.append(row["epoch_time_s"])
            log_epoch(cfg, row, epochs_left(cfg, run, batches.per_epoch), np.mean(epoch_times))
    except KeyboardInterrupt as stop:
        ignore_stop_signals()  # a second Ctrl-C or SIGTERM must not break the save below
        # under launch the ranks' partial sums are not reduced; a diverged epoch is not saved
        if run.step > 0 and world == 1 and np.isfinite(as_number(run.loss_sum)):
            save()
        exit_stopped(stop, out)
    except MemoryError:
        raise UserError(f"out of memory training {cfg.model} at --batch-size {cfg.batch_size}: try "
                        f"--batch-size {max(cfg.batch_size // 2, 1)}" + (f" (the last checkpoint, {out}, is kept; "
                        f"--resume cannot change the batch: start a new run)" if run.epoch else ""))
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if board is not None:
            board.close()
    # report
    done = f"training done in {format_seconds(time.time() - run_start)}"
    if len(epoch_times) < len(run.history):  # resumed: say what the whole run took too
        done += f" (this session; its {len(run.history)} epochs took {format_seconds(epochs_time(run))} in all)"
    log(done)
    if world > 1:
        log_replicas(model, world)
    try:
        return final_report(cfg, model_for_eval(model, cfg, len(class_names)), test_set, len(class_names), run,
                            world, rank, evidence(cfg, device, world, conv))
    except KeyboardInterrupt as stop:
        log(f"\n{'terminated' if isinstance(stop, config.Terminated) else 'interrupted'} during the final report: "
            f"the training is finished and saved in {os.path.join(out, checkpoint.LAST)}; "
            f"--resume {out} writes the report")
        sys.exit(config.stop_code(stop))


def set_up(cfg):
    """(device, world size, rank, GPU plan): the device chosen and checked, the process
    group joined, every GPU option decided (device.training_plan refuses what cannot work)."""
    device = devices.select_device(cfg.device)
    world, rank = launch.init_distributed(device)
    cap = None
    if device == "gpu":  # the oldest GPU of the ranks decides, so that all train alike (GPU audit 2, N7)
        cap = launch.lowest_capability(devices.capability(devices.gpu_facts(), paddle.get_device()), world)
    plan = devices.training_plan(cfg, paddle.__version__, device, cap, world, devices.cpu_flags())
    if plan["cudnn_deterministic"]:
        paddle.set_flags({"FLAGS_cudnn_deterministic": True})
    if device == "cpu" and models.KEEPS_FREED_MEMORY:
        log("memory: freed memory stays in this process for the next step (no page faults; RESNET_CPU_TUNING=off "
            "gives it back and lets idle threads spin)")
    if data.shm_too_small(cfg.num_workers):
        log("notice: /dev/shm is smaller than 512 MB; DataLoader uses use_shared_memory=False")
    return device, world, rank, plan


def log_resumed(cfg, run, sched, iters_per_epoch):
    log(f"resumed from {cfg.output_dir} at epoch {run.epoch + 1}" + (f", step {run.step}" if run.step else ""))
    if run.replanned:
        keys = ", ".join(f"{k} {getattr(cfg, k)}" for k in run.replanned)
        log(f"the LR schedule is planned again for {keys} ({total_iterations(cfg, iters_per_epoch)} iterations "
            f"in all), as if the run had started with it: lr {sched.get_lr():.5g} at iteration {run.iteration}")


def exit_stopped(stop, out):
    """After Ctrl-C or SIGTERM: say where the checkpoint is, exit 130 (143 for SIGTERM)."""
    where = os.path.join(out, checkpoint.LAST)
    how = "terminated" if isinstance(stop, config.Terminated) else "interrupted"
    log(f"\n{how}: checkpoint in {where}; continue with --resume {out}" if os.path.exists(where)
        else f"\n{how} before the first step: nothing saved yet")
    sys.exit(config.stop_code(stop))


def ignore_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


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
    checkpoint: BEST (checkpoint.repair_run), metrics.csv and curves.png rewritten from its
    history (results.yaml cannot be stale: checkpoint.save_run removes it first)."""
    checkpoint.repair_run(cfg.output_dir, state)
    if run.history:
        metrics.write_record(cfg, run.history)


def log_replicas(model, world):
    agree = launch.replicas_agree(model, world)
    log(f"replicas: trainable weights differ across {world} ranks by at most {agree['trainable']:g}; "
        f"BN running statistics (averaged over the ranks every epoch) by {agree['bn_stats']:g}")
    import paddle.distributed as dist
    dist.barrier()  # rank 0's best checkpoint is on disk before anyone reads it


def evidence(cfg, device, world, conv="paddle"):
    """What a result rests on (airbench's habit): Paddle version, device, convolutions, seed, command."""
    return dict(paddle_version=paddle.__version__, device=f"{devices.describe(device)} x {world}", conv=conv,
                seed=cfg.seed, command=command_of(cfg))


def command_of(cfg):
    """The command that ran: our script's own argv, or, called from elsewhere (a notebook's
    ipykernel_launcher, a test), the equivalent command line of ``cfg``."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.dirname(script) == os.path.dirname(os.path.abspath(__file__)):
        return " ".join([os.path.basename(script)] + sys.argv[1:])
    return config.as_command(cfg)


def seed_everything(seed):
    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def wrap_for_training(model, opt, cfg, world):
    """(train_net, optimizer): ``model`` as training runs it (SyncBN, AMP O2, to_static,
    DataParallel). The wrappers keep the same parameter objects, so the optimizer and
    the checkpoints (written from ``model``, without a wrapper prefix) are unchanged."""
    train_net = model
    if world > 1 and cfg.sync_bn:
        train_net = convert_sync_bn(train_net)
    if cfg.amp and cfg.amp_level == "O2":  # low-precision weights, fp32 master weights in the optimizer
        train_net, opt = paddle.amp.decorate(models=train_net, optimizers=opt, level="O2", dtype=cfg.amp_dtype,
                                             save_dtype="float32")
    if cfg.to_static:  # backend=None: 3.x would pick CINN on a GPU build, a path our tests never run
        train_net = paddle.jit.to_static(train_net, backend=None)
    if world > 1:
        train_net = paddle.DataParallel(train_net)  # broadcasts rank 0's weights, all-reduces gradients
    return train_net, opt


def choose_conv(model, cfg, device, plan=None):
    """The switch to onednn_conv/'s operators: on the CPU, with --conv onednn, the model
    trains on them when they build and pass their self-check here (in bf16 when the plan
    says so); otherwise on Paddle's kernels, and the log says why. Returns which is used."""
    bf16 = (plan or {}).get("cpu_bf16")
    if cfg.conv != "onednn" or device != "cpu":
        return "paddle"
    if cfg.to_static:  # dy2static cannot trace a forward replaced on an instance
        log("notice: convolutions on Paddle's kernel (--to-static compiles Paddle's conv2d; the oneDNN operator is for dygraph)")
        return "paddle"
    op, why_not = onednn_conv.load()
    if op is None and bf16:
        raise UserError(f"--amp --amp-dtype bfloat16 on the CPU runs on onednn_conv/'s operators, which cannot be "
                        f"used here ({why_not}); drop --amp")
    if op is None:
        log(f"notice: convolutions on Paddle's kernel ({why_not})")
        return "paddle"
    n = onednn_conv.use_in(model, dtype="bfloat16" if bf16 else "float32")
    if bf16:
        log(f"mixed precision: bf16 on {bf16} (activations and their gradients bf16; weights, their gradients, "
            "BatchNorm statistics and the loss fp32; evaluation fp32)")
    log(f"convolutions: {n['conv']} layers on the oneDNN operator, BatchNorm(+ReLU): {n['norm']}, residual joins: "
        f"{n['join']} (onednn_conv/; --conv paddle for Paddle's)")
    return "onednn"


def convert_sync_bn(layer):
    """SyncBatchNorm for the trainable BatchNorm layers of ``layer``, in place. Frozen ones
    (``_use_global_stats``, finetune.py's last/head) stay as they are: Paddle's conversion
    drops that flag and SyncBatchNorm always uses batch statistics (GPU audit #4)."""
    for name, child in layer.named_children():
        if isinstance(child, paddle.nn.layer.norm._BatchNormBase):
            if not child._use_global_stats:
                setattr(layer, name, paddle.nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            convert_sync_bn(child)
    return layer


def model_for_eval(model, cfg, num_classes):
    """``model`` in fp32 for evaluation. Under AMP O2 the model's own weights are fp16/bf16
    (decorate casts in place) and take no fp32 input: evaluate a fresh fp32 copy made from
    the state dict cast to fp32 (GPU audit #1, #3; audit 2, N12)."""
    if not (cfg.amp and cfg.amp_level == "O2"):
        return model
    fresh = checkpoint.build_model(cfg, num_classes)
    fresh.set_state_dict(checkpoint.fp32_state_dict(model))
    return fresh


def eval_loader(cfg, dataset, world=1, rank=0):
    """This rank's evaluation loader for ``dataset``, or None when it is missing or empty."""
    if dataset is None or len(dataset) == 0:
        return None
    return data.eval_loader(dataset, max(cfg.batch_size, 256), cfg.num_workers, world, rank)


def log_start(cfg, parameters, device, world, datasets, iters_per_epoch, opt):
    n_train = sum(int(np.prod(p.shape)) for p in parameters)
    sizes = " ".join(f"{k} {len(datasets[k]) if datasets.get(k) is not None else 0}" for k in ("train", "val", "test"))
    log(f"model {cfg.model}: {n_train:,} trainable parameters | device {device} x {world} | {sizes} | "
        f"batch {cfg.batch_size} per device, global batch {cfg.batch_size * world}, {iters_per_epoch} iterations/epoch, "
        f"{cfg.epochs} epochs, lr {opt.get_lr():g}")


def epoch_row(run, epoch, opt, world, train_time):
    """The metrics row of a finished epoch (train figures summed over the ranks)."""
    loss_sum, correct, seen = launch.all_sum([as_number(run.loss_sum), as_number(run.correct), run.seen], world)
    return dict(epoch=epoch + 1, iteration=run.iteration, lr=opt.get_lr(), train_loss=loss_sum / seen,
                train_acc=correct / seen, val_loss="", val_acc="",
                train_img_per_s=seen / train_time if train_time > 0 else "")


def epochs_left(cfg, run, iters_per_epoch):
    left = cfg.epochs - run.epoch
    if cfg.max_iters:
        left = min(left, -(-max(cfg.max_iters - run.iteration, 0) // iters_per_epoch))
    return left


def log_epoch(cfg, row, left, mean_epoch_time):
    val_text = f"val loss {row['val_loss']:.4f} val acc {row['val_acc']:.4f} | " if row["val_acc"] != "" else ""
    log(f"epoch {row['epoch']}/{cfg.epochs} done in {format_seconds(row['epoch_time_s'])} | "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | {val_text}"
        f"lr {row['lr']:.5f} | run eta {format_seconds(mean_epoch_time * left)}")


def epochs_time(run):
    """Seconds the run's epochs took, over every session of it."""
    return sum(h["epoch_time_s"] for h in run.history)


def final_report(cfg, model, test_set, num_classes, run, world=1, rank=0, evidence=None):
    """Write results.yaml: the last epoch's figures, the test accuracy of the final and of
    the best-on-validation model (reported, never used to choose) and the evidence
    behind them (Paddle version, device, seed, command)."""
    last, best, out = run.history[-1], run.best, cfg.output_dir
    result = dict(model=cfg.model, epochs=last["epoch"], iterations=last["iteration"],
                  train_time_s=epochs_time(run),
                  final_train_loss=last["train_loss"], final_train_acc=last["train_acc"],
                  final_val_acc=last["val_acc"] if last["val_acc"] != "" else None,
                  best_epoch=best["epoch"] or None, best_val_acc=best["val_acc"] if best["epoch"] else None)
    loader = eval_loader(cfg, test_set, world, rank)
    if loader is not None:
        final = evaluate(model, loader, num_classes, world)
        result["final_test_acc"] = final["top1"]
        log(f"final model (epoch {last['epoch']}): test acc {final['top1']:.4f}")
        if best["epoch"]:
            b = final
            if best["epoch"] != last["epoch"]:  # else the best model is the final one
                _, best_model = checkpoint.model_from_checkpoint(checkpoint.load(os.path.join(out, checkpoint.BEST)))
                b = evaluate(best_model, loader, num_classes, world)
            result["best_test_acc"] = b["top1"]
            log(f"best model (epoch {best['epoch']}, chosen on val acc {best['val_acc']:.4f}): test acc {b['top1']:.4f}")
    result.update(evidence or {})
    if rank != 0:
        return result
    files.write_yaml(os.path.join(out, checkpoint.RESULTS),  # marks a finished run
                     {k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()})
    return result

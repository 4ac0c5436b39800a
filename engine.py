"""The training loop shared by train_cifar10.py, finetune.py and degradation.py.

Read top to bottom: optimizer and schedule, the run's record (``Training``), one training
epoch, evaluation, and ``fit``: set up, restore, loop over epochs, report. The network as
it trains is train_net.py's, what a run saves checkpoint.py's, how batches are made
data.py's, what it prints progress.py's, the options config.py's.
"""
import dataclasses
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import paddle
import paddle.nn.functional as F

import cpu_settings
import checkpoint
import config
import data
import device as devices
import errors
import files
import launch
import lookahead
import memory
import metrics
import muon
import progress
import train_net
import tta
from checkpoint import as_number
from errors import UserError
from progress import log

WHITENING_IMAGES = 5000  # training images whose 2x2 patches the fast network's first layer whitens (airbench's)

# Paddle's BatchNorm warns on every call in training mode that it tracks statistics
warnings.filterwarnings("ignore", message="When training, we now always track")


# ------------------------------------------------------------- optimizer, schedule
def total_iterations(cfg, iters_per_epoch):
    total = cfg.epochs * iters_per_epoch
    return min(total, cfg.max_iters) if cfg.max_iters else total


def build_optimizer(cfg, parameters, iters_per_epoch, lr_scale=1):
    """(optimizer, LR scheduler). The scheduler is stepped once per iteration.
    parameters: a list, or parameter_groups' groups.
    lr_scale: the linear scaling rule (Goyal et al. 2017) for a larger global batch."""
    total = total_iterations(cfg, iters_per_epoch)
    cfg = dataclasses.replace(cfg, lr=cfg.lr * lr_scale)
    if cfg.schedule == "onecycle":  # airbench's: linear up, then linear down
        sched = paddle.optimizer.lr.OneCycleLR(cfg.lr, total, divide_factor=1 / cfg.lr_start,
                                               end_learning_rate=cfg.lr * cfg.lr_end, phase_pct=cfg.lr_peak_at,
                                               anneal_strategy="linear")
    elif cfg.schedule == "linear":  # airbench94_muon's: straight down to 0, no warm-up
        sched = paddle.optimizer.lr.LambdaDecay(cfg.lr, lr_lambda=lambda it: max(1 - it / total, 0.0))
    elif cfg.schedule == "cosine":
        sched = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=max(total - cfg.warmup_iters, 1))
    elif cfg.schedule == "step":
        values = [cfg.lr * cfg.gamma ** i for i in range(len(cfg.milestones) + 1)]
        sched = paddle.optimizer.lr.PiecewiseDecay(boundaries=list(cfg.milestones), values=values)
    else:
        sched = paddle.optimizer.lr.LambdaDecay(cfg.lr, lr_lambda=lambda it: 1.0)
    if cfg.warmup_iters:
        sched = paddle.optimizer.lr.LinearWarmup(sched, cfg.warmup_iters, 0.0, cfg.lr)
    if cfg.optimizer == "muon" and not any(isinstance(g, dict) and g.get("orthogonalize") for g in parameters):
        raise ValueError("optimizer muon takes parameter_groups' groups: without them no filter would take its step")
    if cfg.optimizer in ("sgd", "muon"):  # muon: the groups marked orthogonalize (parameter_groups) take Muon's step
        optimizer = muon.Muon if cfg.optimizer == "muon" else paddle.optimizer.Momentum
        opt = optimizer(learning_rate=sched, momentum=cfg.momentum, parameters=parameters, use_nesterov=cfg.nesterov,
                        weight_decay=cfg.weight_decay)
    else:
        opt = paddle.optimizer.Adam(learning_rate=sched, parameters=parameters, weight_decay=cfg.weight_decay)
    return opt, sched


def parameter_groups(model, parameters, cfg):
    """``parameters`` as the optimizer takes them: with --norm-shift-lr, the BatchNorm
    shifts in a group of their own at lr x norm_shift_lr and weight decay / norm_shift_lr
    (airbench's bias_scaler: a larger step, the same decay per step); with --optimizer
    muon, the convolution filters (4-D) in a group of their own that takes Muon's step
    at muon_lr and muon_momentum, without weight decay (muon.py)."""
    if cfg.norm_shift_lr == 1 and cfg.optimizer != "muon":
        return parameters
    shifts = {id(layer.bias) for layer in model.sublayers() if isinstance(layer, paddle.nn.layer.norm._BatchNormBase)}
    filters = {id(p) for p in parameters if len(p.shape) == 4} if cfg.optimizer == "muon" else set()
    own_group = shifts | filters
    groups = [dict(params=[p for p in parameters if id(p) not in own_group]),
              dict(params=[p for p in parameters if id(p) in shifts], learning_rate=cfg.norm_shift_lr,
                   weight_decay=cfg.weight_decay / cfg.norm_shift_lr),
              dict(params=[p for p in parameters if id(p) in filters], learning_rate=cfg.muon_lr / cfg.lr,
                   momentum=cfg.muon_momentum, use_nesterov=True, weight_decay=0.0, orthogonalize=True)]
    return [group for group in groups if group["params"]]


# ------------------------------------------------------------------------ one epoch
@dataclasses.dataclass
class Training:
    """What lives for the whole run beside the model it saves: the config, the network as
    it trains (train_net.wrap), the optimizer, its schedule and loss scaler (a pass-through
    unless fp16), the progress (a checkpoint.RunState: saved in every checkpoint, so an
    epoch resumed after Ctrl-C adds up the same), the number of ranks (they stop
    together), a VisualDL writer or None, the time estimate (progress.RunEstimate) and
    the weight averaging (lookahead.Lookahead) or None."""
    cfg: object
    net: object
    opt: object
    sched: object
    scaler: object
    run: object
    world: int = 1
    board: object = None
    estimate: object = None
    averaging: object = None
    stops: object = None  # under launch: errors.AgreedStop, checked every ``stop_every`` steps
    stop_every: int = 1


def train_one_epoch(training, loader, epoch):
    """Train ``training.net`` over ``loader``, adding the epoch's running sums and position
    to ``training.run``."""
    t, run, cfg = training, training.run, training.cfg
    t.net.train()
    steps = run.step + len(loader)  # this epoch's batches, the ones done before a resume included
    since = (time.time(), run.seen, run.step)
    autocast = cfg.amp and not paddle.get_device().startswith("cpu")  # on the CPU bf16 is cpu_kernels/'
    for images, labels in loader:
        with paddle.amp.auto_cast(enable=autocast, level=cfg.amp_level, dtype=cfg.amp_dtype):
            logits = t.net(images)
        loss = loss_of(logits, labels, cfg.label_smoothing)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
        t.opt.clear_grad()
        t.sched.step()
        if t.averaging is not None:
            t.averaging.step(run.iteration + 1)
        n = labels.shape[0]
        # summed on the device in fp32, read (a device sync) only every --log-every steps:
        # on 3.x nothing else syncs a fp32 or bf16 step; fp16's GradScaler does (`if found_inf`)
        add_step_loss(run, loss.detach() * n, skip_overflow=t.scaler.is_enable())
        run.correct = run.correct + (logits.argmax(-1) == labels.reshape([-1])).astype("int64").sum()
        run.seen, run.step, run.iteration = run.seen + n, run.step + 1, run.iteration + 1
        if t.estimate is not None:
            t.estimate.step(run.iteration)
        if run.step % cfg.log_every == 0 or run.step == steps:
            check_finite(run, epoch, cfg, world=t.world)
            elapsed = time.time() - since[0]
            loss, acc = progress.log_step(run, epoch, steps, since,
                                          (run.seen - since[1]) / elapsed if elapsed > 0 else float("nan"))
            metrics.write_scalars(t.board, "step", dict(train_loss=loss, train_acc=acc, lr=t.opt.get_lr()),
                                  run.iteration)
        if t.stops is not None and run.step % t.stop_every == 0:
            t.stops.check(launch.all_sum, t.world)
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
        logits = model(images).astype("float32")  # fp16/bf16 under --amp-eval on a GPU
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
    """fit's body, in the locked run directory: set up and restore, loop over epochs, report."""
    model, training, batches, kernels = prepare(cfg, loaded, device, world, rank, plan, resume_state, model,
                                                parameters)
    run, out, num_classes = training.run, cfg.output_dir, len(loaded.classes)
    run_start = time.time()
    epochs_now = train_epochs(training, model, batches, loaded, rank)
    done = f"training done in {progress.format_seconds(time.time() - run_start)}"
    if epochs_now < len(run.history):  # resumed: say what the whole run took too
        done += f" (this session; its {len(run.history)} epochs took {progress.format_seconds(epochs_time(run))} in all)"
    log(done)
    if world > 1:
        log_replicas(model, world)
    try:
        with train_net.eval_precision(cfg):
            return final_report(cfg, train_net.model_for_eval(model, cfg, num_classes), loaded.splits.get("test"),
                                num_classes, run, world, rank, evidence(cfg, device, world, kernels))
    except KeyboardInterrupt as stop:
        log(f"\n{'terminated' if isinstance(stop, errors.Terminated) else 'interrupted'} during the final report: "
            f"the training is finished and saved in {os.path.join(out, checkpoint.LAST)}; "
            f"--resume {out} writes the report")
        sys.exit(errors.stop_code(stop))


def prepare(cfg, loaded, device, world, rank, plan, resume_state, model, parameters):
    """(model, Training, data.TrainBatches, which CPU kernels): the model (``model`` stays the
    plain network, checkpoints are written from it), the optimizer and schedule, restored
    from ``resume_state`` when resuming, the network wrapped for training."""
    board = metrics.visualdl_writer(cfg, rank)  # before anything is written: a missing VisualDL stops here
    seed_everything(cfg.seed)  # the model's initial weights
    if model is None:
        model = checkpoint.build_model(cfg, len(loaded.classes))
        if hasattr(model, "init_whitening") and resume_state is None:  # the fast network's first layer
            images = whitening_images(data.image_size_of(cfg))
            model.init_whitening(data.first_images(loaded.splits["train"], images, cfg))
    parameters = parameters if parameters is not None else [p for p in model.parameters() if not p.stop_gradient]
    if device == "cpu":
        check_memory(model, cfg, len(loaded.splits["train"]), world, rank)
    batches = data.TrainBatches(loaded.splits["train"], cfg, world, rank)
    opt, sched = build_optimizer(cfg, parameter_groups(model, parameters, cfg), batches.per_epoch,
                                 lr_scale=world if cfg.scale_lr else 1)
    scaler = paddle.amp.GradScaler(enable=plan["loss_scaling"])
    run = checkpoint.RunState()
    if resume_state is not None:
        checkpoint.check_same_classes(resume_state, loaded.classes, cfg)
        checkpoint.check_same_world(resume_state, world, cfg.output_dir)
        run = checkpoint.restore_run(resume_state, cfg, model, opt, sched, scaler)
        if rank == 0:
            checkpoint.repair_record(cfg, resume_state, run)
        progress.log_resumed(cfg, run, sched, total_iterations(cfg, batches.per_epoch))
    kernels = train_net.choose_kernels(model, cfg, device, plan)
    net, opt = train_net.wrap(model, opt, cfg, world)
    if rank == 0:
        files.write_yaml(os.path.join(cfg.output_dir, "config.yaml"), config.to_dict(cfg))
    progress.log_start(cfg, sum(int(np.prod(p.shape)) for p in parameters), device, world, loaded.splits,
                       batches.per_epoch, opt.get_lr())
    total = total_iterations(cfg, batches.per_epoch)
    estimate = progress.RunEstimate(total, run.iteration)
    averaging = lookahead.Lookahead(model, cfg.lookahead, total) if cfg.lookahead else None
    if averaging is not None and resume_state is not None and resume_state.get("lookahead") is not None:
        averaging.set_state_dict(resume_state["lookahead"])
    # a GPU step reads nothing back: the ranks agree on a stop when the log reads the loss
    training = Training(cfg, net, opt, sched, scaler, run, world, board, estimate, averaging,
                        stop_every=1 if device == "cpu" else cfg.log_every)
    return model, training, batches, kernels


def whitening_images(image_size):
    """How many training images the fast network's whitening reads: airbench's 5,000 of
    32x32, fewer of larger images, for the same number of patches (5,000 x 31 x 31). At
    224x224 its arithmetic takes 10 MB an image (480: 4.5 GiB): all 5,000 would be 47 GB,
    and the kernel's out-of-memory kill; 96 take 1 GB."""
    return min(WHITENING_IMAGES, max(1, WHITENING_IMAGES * 31 ** 2 // (image_size - 1) ** 2))


def check_memory(model, cfg, n_train, world, rank):
    """Before the first step on a CPU: a step that cannot fit in the free memory is one
    error, one that may not is a warning (memory.py)."""
    batch = min(cfg.batch_size, math.ceil(n_train / world))
    warning = memory.check_step_fits(model, cfg.model, batch, data.image_size_of(cfg),
                                     bytes_per_value=2 if cfg.amp else 4)
    if warning and rank == 0:
        log(warning)


def train_epochs(training, model, batches, loaded, rank):
    """The epochs left, each validated, saved and logged; Ctrl-C or SIGTERM saves the
    position inside the epoch and exits. Returns how many epochs this session trained."""
    t, run, cfg, out = training, training.run, training.cfg, training.cfg.output_dir
    num_classes = len(loaded.classes)
    val_loader = eval_loader(cfg, loaded.splits.get("val"), t.world, rank)

    def save(improved=False):
        if rank == 0:
            extra = dict(preprocess=loaded.preprocess)
            if t.averaging is not None:
                extra["lookahead"] = t.averaging.state_dict()
            state = checkpoint.run_state(run, model, t.opt, t.sched, t.scaler, cfg, loaded.classes, extra, t.world)
            checkpoint.save_run(out, state, improved)

    def save_position():  # the position inside the epoch, after a stop
        ignore_stop_signals()  # a second Ctrl-C or SIGTERM must not break the save
        # under launch the ranks' partial sums are not reduced; a diverged epoch is not saved
        if run.step > 0 and t.world == 1 and np.isfinite(as_number(run.loss_sum)):
            save()

    epoch_times = []
    previous_int = signal.getsignal(signal.SIGINT)  # put back after a stop ignored both: a notebook's kernel goes on
    previous = signal.signal(signal.SIGTERM, errors.terminate)  # schedulers, timeout, docker stop: like Ctrl-C
    if t.world > 1:
        t.stops = errors.AgreedStop()
        t.stops.install()
    try:
        for epoch in range(run.epoch, cfg.epochs):
            if t.stops is not None:  # a stop noted during the last epoch's validation or save
                t.stops.check(launch.all_sum, t.world)
            if cfg.max_iters and run.iteration >= cfg.max_iters:
                break
            t0 = time.time()
            train_one_epoch(t, batches.epoch(epoch, run.step), epoch)
            check_finite(run, epoch, cfg, model, t.world)
            launch.average_bn_statistics(model, t.world)  # one model on every rank, the one saved
            # end of epoch: validation, checkpoints, metrics
            row = epoch_row(run, epoch, t.opt, t.world, time.time() - t0)
            if val_loader is not None:
                with train_net.eval_precision(cfg):
                    v = evaluate(train_net.model_for_eval(model, cfg, num_classes), val_loader, num_classes, t.world)
                row.update(val_loss=v["loss"], val_acc=v["top1"])
            row["epoch_time_s"] = time.time() - t0
            save(run.end_epoch(row))
            if rank == 0:
                metrics.record_epoch(cfg, run.history, t.board)
            epoch_times.append(row["epoch_time_s"])
            progress.log_epoch(cfg, row, epochs_left(cfg, run, batches.per_epoch), np.mean(epoch_times))
    except KeyboardInterrupt as stop:
        save_position()
        exit_stopped(stop, out, t.world)
    except SystemError as e:  # a DataLoader worker died (killed by the OOM killer, or by a signal of its own)
        lost = errors.lost_worker(e)
        if lost is None:
            raise
        save_position()
        where = os.path.join(out, checkpoint.LAST)
        raise UserError(f"{lost}; checkpoint in {where}, continue with --resume {out}" if os.path.exists(where)
                        else f"{lost}; nothing saved yet: the same command starts the run again")
    except MemoryError:
        raise UserError(f"out of memory training or validating {cfg.model} at --batch-size {cfg.batch_size}: try "
                        f"--batch-size {max(cfg.batch_size // 2, 1)}" + (f" (the last checkpoint, {out}, is kept; "
                        f"--resume cannot change the batch: start a new run)" if run.epoch else ""))
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        signal.signal(signal.SIGINT, previous_int if previous_int is not None else signal.default_int_handler)
        if t.board is not None:
            t.board.close()
    return len(epoch_times)


def set_up(cfg):
    """(device, world size, rank, GPU plan): the device chosen and checked, the process
    group joined, every GPU option decided (device.training_plan refuses what cannot work)."""
    device = devices.select_device(cfg.device)
    world, rank = launch.init_distributed(device)
    cap = None
    if device == "gpu":  # the oldest GPU of the ranks decides, so that all train alike (GPU audit 2, N7)
        cap = launch.lowest_capability(devices.capability(devices.gpu_facts(), paddle.get_device()), world)
    plan = devices.training_plan(cfg, paddle.__version__, device, cap, world, devices.cpu_flags(),
                                 devices.onednn_isa_limit(), devices.cpu_info("vendor_id"))
    if plan["cudnn_deterministic"]:
        paddle.set_flags({"FLAGS_cudnn_deterministic": True})
    if device == "cpu" and cpu_settings.KEEPS_FREED_MEMORY:
        log("memory: freed memory stays in this process for the next step (no page faults; RESNET_CPU_TUNING=off "
            "gives it back and lets idle threads spin)")
    if data.shm_too_small(cfg.num_workers):
        log("notice: /dev/shm is smaller than 512 MB; DataLoader uses use_shared_memory=False")
    return device, world, rank, plan


def exit_stopped(stop, out, world=1):
    """After Ctrl-C or SIGTERM: say where the checkpoint is and what it holds, exit 130 (143
    for SIGTERM). Under the launcher the position inside an epoch is not saved (the ranks'
    partial sums are not reduced): the checkpoint is the last finished epoch's."""
    where = os.path.join(out, checkpoint.LAST)
    how = "terminated" if isinstance(stop, errors.Terminated) else "interrupted"
    if not os.path.exists(where):
        log(f"\n{how} before the first checkpoint: nothing saved yet; the same command starts the run again")
    else:
        held = " (the last finished epoch's: under the launcher a stop inside an epoch loses that epoch)" \
            if world > 1 else ""
        log(f"\n{how}: checkpoint in {where}{held}; continue with --resume {out}")
    sys.exit(errors.stop_code(stop))


def ignore_stop_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def log_replicas(model, world):
    agree = launch.replicas_agree(model, world)
    log(f"replicas: trainable weights differ across {world} ranks by at most {agree['trainable']:g}; "
        f"BN running statistics (averaged over the ranks every epoch) by {agree['bn_stats']:g}")
    import paddle.distributed as dist
    dist.barrier()  # rank 0's best checkpoint is on disk before anyone reads it


def evidence(cfg, device, world, kernels="paddle"):
    """What a result rests on (airbench's habit): Paddle version, device, CPU kernels, seed, command."""
    return dict(paddle_version=paddle.__version__, device=f"{devices.describe(device)} x {world}", cpu_kernels=kernels,
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


def eval_loader(cfg, dataset, world=1, rank=0):
    """This rank's evaluation loader for ``dataset``, or None when it is missing or empty. It
    batches as training does: --batch-size is the one setting of a run's memory (the advice
    after an out-of-memory error names it, whichever phase ran out)."""
    if dataset is None or len(dataset) == 0:
        return None
    return data.eval_loader(dataset, cfg.batch_size, cfg.num_workers, world, rank)


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


def epochs_time(run):
    """Seconds the run's epochs took, over every session of it."""
    return sum(h["epoch_time_s"] for h in run.history)


def best_model_of(cfg, num_classes, world=1, rank=0):
    """The run's best checkpoint as a model on every rank: rank 0 reads it, the only rank
    that writes the run directory (on several machines that need not be shared), and
    sends its weights to the others."""
    if rank == 0:
        _, model = checkpoint.model_from_checkpoint(checkpoint.load(os.path.join(cfg.output_dir, checkpoint.BEST)))
    else:
        model = checkpoint.build_model(cfg, num_classes)
    launch.broadcast_state(model, world)
    return model


def final_report(cfg, model, test_set, num_classes, run, world=1, rank=0, evidence=None):
    """Write results.yaml: the last epoch's figures, the test accuracy of the final and of
    the best-on-validation model (reported, never used to choose) and the evidence
    behind them (Paddle version, device, seed, command)."""
    last, best, out = run.history[-1], run.best, cfg.output_dir
    result = dict(model=cfg.model, epochs=last["epoch"], iterations=last["iteration"], tta=cfg.tta,
                  train_time_s=epochs_time(run),
                  final_train_loss=last["train_loss"], final_train_acc=last["train_acc"],
                  final_val_acc=last["val_acc"] if last["val_acc"] != "" else None,
                  best_epoch=best["epoch"] or None, best_val_acc=best["val_acc"] if best["epoch"] else None)
    loader = eval_loader(cfg, test_set, world, rank)
    views = "" if cfg.tta == "none" else f", test-time augmentation {cfg.tta}"
    if cfg.amp and cfg.amp_eval:
        views += f", evaluated in {'bf16' if cfg.amp_dtype == 'bfloat16' else 'fp16'}"
    if loader is not None:
        final = evaluate(tta.with_tta(model, cfg.tta), loader, num_classes, world)
        result["final_test_acc"] = final["top1"]
        log(f"final model (epoch {last['epoch']}{views}): test acc {final['top1']:.4f}")
        if best["epoch"]:
            b = final
            if best["epoch"] != last["epoch"]:  # else the best model is the final one
                best_model = train_net.computing_like(best_model_of(cfg, num_classes, world, rank), model)
                b = evaluate(tta.with_tta(best_model, cfg.tta), loader, num_classes, world)
            result["best_test_acc"] = b["top1"]
            log(f"best model (epoch {best['epoch']}, chosen on val acc {best['val_acc']:.4f}): test acc {b['top1']:.4f}")
    result.update(evidence or {})
    if rank != 0:
        return result
    files.write_yaml(os.path.join(out, checkpoint.RESULTS),  # marks a finished run
                     {k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()})
    return result

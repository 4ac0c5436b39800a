"""The network as training runs it, and the one evaluation runs.

``choose_kernels`` gives a model our CPU kernels (cpu_kernels/) where they build; ``wrap``
adds what training on several ranks, in AMP O2 or compiled needs; ``model_for_eval`` is
the fp32 model evaluation takes. The model itself stays the plain network: checkpoints
are written from it, without a wrapper's prefix.
"""
import paddle

import checkpoint
import cpu_kernels
import device as devices
from models import layers
from errors import UserError
from progress import log


def choose_kernels(model, cfg, device, plan=None):
    """Our CPU kernels for ``model``: on the CPU, with --cpu-kernels ours, the model trains
    on them when they build and pass their self-check here (in bf16 when the plan says
    so); otherwise on Paddle's kernels, and the log says why. Returns which is used."""
    bf16 = (plan or {}).get("cpu_bf16")
    if cfg.cpu_kernels != "ours" or device != "cpu":
        return "paddle"
    if cfg.to_static:  # dy2static compiles Paddle's kernels; ours are for dygraph
        log("notice: training on Paddle's kernels (--to-static compiles Paddle's; our CPU kernels are for dygraph)")
        return "paddle"
    op, why_not = cpu_kernels.load()
    if op is None and bf16:
        raise UserError(f"--amp --amp-dtype bfloat16 on the CPU runs on our CPU kernels (cpu_kernels/), which cannot "
                        f"be used here ({why_not}); drop --amp")
    if op is None:
        log(f"notice: training on Paddle's kernels ({why_not})")
        return "paddle"
    n = cpu_kernels.use_in(model, dtype="bfloat16" if bf16 else "float32", bf16_eval=cfg.amp_eval)
    if bf16:
        log(f"mixed precision: bf16 on {bf16} (activations and their gradients bf16; weights, their gradients, "
            f"BatchNorm statistics and the loss fp32; evaluation {'bf16' if cfg.amp_eval else 'fp32'})")
        if plan.get("cpu_bf16_slower"):
            log(f"notice: {devices.SLOW_BF16}; drop --amp to train in fp32")
    log(f"CPU kernels: ours (cpu_kernels/; --cpu-kernels paddle for Paddle's), {n['layout'].upper()}: "
        f"convolutions {n['conv']}, BatchNorm(+activation) {n['norm']}, residual joins {n['join']}, pools {n['pool']}")
    return "ours"


def wrap(model, opt, cfg, world):
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


def convert_sync_bn(layer):
    """SyncBatchNorm for the trainable BatchNorm layers of ``layer``, in place. Frozen ones
    (``_use_global_stats``, finetune.py's last/head) stay as they are: Paddle's conversion
    drops that flag and SyncBatchNorm always uses batch statistics (GPU audit #4). A
    BatchNormAct2D's activation goes on as a hook of its SyncBatchNorm, which keeps its name."""
    for name, child in layer.named_children():
        if isinstance(child, paddle.nn.layer.norm._BatchNormBase):
            if not child._use_global_stats:
                synced = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(child)
                if getattr(child, "act", None):
                    synced.register_forward_post_hook(lambda _, inputs, y, act=child.act: layers.activate(y, act))
                setattr(layer, name, synced)
        else:
            convert_sync_bn(child)
    return layer


def computing_like(model, trained):
    """``model``, the same network built afresh (the best checkpoint's), computing as
    ``trained`` does: each layer takes the kernel use_in gave its twin (a kernel takes
    its layer as an argument), so it is evaluated on the same kernels, layout and dtype."""
    for mine, theirs in zip(model.sublayers(include_self=True), trained.sublayers(include_self=True)):
        for attr in ("kernel", "fork"):
            if hasattr(theirs, attr):
                setattr(mine, attr, getattr(theirs, attr))
    return model


def eval_precision(cfg):
    """Where evaluation runs: on a GPU with --amp and --amp-eval, under auto_cast O1 in
    --amp-dtype (PaddleClas's AMP use_fp16_test); otherwise as it is (fp32, or the CPU
    kernels' bf16 that choose_kernels set with --amp-eval)."""
    on_gpu = paddle.get_device().startswith("gpu")
    return paddle.amp.auto_cast(enable=bool(cfg.amp and cfg.amp_eval and on_gpu), dtype=cfg.amp_dtype, level="O1")


def model_for_eval(model, cfg, num_classes):
    """``model`` in fp32 for evaluation. Under AMP O2 the model's own weights are fp16/bf16
    (decorate casts in place) and take no fp32 input: evaluate a fresh fp32 copy made from
    the state dict cast to fp32 (GPU audit #1, #3; audit 2, N12)."""
    if not (cfg.amp and cfg.amp_level == "O2"):
        return model
    fresh = checkpoint.build_model(cfg, num_classes)
    fresh.set_state_dict(checkpoint.fp32_state_dict(model))
    return fresh

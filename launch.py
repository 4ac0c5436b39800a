"""Several processes under ``python -m paddle.distributed.launch``: joining the group,
summing over the ranks, and checking that the replicas agree. Run alone, every function
here is a no-op that returns what one process has.
"""
import os

import numpy as np
import paddle

from errors import UserError


def rank():
    """This process's rank under paddle.distributed.launch (0 when run alone)."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


LAUNCH_ENV = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT")


def init_distributed(device="cpu"):
    """(world_size, rank). Under ``python -m paddle.distributed.launch`` (which sets the
    PADDLE_* variables) this joins the process group; run alone it returns (1, 0).
    A half-set-up environment would hang in init_parallel_env: it is an error instead.
    ``device``: the one select_device chose; 'cpu' joins with gloo even on a GPU build."""
    present = [k for k in LAUNCH_ENV if os.environ.get(k)]
    if not present:
        return 1, 0
    missing = [k for k in LAUNCH_ENV if k not in present]
    if missing:
        raise UserError(f"half-set-up distributed environment: {', '.join(present)} set but {', '.join(missing)} "
                        "not; start with python -m paddle.distributed.launch, or unset the PADDLE_* variables")
    world, me = int(os.environ["PADDLE_TRAINERS_NUM"]), int(os.environ["PADDLE_TRAINER_ID"])
    endpoints = os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")
    if not 0 <= me < world or len(endpoints) != world:
        raise UserError(f"inconsistent distributed environment: rank {me}, world size {world}, "
                        f"{len(endpoints)} endpoints; start with python -m paddle.distributed.launch")
    if world == 1:
        return 1, 0
    import paddle.distributed as dist
    if device == "cpu":
        # on a GPU build the backend 'auto' means NCCL, which moves the place back to the
        # GPUs; gloo keeps the CPU (paddle/distributed/parallel.py, _is_cpuonly; GPU audit 2, N2)
        os.environ["PADDLE_DISTRI_BACKEND"] = "gloo"
    dist.init_parallel_env()
    paddle.set_device(device)
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


def lowest_capability(cap, world_size):
    """The lowest (major, minor) compute capability over the ranks' GPUs (``cap`` alone
    when alone): Paddle's autocast checks each rank's own GPU, and on a node of mixed GPUs
    one rank would fall back to fp32 silently while the others train in bf16."""
    if world_size == 1:
        return cap
    import paddle.distributed as dist
    t = paddle.to_tensor([cap[0] * 10 + cap[1]], dtype="int64")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    lowest = int(t.item())
    return lowest // 10, lowest % 10


def average_bn_statistics(model, world_size):
    """Make every rank's BatchNorm running mean and variance their average over the ranks
    (timm's ``distribute_bn`` with reduce). DataParallel all-reduces gradients only, so
    each rank's running statistics follow its own batches and the replicas drift apart:
    validation summed over the ranks would evaluate a different model on each shard, and
    not the one rank 0 saves. Called at every epoch end, before validation and the save.
    Frozen statistics (fine-tuning's last/head) are the same everywhere and SyncBatchNorm's
    follow the global batch already: those are left alone."""
    if world_size == 1:
        return
    import paddle.distributed as dist
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase) and not layer._use_global_stats \
                and not isinstance(layer, paddle.nn.SyncBatchNorm):
            for stat in (layer._mean, layer._variance):
                total = stat.detach().clone()
                dist.all_reduce(total)
                stat.set_value(total / world_size)


def broadcast_state(model, world_size):
    """Every rank's ``model`` takes rank 0's parameters and buffers."""
    if world_size == 1:
        return
    import paddle.distributed as dist
    for t in model.state_dict().values():
        dist.broadcast(t, src=0)


def replicas_agree(model, world_size):
    """Max difference across ranks of a fingerprint (sum and sum of squares) of every
    parameter, trainable and BN statistics separately: DataParallel keeps the trainable
    weights identical, average_bn_statistics the BN running statistics; both must be 0."""
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

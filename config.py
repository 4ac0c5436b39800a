"""Training configuration: a dataclass of defaults, YAML recipes, command-line overrides.

Every key of ``TrainConfig`` is a command-line option (``batch_size`` -> ``--batch-size``);
values are parsed as YAML scalars (``--lr 0.05``, ``--milestones [32000,48000]``,
``--amp`` alone means true) and type-checked. A typo in a key lists the valid keys.
"""
import argparse
import dataclasses
import inspect
import os
import re
import shlex
import typing

import yaml

from errors import UserError


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = "resnet18"          # a factory name of models.get_model
    stem: str = "auto"               # cifar (3x3/1) | imagenet (7x7/2 + max-pool) | auto: a CIFAR net's only one;
    #                                  resnet18..152 the CIFAR stem on CIFAR, the ImageNet one on an image folder
    zero_init_residual: bool = False # start each block's last BatchNorm scale at 0 (Goyal et al. 2017)
    # optimisation
    epochs: int = 30                 # passes over the training split
    max_iters: int = 0               # stop after this many iterations (the paper's 64k); 0: epochs decide
    batch_size: int = 128            # per device: the global batch is batch_size x devices
    scale_lr: bool = False           # multi-device: lr x devices (linear scaling rule)
    sync_bn: bool = False            # multi-GPU: BatchNorm statistics over the global batch
    optimizer: str = "sgd"           # sgd (momentum) | adam | muon (muon.py: Muon on the conv filters, at
    #                                  muon_lr and muon_momentum; sgd on the rest)
    lr: float = 0.1                  # the learning rate (the peak, with warm-up)
    momentum: float = 0.9            # sgd: momentum
    nesterov: bool = False           # sgd: Nesterov momentum
    weight_decay: float = 5e-4       # L2, on every parameter (muon: on all but the filters)
    muon_lr: float = 0.24            # muon: the filters' learning rate, under the same schedule as lr
    muon_momentum: float = 0.6       # muon: the filters' momentum (Nesterov)
    schedule: str = "cosine"         # cosine | step | constant | onecycle | linear (from lr down to 0), stepped
    #                                  every iteration
    milestones: typing.List[int] = dataclasses.field(default_factory=list)  # step: iterations
    gamma: float = 0.1               # step: LR factor at each milestone
    warmup_iters: int = 0            # linear warm-up from 0 to lr over this many iterations
    lr_start: float = 0.2            # onecycle: the first lr, as a fraction of lr; linear up to lr at
    #                                  lr_peak_at of the iterations, then linear down to lr x lr_end
    lr_peak_at: float = 0.23         # onecycle: where lr peaks, as a fraction of the iterations
    lr_end: float = 0.07             # onecycle: the last lr, as a fraction of lr
    norm_shift_lr: float = 1.0       # lr x this for the BatchNorm shifts, and their weight decay / this
    #                                  (so its pull per step stays): airbench's bias_scaler is 64
    label_smoothing: float = 0.0     # cross-entropy label smoothing (0: none)
    lookahead: float = 0.0           # weight averaging (airbench94's lookahead): every 5 steps the weights go to
    #                                  their running average, decay lookahead**5 x (iteration / total)**3; 0: off;
    #                                  airbench 0.95
    # data
    dataset: str = "cifar10"         # cifar10 | cifar100 | folder (an image folder, --data-dir)
    data_file: str = ""              # cifar10/cifar100: the official cifar-10/100-python.tar.gz; "": Paddle's download
    data_dir: str = ""               # folder: a folder of class sub-folders
    image_size: int = 224            # folder: the training crop; evaluation resizes to image_size * 256/224, then crops
    val_fraction: float = 0.2        # folder: held out of each class (seeded), for model selection
    augment: str = "crop_flip"       # CIFAR: crop_flip (4-pixel pad + random 32 crop + flip) | flip | flip_color |
    #                                  none | translate_flip (--loader device: 2-pixel reflected pad + random 32 crop;
    #                                  random flips in the first epoch, each image's flip turned over every other
    #                                  epoch: airbench)
    normalize: str = "dataset"       # CIFAR: the mean/std of the dataset's own training images | cifar10 | cifar100 | imagenet
    val_size: int = 5000             # CIFAR: held out of the 50k training images, for model selection
    subset: int = 0                  # train on the first N training images (0: all)
    num_workers: int = 2             # DataLoader worker processes (0: load in the training process)
    tta: str = "none"                # the final test's test-time augmentation: none | flip | flip_translate (tta.py)
    loader: str = "dataloader"       # dataloader (workers + PIL transforms) | device (CIFAR on the GPU, batched ops)
    # run
    seed: int = 0                    # the initial weights, the data order and every random crop and flip
    device: str = "auto"             # auto (GPU when Paddle has one) | cpu | gpu
    amp: bool = False                # mixed precision: a GPU (fp16, bf16), or a CPU with bf16 units (bf16)
    amp_dtype: str = "float16"       # float16 | bfloat16
    amp_level: str = "O1"            # O1: per-op casts | O2: fp16/bf16 weights with fp32 master copies
    amp_eval: bool = False           # with --amp, evaluation (each validation, the final test) in --amp-dtype too
    to_static: bool = False          # compile the model with paddle.jit.to_static
    cpu_kernels: str = "ours"        # CPU training: ours (cpu_kernels/, when they build here; else Paddle's, said) | paddle
    deterministic: bool = False      # GPU: cuDNN's deterministic algorithms (bit-exact resume; slower). The CPU always is
    output_dir: str = "runs/cifar10" # where the run writes its checkpoints, metrics and plots
    log_every: int = 50              # iterations between progress lines
    visualdl: bool = False           # also write VisualDL logs to OUTPUT_DIR/visualdl (pip install visualdl)


@dataclasses.dataclass
class FinetuneConfig(TrainConfig):
    """finetune.py: what fine-tuning adds (a pretrained start, a strategy) and its recipe."""
    pretrained: str = "imagenet"     # imagenet | none | a .pdparams | a torchvision .pth | a .pdckpt of ours
    strategy: str = "full"           # full | last | head (see finetune.py)
    model: str = "resnet34"
    dataset: str = "folder"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    weight_decay: float = 1e-4
    output_dir: str = "runs/finetune"
    log_every: int = 5


CHOICES = dict(
    dataset=("cifar10", "cifar100", "folder"), strategy=("full", "last", "head"), loader=("dataloader", "device"),
    stem=("auto", "cifar", "imagenet"), optimizer=("sgd", "adam", "muon"),
    schedule=("cosine", "step", "constant", "onecycle", "linear"),
    augment=("crop_flip", "flip", "flip_color", "none", "translate_flip"), tta=("none", "flip", "flip_translate"),
    normalize=("dataset", "cifar10", "cifar100", "imagenet"), device=("auto", "cpu", "gpu"),
    amp_dtype=("float16", "bfloat16"), amp_level=("O1", "O2"), cpu_kernels=("ours", "paddle"))


# The range of every number (test, what the error says it must be), checked where a config is made.
LIMITS = dict(
    epochs=(lambda v: v >= 1, "at least 1"),
    max_iters=(lambda v: v >= 0, "0 (no limit) or more"),
    batch_size=(lambda v: v >= 1, "at least 1"),
    lr=(lambda v: v > 0, "above 0"),
    momentum=(lambda v: 0 <= v < 1, "in [0, 1)"),
    muon_lr=(lambda v: v > 0, "above 0"),
    muon_momentum=(lambda v: 0 <= v < 1, "in [0, 1)"),
    weight_decay=(lambda v: 0 <= v < 1, "in [0, 1)"),
    gamma=(lambda v: 0 < v <= 1, "in (0, 1]"),
    warmup_iters=(lambda v: v >= 0, "0 or more"),
    label_smoothing=(lambda v: 0 <= v < 1, "in [0, 1)"),
    lr_start=(lambda v: 0 < v <= 1, "in (0, 1]"),
    lr_peak_at=(lambda v: 0 < v < 1, "in (0, 1)"),
    lr_end=(lambda v: 0 <= v <= 1, "in [0, 1]"),
    norm_shift_lr=(lambda v: v > 0, "above 0"),
    lookahead=(lambda v: 0 <= v < 1, "in [0, 1)"),
    val_size=(lambda v: v >= 0, "0 or more"),
    subset=(lambda v: v >= 0, "0 (all) or more"),
    num_workers=(lambda v: 0 <= v <= 64, "in [0, 64]"),
    seed=(lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    log_every=(lambda v: v >= 1, "at least 1"),
    image_size=(lambda v: 32 <= v <= 1024, "in [32, 1024]"),
    val_fraction=(lambda v: 0 <= v < 1, "in [0, 1)"),
)
# What --resume may change. Free: how the run is executed, not what it computes. Schedule:
# the LR schedule is planned again for the new values, as if the run had been started with
# them, and the log says so. Anything else (the model, the data, the batch, the optimizer,
# AMP) would make the checkpoint's state mean something else: refused.
RESUME_FREE = ("num_workers", "log_every", "device", "data_file", "data_dir", "output_dir", "deterministic",
               "to_static", "visualdl", "cpu_kernels", "tta")
RESUME_SCHEDULE = ("epochs", "max_iters", "lr", "muon_lr", "schedule", "milestones", "gamma", "warmup_iters",
                   "lr_start", "lr_peak_at", "lr_end")


# Keys renamed since: (the new key, {old value: new value}). Old recipes, command lines and
# checkpoints keep working: --conv onednn is --cpu-kernels ours.
RENAMED = dict(conv=("cpu_kernels", {"onednn": "ours", "paddle": "paddle"}))


def renamed(values):
    """``values`` with the keys of RENAMED under their new names and values."""
    out = dict(values)
    for old, (new, meaning) in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, meaning.get(value, value))
    return out


def _check(name, value, typ):
    """Return ``value`` as ``typ`` or raise UserError naming the key."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{name}' must be a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_check(name, v, item) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as text
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 6.4e4 from YAML
    if typ is str and value is None:
        value = ""
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise UserError(f"config key '{name}' must be {typ.__name__}, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise UserError(f"config key '{name}' must be one of {', '.join(CHOICES[name])}, got {value!r}")
    return value


def make_config(values, base=None, cls=None):
    """A config from ``base`` (defaults if None) with ``values`` (a dict) applied and checked."""
    cls = cls or (type(base) if base is not None else TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = renamed(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {k: _check(k, v, hints[k]) for k, v in values.items()}
    cfg = dataclasses.replace(base if base is not None else cls(), **checked)
    check_limits(cfg)
    return cfg


def check_limits(cfg):
    """UserError naming the first key out of its range (LIMITS), or milestones that decrease."""
    for name, (ok, what) in LIMITS.items():
        if hasattr(cfg, name) and not ok(getattr(cfg, name)):
            raise UserError(f"config key '{name}' must be {what}, got {getattr(cfg, name)!r}")
    m = cfg.milestones
    if any(v < 0 for v in m) or any(b < a for a, b in zip(m, m[1:])):
        raise UserError(f"config key 'milestones' must be iteration numbers in increasing order, got {m}")
    if cfg.optimizer == "muon" and cfg.amp and cfg.amp_level == "O2":
        raise UserError("optimizer muon keeps float32 weights (muon.py): use --amp-level O1 with it")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML takes
    the second silently, so a recipe would not train what its first line says)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"config key '{key}' is given twice, on lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1} of {self.name}; keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} not found")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8")
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    return values


def field_comments(cls):
    """{field: its comment in the class's source}, the subclass's over its base's: a
    config key's comment is its --help. A comment goes on over lines that start with
    '#' and two spaces or more."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        name = None
        for line in inspect.getsource(klass).splitlines():
            field, more = re.match(r"\s+(\w+): [^#]*#\s*(.*)", line), re.match(r"\s+#\s{2,}(.*)", line)
            if field:
                name, comments[field.group(1)] = field.group(1), field.group(2)
            elif more and name:
                comments[name] += " " + more.group(1)
            else:
                name = None
    return comments


def add_config_arguments(parser, cls=TrainConfig):
    """One ``--key`` option per config field, its help the field's comment, its choices
    and its default; unset options stay None (no override)."""
    group = parser.add_argument_group("config keys (override the recipe)")
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        is_bool = typing.get_type_hints(cls)[f.name] is bool
        extra = dict(nargs="?", const="true") if is_bool else {}
        metavar = "{" + ",".join(CHOICES[f.name] if f.name in CHOICES else ("true", "false") if is_bool else ()) + "}"
        metavar = metavar if metavar != "{}" else f.name.upper()
        group.add_argument(flag, dest=f"cfg_{f.name}", default=None, metavar=metavar,
                           help=f"{comments.get(f.name, '')} (default {default!r})".lstrip(), **extra)
    for old in RENAMED:  # still taken, not listed
        group.add_argument("--" + old.replace("_", "-"), dest=f"cfg_{old}", default=None, help=argparse.SUPPRESS)


def cli_overrides(args, cls=TrainConfig):
    """The config values given on the command line, parsed as YAML scalars."""
    out = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f"cfg_{f.name}")
        if raw is not None:
            if typing.get_type_hints(cls)[f.name] is str:
                out[f.name] = raw  # paths and names stay text as typed
                continue
            try:
                out[f.name] = yaml.safe_load(raw)
            except yaml.YAMLError:
                out[f.name] = raw
    for old in RENAMED:
        if getattr(args, f"cfg_{old}", None) is not None:
            out[old] = getattr(args, f"cfg_{old}")
    return renamed(out)


def add_run_arguments(parser, cls, depths):
    """--config, --depth, --resume and one --key option per config field."""
    parser.add_argument("--config", help="a YAML recipe from configs/; command-line keys override it")
    parser.add_argument("--depth", type=int, choices=sorted(depths), help="shorthand for --model")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    add_config_arguments(parser, cls)


def run_config(args, cls, model=None, resume_state=None):
    """(cfg, resume_state) for a script's parsed ``args``: defaults <- --config FILE <-
    command-line keys. With --resume DIR the run's saved config (of ``resume_state``, its
    last checkpoint, which the script loads) is the base instead (see ``resume_config``)."""
    overrides = cli_overrides(args, cls)
    if model is not None:
        overrides["model"] = model
    if getattr(args, "resume", None):
        if args.config:
            raise UserError("--resume continues a run with its own saved config; drop --config")
        return resume_config(args.resume, overrides, cls, resume_state)
    if args.config and not os.path.isfile(args.config):
        raise UserError(f"--config {args.config}: no such file; give a YAML recipe such as configs/resnet18_cifar10.yaml")
    values = load_yaml(args.config) if args.config else {}
    return make_config({**values, **overrides}, cls=cls), None


def resume_config(run_dir, overrides, cls, state):
    """(cfg, checkpoint) to continue the run in ``run_dir`` (``state``: its last checkpoint,
    checkpoint.load_run): its saved config with the ``overrides`` that RESUME_FREE and
    RESUME_SCHEDULE allow; any other change is refused."""
    other = overrides.get("output_dir")
    if other and os.path.abspath(other) != os.path.abspath(run_dir):
        raise UserError(f"--resume {run_dir} continues the run where it is, not in --output-dir {other}; to continue "
                        f"a copy, copy {run_dir} to {other} and --resume {other}")
    saved = make_config(saved_values(state), cls=cls)
    cfg = make_config(dict(overrides, output_dir=run_dir), base=saved)
    changed = sorted(k for k in overrides if k not in RESUME_FREE + RESUME_SCHEDULE
                     and getattr(cfg, k) != getattr(saved, k))
    if changed:
        raise UserError(f"--resume cannot change {', '.join(changed)} (the checkpoint was trained with "
                        f"{', '.join(f'{k}={getattr(saved, k)!r}' for k in changed)}); start a new run instead")
    if cfg.epochs < state["epoch"]:
        raise UserError(f"--epochs {cfg.epochs}: the run has already finished {state['epoch']} epochs")
    return cfg, state


def from_checkpoint(state):
    """The config a checkpoint was trained with (a fine-tuning one has ``pretrained``)."""
    cls = FinetuneConfig if "pretrained" in state["config"] else TrainConfig
    values = saved_values(state)
    unknown = sorted(set(renamed(values)) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"the checkpoint's config has key(s) this version of the project does not know "
                        f"({', '.join(unknown)}): a newer version saved it; update the project (git pull) to read it")
    return make_config(values, cls=cls)


def saved_values(state):
    """A checkpoint's config values; one written before the ``dataset`` key (2026-12) names
    its data by its keys: a fine-tuning one (``data_dir``) an image folder, others CIFAR-10."""
    values = state["config"]
    return values if "dataset" in values else dict(values, dataset="folder" if "data_dir" in values else "cifar10")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def as_command(cfg):
    """The command line that trains ``cfg``: its script and every key that differs from
    the script's defaults (what a notebook's run records as its command)."""
    script = "finetune.py" if isinstance(cfg, FinetuneConfig) else "train_cifar10.py"
    defaults = type(cfg)()
    flags = []
    for key, value in to_dict(cfg).items():
        if value != getattr(defaults, key):
            flag = "--" + key.replace("_", "-")
            text = "true" if value is True else "false" if value is False else str(value).replace(" ", "")
            flags.append(flag if value is True else f"{flag} {shlex.quote(text) if isinstance(value, str) else text}")
    return " ".join(["python", script] + flags)




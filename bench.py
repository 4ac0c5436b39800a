"""Speed benchmark: images/s of a training step or an evaluation forward pass.

    python bench.py --model resnet18 --stem cifar --batch-size 128 --mode train
    python bench.py --model resnet20 --mode eval --batch-size 256 --compare ours,paddle.vision,torch
    python bench.py --model resnet20 --batch-size 128 --compare ours,ours+onednn,torch
    python bench.py --model resnet20 --batch-size 128 --compare ours+bf16,torch,torch+bf16 --rounds 3
    python bench.py --model resnet20 --batch-size 128 --compare torch+compile,torch+compile+bf16
    python bench.py --model resnet18 --mode eval --impl inference     # exported model, paddle.inference
    python bench.py --pipeline --data-file cifar-10-python.tar.gz
    python bench.py --loop --data-file cifar-10-python.tar.gz --model resnet20 --subset 2560

Random input, median of --steps timed steps after --warmup untimed ones (min and max
too), ms/step and peak memory (CPU: the process's peak RSS; GPU: Paddle's peak
allocation; the torch rows always report host RSS, so on a GPU their memory is not
comparable). The first step's time is reported apart: for the torch+compile rows it is
the compilation (compile_s: the first step less a median one). --compare runs each
implementation in its own process, so thread pools and allocators do not interfere, and
prints them side by side; IMPLS below lists them. --rounds N runs the --compare list N
times in turn and ends with each impl's median and each impl over every impl listed
after it (the median of the per-round ratios). --pipeline times the input pipeline alone
(DataLoader + training transforms on the real archive); --loop times one real epoch and
reports its wall time over the sum of its compute steps (the loop's overhead).
"""
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import config
import errors
import models
from errors import UserError


@dataclasses.dataclass(frozen=True)
class Impl:
    """One row of the comparison: what it runs, and how."""
    help: str
    framework: str = "paddle"   # paddle | torch | inference (ours exported, run by paddle.inference)
    cpu_kernels: bool = False   # paddle: our CPU kernels (cpu_kernels/), as CPU training runs by default
    layout: str = "nhwc"        # paddle with cpu_kernels: nhwc | nchw (oneDNN then reorders every activation)
    bf16: bool = False          # bf16 training: our kernels in bf16, or torch.autocast("cpu", bfloat16)
    channels_last: bool = False # torch: model and input in channels_last
    compile: bool = False       # torch: torch.compile (inductor), its compile time reported apart
    vision: bool = False        # paddle: paddle.vision.models.resnet instead of ours


IMPLS = {
    "ours": Impl("models/ in Paddle dygraph, on Paddle's own kernels"),
    "ours+onednn": Impl("the same on our CPU kernels (cpu_kernels/), NHWC, fp32: CPU training's default",
                        cpu_kernels=True),
    "ours+nchw": Impl("the same with NCHW activations (oneDNN reorders them for every convolution)",
                      cpu_kernels=True, layout="nchw"),
    "ours+bf16": Impl("ours+onednn training in bf16 (--amp --amp-dtype bfloat16 on amx_bf16 or avx512_bf16)",
                      cpu_kernels=True, bf16=True),
    "paddle.vision": Impl("paddle.vision.models.resnet (given our CIFAR stem where asked)", vision=True),
    "inference": Impl("ours exported with paddle.jit.save, run by paddle.inference (eval only)",
                      framework="inference"),
    "torch": Impl("the same network in PyTorch (torch_twin.py; pip install torch==2.13.0), NCHW",
                  framework="torch"),
    "torch+cl": Impl("the same in channels_last (model and input), what a tuned PyTorch user picks on a CPU",
                     framework="torch", channels_last=True),
    "torch+bf16": Impl("torch+cl under torch.autocast('cpu', dtype=torch.bfloat16), PyTorch's bf16 CPU recipe",
                       framework="torch", channels_last=True, bf16=True),
    "torch+compile": Impl("torch+cl under torch.compile (inductor), fp32", framework="torch",
                          channels_last=True, compile=True),
    "torch+compile+bf16": Impl("torch+compile under bf16 autocast", framework="torch", channels_last=True,
                               bf16=True, compile=True),
}


# ------------------------------------------------------------------ model builders
def paddle_model(impl, name, stem, num_classes):
    """The Paddle network ``impl`` (an Impl) times."""
    import paddle.nn as nn
    if not impl.vision:
        model = models.get_model(name, num_classes=num_classes, stem=stem)
        if impl.cpu_kernels:
            import cpu_kernels
            op, why_not = cpu_kernels.load()
            if op is None:
                raise UserError(f"our CPU kernels cannot be used here: {why_not}")
            if impl.bf16:
                import device as devices
                if devices.cpu_bf16_units(devices.cpu_flags()) is None:
                    raise UserError("bf16 training needs a CPU with amx_bf16 or avx512_bf16")
            cpu_kernels.use_in(model, dtype="bfloat16" if impl.bf16 else "float32", layout=impl.layout)
        return model
    import paddle.vision.models as pvm
    if not hasattr(pvm, name):
        raise UserError(f"--impl paddle.vision: paddle.vision has no {name}")
    model = getattr(pvm, name)(num_classes=num_classes)
    if stem == "cifar":  # the same CIFAR stem as ours: 3x3/1 conv, no max-pool
        model.conv1 = nn.Conv2D(3, 64, 3, padding=1, bias_attr=False)
        model.maxpool = nn.Identity()
    return model


# ----------------------------------------------------------------------- timing
def time_steps(step, steps, warmup, sync=lambda: None):
    """The seconds of each of ``steps`` timed steps after ``warmup`` untimed ones. The first
    step's seconds (compilation, for a compiled model) are left in time_steps.first, the
    timed steps' minor page faults in time_steps.faults."""
    time_steps.first = None
    for i in range(warmup):
        t = time.perf_counter()
        step()
        sync()
        if i == 0:
            time_steps.first = time.perf_counter() - t
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    time_steps.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return times


def bench_inference(args):
    """``inference``: ours exported with paddle.jit.save and run by paddle.inference."""
    import numpy as np
    import paddle
    import device as devices
    import predictors
    if args.mode != "eval":
        raise UserError("--impl inference is evaluation only: add --mode eval")
    device = devices.select_device(args.device)
    model = paddle_model(IMPLS["ours"], args.model, args.stem, args.num_classes)
    model.eval()
    batch = np.random.RandomState(0).randn(args.batch_size, 3, args.image_size, args.image_size).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        spec = [paddle.static.InputSpec([None, 3, args.image_size, args.image_size], "float32", "image")]
        paddle.jit.save(model, os.path.join(tmp, "model"), input_spec=spec)
        with open(os.path.join(tmp, predictors.META), "w") as f:
            json.dump(dict(class_names=[str(i) for i in range(args.num_classes)], preprocess={}), f)
        predictor = predictors.InferenceModelPredictor(tmp, device)
        return time_steps(lambda: predictor(batch), args.steps, args.warmup), device


def bench_paddle(args, impl):
    import numpy as np
    import paddle
    import paddle.nn.functional as F
    import device as devices
    device = "cpu" if impl.cpu_kernels else devices.select_device(args.device)  # our kernels are CPU kernels
    paddle.set_device(device)
    paddle.seed(0)
    shape = [args.batch_size, 3, args.image_size, args.image_size]
    x = paddle.to_tensor(np.random.RandomState(0).randn(*shape).astype("float32"))
    y = paddle.to_tensor(np.random.RandomState(1).randint(0, args.num_classes, args.batch_size).astype("int64"))
    sync = paddle.device.synchronize if device == "gpu" else (lambda: None)
    model = paddle_model(impl, args.model, args.stem, args.num_classes)
    if args.to_static:  # backend=None: 3.x would pick CINN on a GPU build (as train_net.wrap)
        model = paddle.jit.to_static(model, backend=None)
    autocast = dict(enable=args.amp and device == "gpu", dtype=args.amp_dtype)
    if args.mode == "train":
        model.train()
        opt = paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=model.parameters(), weight_decay=5e-4)
        scaler = paddle.amp.GradScaler(enable=args.amp and args.amp_dtype == "float16")  # as the real loop

        def step():
            with paddle.amp.auto_cast(**autocast):
                logits = model(x)
            loss = F.cross_entropy(logits.astype("float32"), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.clear_grad()
    else:
        model.eval()

        @paddle.no_grad()
        def step():
            with paddle.amp.auto_cast(**autocast):
                model(x)
    return time_steps(step, args.steps, args.warmup, sync), device


def bench_torch(args, impl):
    try:
        import torch
    except ImportError:
        raise UserError("the torch rows need PyTorch, for comparison only: pip install torch==2.13.0")
    import torch.nn.functional as TF
    import torch_twin
    if args.model not in torch_twin.MODELS:
        raise UserError(f"the torch rows have no twin of {args.model}; they have {', '.join(torch_twin.MODELS)}")
    torch.manual_seed(0)
    device = "cuda" if args.device in ("gpu", "auto") and torch.cuda.is_available() else "cpu"
    model = torch_twin.build(args.model, args.stem, args.num_classes).to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if impl.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    net = torch.compile(model) if impl.compile else model
    dtype = torch.bfloat16 if impl.bf16 or args.amp_dtype == "bfloat16" else torch.float16
    autocast = dict(device_type=device, dtype=dtype, enabled=impl.bf16 or args.amp)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            with torch.autocast(**autocast):
                logits = net(x)
            loss = TF.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast(**autocast):
                net(x)
    return time_steps(step, args.steps, max(args.warmup, 1 if impl.compile else 0), sync), device


def peak_memory_mb(device):
    if device == "gpu":
        import paddle
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_description():
    """lscpu's model name and the flags that pick the kernels."""
    import device as devices
    flags = devices.cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return dict(cpu=devices.describe("cpu").rsplit(" (", 1)[0], cpu_flags=" ".join(f for f in wanted if f in flags))


def run_one(args):
    impl = IMPLS[args.impl]
    run = dict(torch=bench_torch, inference=lambda a, _: bench_inference(a), paddle=bench_paddle)[impl.framework]
    times, device = run(args, impl)
    med = statistics.median(times)
    first = time_steps.first
    return dict(impl=args.impl, model=args.model, stem=args.stem, mode=args.mode, batch_size=args.batch_size,
                image_size=args.image_size, device=device, threads=os.environ.get("OMP_NUM_THREADS"),
                images_per_s=args.batch_size / med, images_per_s_min=args.batch_size / max(times),
                images_per_s_max=args.batch_size / min(times), ms_per_step=1000 * med, steps=len(times),
                page_faults_per_step=round(time_steps.faults / len(times)),
                keeps_freed_memory=cpu_settings.KEEPS_FREED_MEMORY,
                first_step_s=round(first, 3) if first is not None else None,
                compile_s=round(first - med, 1) if impl.compile and first is not None else None,
                peak_memory_mb=round(peak_memory_mb(device if impl.framework != "torch" else "cpu"), 1),
                **cpu_description())


def describe(r):
    compiled = f", compile {r['compile_s']:.0f} s (not in the steps)" if r.get("compile_s") is not None else ""
    return (f"{r['impl']:<18} {r['model']} ({r['stem']}) {r['mode']} batch {r['batch_size']} @{r['image_size']} "
            f"on {r['device']}: {r['images_per_s']:.1f} img/s (min {r['images_per_s_min']:.1f}, "
            f"max {r['images_per_s_max']:.1f}), {r['ms_per_step']:.0f} ms/step{compiled}, "
            f"{r['page_faults_per_step']} page faults/step, peak memory {r['peak_memory_mb']:.0f} MB")


# ------------------------------------------------------------ pipeline and loop
def bench_pipeline(args):
    """The input pipeline alone: the training DataLoader over the real archive, no model."""
    import data
    cfg = config.make_config(dict(data_file=args.data_file, subset=args.subset, batch_size=args.batch_size,
                                  num_workers=args.num_workers, val_size=args.val_size))
    train = data.load(cfg).splits["train"]
    n, start = 0, time.perf_counter()
    for images, labels in data.TrainBatches(train, cfg).epoch(0):
        n += labels.shape[0]
    seconds = time.perf_counter() - start
    return dict(kind="pipeline", images=n, seconds=seconds, images_per_s=n / seconds,
                num_workers=args.num_workers, batch_size=args.batch_size)


def bench_loop(args):
    """One real training epoch: its wall time against the sum of its compute steps
    (forward, backward, update, each synchronised): the difference is the loop's
    overhead (waiting for data, logging, Python)."""
    import paddle
    import checkpoint
    import data
    import device as devices
    import engine
    import train_net
    cfg = config.make_config(dict(model=args.model, stem=args.stem, data_file=args.data_file, subset=args.subset,
                                  val_size=args.val_size,
                                  batch_size=args.batch_size, num_workers=args.num_workers, epochs=1,
                                  log_every=10 ** 9, device=args.device))
    device = devices.select_device(cfg.device)
    sync = paddle.device.synchronize if device == "gpu" else (lambda: None)
    train = data.load(cfg).splits["train"]
    model = checkpoint.build_model(cfg, 10)
    train_net.choose_kernels(model, cfg, device)  # as training runs it
    opt, sched = engine.build_optimizer(cfg, model.parameters(), len(train) // cfg.batch_size + 1)
    compute, started = [], []

    def forward_starts(layer, inputs):  # the compute of one step = forward .. optimizer update
        sync()
        started.append(time.perf_counter())
    model.register_forward_pre_hook(forward_starts)
    original_clear = opt.clear_grad

    def timed_clear(*a, **k):
        sync()
        compute.append(time.perf_counter() - started[-1])
        return original_clear(*a, **k)
    opt.clear_grad = timed_clear
    run = checkpoint.RunState()
    training = engine.Training(cfg, model, opt, sched, paddle.amp.GradScaler(enable=False), run)
    loader = data.TrainBatches(train, cfg).epoch(0)
    start = time.perf_counter()
    engine.train_one_epoch(training, loader, 0)
    sync()
    wall = time.perf_counter() - start
    return dict(kind="loop", model=args.model, images=run.seen, wall_s=wall, compute_s=sum(compute),
                overhead_pct=100 * (wall - sum(compute)) / wall, num_workers=args.num_workers)


def check_args(args):
    """One line for an option bench.py cannot run with."""
    if args.model not in models.MODELS:
        raise UserError(f"--model {args.model}: unknown; valid: {', '.join(models.MODELS)}")
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--batch-size", args.batch_size, 1), ("--image-size", args.image_size, 8),
                               ("--num-classes", args.num_classes, 1), ("--num-workers", args.num_workers, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.compare:
        impls = [i for i in args.compare.split(",") if i]
        wrong = [i for i in impls if i not in IMPLS]
        if not impls or wrong:
            raise UserError(f"--compare {args.compare!r}: give comma-separated impls of {', '.join(IMPLS)}")
    bf16 = [i for i in (args.compare.split(",") if args.compare else [args.impl]) if IMPLS[i].bf16]
    if bf16 and args.mode == "eval":  # model.eval() and torch.no_grad() would time fp32 under a bf16 name
        raise UserError(f"--impl {bf16[0]} times bf16 training; drop it from --mode eval (bf16 inference: "
                        "eval.py --inference --precision bf16)")
    if args.rounds < 1 or (args.rounds > 1 and not args.compare):
        raise UserError(f"--rounds {args.rounds}: give a count of at least 1, with --compare (rounds of its list)")


def run_in_process(impl, argv):
    """One --impl run of bench.py in a fresh process: its result, or None after printing
    why it failed. argv: this run's own options without --compare and --rounds."""
    # PyTorch as it runs out of the box: glibc's malloc as it is, OpenMP's own wait policy
    env = dict(os.environ, RESNET_CPU_TUNING="off") if IMPLS[impl].framework == "torch" else None
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--impl", impl, "--json"],
                          capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not line:
        print(f"{impl:<18} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return None
    return json.loads(line[-1])


def without_options(argv, *flags):
    """argv with each of flags and its value taken out (both spellings: --flag v, --flag=v)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def compare(args, argv):
    """--compare: every impl in its own process, the list run --rounds times in turn
    (impl 1, 2, ... then again), so that a machine whose speed drifts slows every impl of a
    round alike. After several rounds: each impl's median, and each impl over every impl
    listed after it as the median of the per-round ratios (the figure to quote)."""
    impls = [i for i in args.compare.split(",") if i]
    rest = without_options(argv, "--compare", "--rounds")
    results, per_round = [], []
    for r in range(1, args.rounds + 1):
        this_round = {}
        for impl in impls:
            result = run_in_process(impl, rest)
            if result is None:
                continue
            result["round"] = r
            results.append(result)
            this_round[impl] = result["images_per_s"]
            prefix = f"round {r}/{args.rounds}  " if args.rounds > 1 else ""
            print(json.dumps(result) if args.json else prefix + describe(result), flush=True)
        per_round.append(this_round)
    if args.rounds > 1:
        summary = round_summary(impls, per_round)
        print(json.dumps(summary) if args.json else describe_rounds(summary), flush=True)
    return results


def round_summary(impls, per_round):
    """impls' medians over the rounds, and the median over the rounds of a/b for every a
    listed before b (the rounds where both ran)."""
    def stats(values):
        return dict(median=round(statistics.median(values), 3) if values else None, runs=[round(v, 3) for v in values])
    speeds = {i: [r[i] for r in per_round if i in r] for i in impls}
    ratios = {f"{a} x {b}": [r[a] / r[b] for r in per_round if a in r and b in r]
              for n, a in enumerate(impls) for b in impls[n + 1:]}
    return dict(kind="rounds", rounds=len(per_round), **cpu_description(),
                images_per_s={i: stats(v) for i, v in speeds.items()}, ratios={k: stats(v) for k, v in ratios.items()})


def describe_rounds(summary):
    def row(name, s, width, digits, missing):
        if s["median"] is None:
            return f"  {name:<{width}} -  ({missing})"
        runs = " / ".join(f"{v:.{digits}f}" for v in s["runs"])
        return f"  {name:<{width}} {s['median']:.{digits}f}  ({runs})"
    lines = [f"on {summary['cpu']} ({summary['cpu_flags']}), over {summary['rounds']} rounds, "
             "images/s (median; every round):"]
    lines += [row(impl, s, 18, 1, "failed in every round") for impl, s in summary["images_per_s"].items()]
    lines.append("ratios (median of the per-round ratios; every round):")
    lines += [row(pair, s, 40, 2, "no round ran both") for pair, s in summary["ratios"].items()]
    return "\n".join(lines)


def main(argv=None):
    with errors.user_errors():
        return run(argv)


def run(argv=None):
    parser = errors.ArgumentParser(description="Images/s of ResNet training and evaluation.")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mode", choices=["train", "eval"], default="train")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--impl", default="ours", choices=list(IMPLS),
                        help="; ".join(f"{name}: {impl.help}" for name, impl in IMPLS.items()))
    parser.add_argument("--compare", help="comma-separated impls, each timed in its own process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare: run the list this many times in turn, then medians and ratios")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--to-static", action="store_true", help="paddle.jit.to_static the model")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--pipeline", action="store_true", help="time the input pipeline alone")
    parser.add_argument("--loop", action="store_true", help="time one real epoch and its overhead")
    parser.add_argument("--data-file", default="")
    parser.add_argument("--subset", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON line per result")
    args = parser.parse_args(argv)
    check_args(args)
    if args.pipeline or args.loop:
        result = bench_pipeline(args) if args.pipeline else bench_loop(args)
        print(json.dumps(result) if args.json else
              " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        return [result]
    if args.compare:
        return compare(args, argv if argv is not None else sys.argv[1:])
    result = run_one(args)
    print(json.dumps(result) if args.json else describe(result))
    return [result]


if __name__ == "__main__":
    main()

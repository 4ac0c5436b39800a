"""The degradation study (He et al. 2015, Fig. 1 and Fig. 6) in one command.

    python degradation.py --data-file cifar-10-python.tar.gz --subset 10000 --epochs 10
    python degradation.py ... --seeds 0,1,2        # every network with three seeds: mean and spread

Trains plain-20, plain-56, ResNet-20 and ResNet-56 with one shared recipe (the
paper's: SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, LR /10 at 50% and 75%
of the run, as 32k and 48k of its 64k iterations), through train_cifar10's own loop.
Writes, in --output-dir: one sub-folder per network and seed (NET/seedS: checkpoints,
metrics.csv), degradation.png (training error dashed, held-out error solid, plain left,
residual right; with several seeds the mean and the min..max band), results.csv (one row
per network and seed) and results.md (per network: the mean and the range over the
seeds, with the evidence: Paddle version, device, seeds, command). A claim about
training dynamics from a short run holds only if it holds for every seed.

Run it again and finished networks are reused, an interrupted one resumes.
"""
import csv
import io
import math
import os
import sys

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle and numpy load)
import numpy as np
import yaml

import checkpoint
import config
import data
import engine
import errors
import files
import models
import plots
import progress

NETS = ("plain20", "plain56", "resnet20", "resnet56")


def recipe(net, seed, args, train_size):
    iters = args.epochs * math.ceil(train_size / args.batch_size)
    return config.make_config(dict(
        model=net, epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
        momentum=0.9, weight_decay=1e-4, schedule="step", gamma=0.1,
        milestones=[iters // 2, iters * 3 // 4], augment="crop_flip", data_file=args.data_file,
        subset=args.subset, val_size=args.val_size, seed=seed, num_workers=args.num_workers,
        device=args.device, output_dir=os.path.join(args.output_dir, net, f"seed{seed}"), log_every=args.log_every))


def train(net, seed, args, loaded):
    """Train ``net`` with ``seed`` unless its results are there; resume it if it was
    interrupted. Returns its results.yaml."""
    cfg = recipe(net, seed, args, len(loaded.splits["train"]))
    done = os.path.join(cfg.output_dir, "results.yaml")
    last = os.path.join(cfg.output_dir, checkpoint.LAST)
    resume = checkpoint.load(last) if os.path.exists(last) else None
    if resume is not None:
        changed = recipe_changes(resume["config"], cfg)
        if changed:
            raise errors.UserError(f"{cfg.output_dir} holds a run of another recipe ({changed}); use another "
                                   "--output-dir, or the budget it was run with")
    if resume is not None and os.path.exists(done):
        progress.log(f"{net} seed {seed}: finished before, reusing {done}")
        with open(done) as f:
            return yaml.safe_load(f)
    progress.log(f"== {net} seed {seed}" + (" (resuming)" if resume else ""))
    return engine.fit(cfg, loaded, resume_state=resume)


def recipe_changes(saved, cfg):
    """What differs between a saved run's config and ``cfg``, beyond how it is executed
    (config.RESUME_FREE), as "key saved -> new" text; "" when it is the same recipe."""
    new = config.to_dict(cfg)
    keys = [k for k in new if k not in config.RESUME_FREE and saved.get(k) != new[k]]
    return ", ".join(f"{k} {saved.get(k)!r} -> {new[k]!r}" for k in keys)


def read_history(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def summary_table(rows, evidence):
    """results.md: per network, the mean and the min..max over the seeds of each error."""
    def stat(values):
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{np.mean(values):.2f} ({min(values):.2f}..{max(values):.2f})"
    nets = list(dict.fromkeys(r["network"] for r in rows))
    lines = [evidence, "",
             "| network | params | seeds | epochs | train error % | val error % | test error % | train time s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for net in nets:
        mine = [r for r in rows if r["network"] == net]
        lines.append(f"| {net} | {mine[0]['params']:,} | {','.join(str(r['seed']) for r in mine)} | {mine[0]['epochs']} | "
                     + " | ".join(stat([r[k] for r in mine]) for k in ("train_error", "val_error", "test_error"))
                     + f" | {np.mean([r['train_time_s'] for r in mine]):.0f} |")
    return lines


def main(argv=None):
    parser = errors.ArgumentParser(description="Plain vs residual networks on CIFAR-10 (the degradation problem).")
    parser.add_argument("--data-file", default="", help="cifar-10-python.tar.gz (default: Paddle's download)")
    parser.add_argument("--subset", type=int, default=10000, help="training images (0: all 45k)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated factory names")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--output-dir", default="runs/degradation")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    rows, histories = [], {}
    with errors.user_errors():
        if not nets:
            raise errors.UserError("--nets is empty; give comma-separated factory names, e.g. plain20,resnet20")
        unknown = [n for n in nets if n not in models.MODELS]
        if unknown:
            raise errors.UserError(f"--nets: unknown network(s) {', '.join(unknown)}; valid: {', '.join(models.MODELS)}")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            seeds = []
        if not seeds:
            raise errors.UserError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
        recipe(nets[0], seeds[0], args, 1)  # its keys are checked before the data is read
        split = config.make_config(dict(data_file=args.data_file, subset=args.subset, val_size=args.val_size,
                                        augment="crop_flip"))
        loaded = data.load(split)  # loaded once, shared: the same split for every net and seed
        for net in nets:
            params = sum(p.size for p in models.get_model(net).parameters() if not p.stop_gradient)
            for seed in seeds:
                r = train(net, seed, args, loaded)
                out = recipe(net, seed, args, len(loaded.splits["train"])).output_dir
                histories.setdefault(net, []).append(read_history(out))
                rows.append(dict(network=net, seed=seed, params=params, epochs=r["epochs"], iterations=r["iterations"],
                                 train_error=round(100 * (1 - r["final_train_acc"]), 2),
                                 val_error=round(100 * (1 - r["final_val_acc"]), 2),
                                 test_error=round(100 * (1 - r["final_test_acc"]), 2),
                                 train_time_s=round(r["train_time_s"], 1)))
                evidence = r

        table = io.StringIO()
        writer = csv.DictWriter(table, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        files.write_text(os.path.join(args.output_dir, "results.csv"), table.getvalue())
        header = (f"Evidence: Paddle {evidence.get('paddle_version')}, {evidence.get('device')}, seeds "
                  f"{','.join(map(str, seeds))}; per network the mean (min..max) over the seeds; command: "
                  f"python degradation.py {' '.join(argv if argv is not None else sys.argv[1:])}")
        lines = summary_table(rows, header)
        files.write_text(os.path.join(args.output_dir, "results.md"), "\n".join(lines) + "\n")
        n_train = len(loaded.splits["train"])  # --subset, or what --val-size leaves of the 50,000
        plots.plot_degradation(os.path.join(args.output_dir, "degradation.png"), histories,
                               f"CIFAR-10, {n_train} training images, {args.epochs} epochs, batch {args.batch_size}, "
                               f"seeds {','.join(map(str, seeds))}; dashed: training error, solid: held-out "
                               f"({args.val_size} val images) error")
        print("\n".join(lines))
        print(f"wrote {args.output_dir}/degradation.png, results.csv, results.md")


if __name__ == "__main__":
    main()

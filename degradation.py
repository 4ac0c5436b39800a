"""The degradation study (He et al. 2015, Fig. 1 and Fig. 6) in one command.

    python degradation.py --data-file ../data/cifar-10-python.tar.gz --subset 10000 --epochs 10

Trains plain-20, plain-56, ResNet-20 and ResNet-56 with one shared recipe (the
paper's: SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, LR /10 at 50% and 75%
of the run, as 32k and 48k of its 64k iterations), through train_cifar10's own loop.
Writes, in --output-dir: one sub-folder per network (checkpoints, metrics.csv),
degradation.png (training error dashed, held-out error solid, plain left, residual
right), results.csv and results.md (final train / val / test error per network).

Run it again and finished networks are reused, an interrupted one resumes.
"""
import argparse
import csv
import math
import os

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import yaml

import checkpoint
import config
import data
import engine
import plots

NETS = ("plain20", "plain56", "resnet20", "resnet56")


def recipe(net, args, train_size):
    iters = args.epochs * math.ceil(train_size / args.batch_size)
    return config.make_config(dict(
        model=net, epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr,
        momentum=0.9, weight_decay=1e-4, schedule="step", gamma=0.1,
        milestones=[iters // 2, iters * 3 // 4], augment="crop_flip", data_file=args.data_file,
        subset=args.subset, val_size=args.val_size, seed=args.seed, num_workers=args.num_workers,
        device=args.device, output_dir=os.path.join(args.output_dir, net), log_every=args.log_every))


def train(net, args, datasets):
    """Train ``net`` unless its results are there; resume it if it was interrupted."""
    cfg = recipe(net, args, len(datasets["train"]))
    done = os.path.join(cfg.output_dir, "results.yaml")
    if os.path.exists(done):
        engine.log(f"{net}: finished before, reusing {done}")
        return
    last = os.path.join(cfg.output_dir, checkpoint.LAST)
    resume = checkpoint.load(last) if os.path.exists(last) else None
    if resume is not None and resume["config"] != config.to_dict(cfg):
        raise config.UserError(f"{cfg.output_dir} holds a run with another recipe; use another --output-dir")
    engine.log(f"== {net}" + (" (resuming)" if resume else ""))
    engine.fit(cfg, datasets, data.CIFAR10_CLASSES, resume_state=resume,
               extra_state=dict(preprocess=data.CIFAR10_PREPROCESS))


def read_history(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plain vs residual networks on CIFAR-10 (the degradation problem).")
    parser.add_argument("--data-file", default="", help="cifar-10-python.tar.gz (default: Paddle's download)")
    parser.add_argument("--subset", type=int, default=10000, help="training images (0: all 45k)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated factory names")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--output-dir", default="runs/degradation")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    with config.user_errors():
        if not nets:
            raise config.UserError("--nets is empty; give comma-separated factory names, e.g. plain20,resnet20")
        recipe(nets[0], args, args.subset or 45000)  # its keys are checked before the data is read
        split = config.make_config(dict(data_file=args.data_file, subset=args.subset, val_size=args.val_size,
                                        seed=args.seed, augment="crop_flip"))
        datasets = data.cifar10_splits(split)  # loaded once, shared: the same split for every net
        for net in nets:
            train(net, args, datasets)

    rows, histories = [], {}
    for net in nets:
        out = os.path.join(args.output_dir, net)
        with open(os.path.join(out, "results.yaml")) as f:
            r = yaml.safe_load(f)
        histories[net] = read_history(out)
        params = sum(p.size for p in models.get_model(net).parameters() if not p.stop_gradient)
        rows.append(dict(network=net, params=params,
                         epochs=r["epochs"], iterations=r["iterations"],
                         train_error=round(100 * (1 - r["final_train_acc"]), 2),
                         val_error=round(100 * (1 - r["final_val_acc"]), 2),
                         test_error=round(100 * (1 - r["final_test_acc"]), 2),
                         train_time_s=round(r["train_time_s"], 1)))
    with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| network | params | epochs | train error % | val error % | test error % | train time s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"] + [
        f"| {r['network']} | {r['params']:,} | {r['epochs']} | {r['train_error']} | {r['val_error']} | "
        f"{r['test_error']} | {r['train_time_s']} |" for r in rows]
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    n_train = args.subset or 45000
    plots.plot_degradation(os.path.join(args.output_dir, "degradation.png"), {n: [h] for n, h in histories.items()},
         f"CIFAR-10, {n_train} training images, {args.epochs} epochs, batch {args.batch_size}; "
         f"dashed: training error, solid: held-out ({args.val_size} val images) error")
    print("\n".join(lines))
    print(f"wrote {args.output_dir}/degradation.png, results.csv, results.md")


if __name__ == "__main__":
    main()

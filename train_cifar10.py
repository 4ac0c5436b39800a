"""Train a ResNet on CIFAR-10.

    python train_cifar10.py --depth 18 --data-file ../data/cifar-10-python.tar.gz
    python train_cifar10.py --config configs/paper_resnet_cifar.yaml --depth 56
    python train_cifar10.py --model plain20 --epochs 5 --subset 10000
    python train_cifar10.py --resume runs/cifar10          # continue exactly where it stopped

Selection uses a validation split held out of the training set (--val-size);
the test set is evaluated once at the end, for the final and the best model.
"""
import argparse
import sys

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import config
import data
import engine

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152",
          20: "resnet20", 32: "resnet32", 44: "resnet44", 56: "resnet56", 110: "resnet110"}


def build_parser():
    parser = argparse.ArgumentParser(description="Train a ResNet on CIFAR-10.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe from configs/; command-line keys override it")
    parser.add_argument("--depth", type=int, choices=sorted(DEPTHS),
                        help="shorthand for --model: 18..152 (CIFAR stem) or the paper's 20..110")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    config.add_config_arguments(parser)
    return parser


def resolve_config(argv):
    """(cfg, resume_state) from the command line; resume takes the run's saved config,
    with any key given on the command line (e.g. a longer --epochs) applied on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = config.cli_overrides(args)
    if args.depth is not None:
        overrides["model"] = DEPTHS[args.depth]
    if args.resume:
        state = engine.load_checkpoint(args.resume)
        base = config.make_config(state["config"])
        overrides["output_dir"] = args.resume
        return config.make_config(overrides, base=base), state
    values = config.load_yaml(args.config) if args.config else {}
    return config.make_config({**values, **overrides}), None


def main(argv=None):
    try:
        cfg, resume_state = resolve_config(argv)
        datasets = data.cifar10_splits(cfg)
        engine.fit(cfg, datasets, data.CIFAR10_CLASSES, resume_state=resume_state)
    except (config.ConfigError, data.DataError, engine.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

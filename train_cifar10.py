"""Train a ResNet on CIFAR-10.

    python train_cifar10.py --depth 18 --data-file ../data/cifar-10-python.tar.gz
    python train_cifar10.py --config configs/paper_resnet_cifar.yaml --depth 56
    python train_cifar10.py --model plain20 --epochs 5 --subset 10000
    python train_cifar10.py --resume runs/cifar10          # continue exactly where it stopped

Selection uses a validation split held out of the training set (--val-size);
the test set is evaluated once at the end, for the final and the best model.
"""
import argparse

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import config
import data
import engine

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152",
          20: "resnet20", 32: "resnet32", 44: "resnet44", 56: "resnet56", 110: "resnet110"}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a ResNet on CIFAR-10.")
    config.add_run_arguments(parser, config.TrainConfig, DEPTHS)
    args = parser.parse_args(argv)
    with config.user_errors():
        cfg, resume_state = config.run_config(args, config.TrainConfig, DEPTHS.get(args.depth))
        datasets = data.cifar10_splits(cfg)
        return engine.fit(cfg, datasets, data.CIFAR10_CLASSES, resume_state=resume_state,
                          extra_state=dict(preprocess=data.cifar10_preprocess(cfg.normalize)))


if __name__ == "__main__":
    main()

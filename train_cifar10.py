"""Train a ResNet on CIFAR-10 (or CIFAR-100, or an image folder, from scratch).

    python train_cifar10.py --depth 18 --data-file cifar-10-python.tar.gz
    python train_cifar10.py --dataset cifar100 --depth 20 --data-file cifar-100-python.tar.gz
    python train_cifar10.py --dataset folder --data-dir flowers/ --depth 18 --image-size 64
    python train_cifar10.py --config configs/paper_resnet_cifar.yaml --depth 56
    python train_cifar10.py --model plain20 --epochs 5 --subset 10000
    python train_cifar10.py --resume runs/cifar10          # continue exactly where it stopped

Selection uses a validation split held out of the training set (--val-size);
the test set is evaluated once at the end, for the final and the best model.
"""

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import checkpoint
import config
import data
import engine
import errors

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152",
          20: "resnet20", 32: "resnet32", 44: "resnet44", 56: "resnet56", 110: "resnet110"}


def main(argv=None):
    parser = errors.ArgumentParser(description="Train a ResNet on CIFAR-10, CIFAR-100 or an image folder.")
    config.add_run_arguments(parser, config.TrainConfig, DEPTHS)
    args = parser.parse_args(argv)
    with errors.user_errors():
        cfg, resume_state = config.run_config(args, config.TrainConfig, DEPTHS.get(args.depth),
                                              checkpoint.load_run(args.resume))
        return engine.fit(cfg, data.load(cfg), resume_state=resume_state)


if __name__ == "__main__":
    main()

"""Datasets: CIFAR-10 through paddle.vision, a seeded train/val split, the transforms.

Augmentation is reproducible per sample: before transforming sample ``i`` in epoch
``e`` the dataset seeds Python's ``random`` (which paddle.vision's random transforms
draw from) with (seed, e, i). A run then gives the same images whatever
``num_workers`` is, and a resumed run sees exactly the images the uninterrupted run
would have (Paddle re-seeds each worker from a fresh random number per iterator).
"""
import os
import random
import tarfile

import numpy as np
import paddle
import paddle.vision.transforms as T

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the 50k CIFAR-10 training images (checked on the real archive).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DataError(RuntimeError):
    """Bad or missing data: the message is one line a user can act on."""


class SplitDataset(paddle.io.Dataset):
    """``base[indices[i]]`` with ``transform`` applied, seeded per (seed, epoch, index).

    base[j] must return (image, label). Call ``set_epoch(e)`` before each epoch.
    """

    def __init__(self, base, indices, transform=None, seed=None):
        super().__init__()
        self.base, self.indices, self.transform, self.seed = base, list(indices), transform, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.base[self.indices[i]]
        if self.transform is not None:
            if self.seed is not None:
                random.seed(f"{self.seed}-{self.epoch}-{i}")
            image = self.transform(image)
        return image, np.asarray(label, dtype="int64")


def cifar10_transforms(augment):
    """(train, eval) transforms on PIL images -> float32 [3, 32, 32], normalised."""
    normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    train = {
        "crop_flip": [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()],  # the paper, section 4.2
        "flip": [T.RandomHorizontalFlip()],
        "none": [],
    }[augment]
    return T.Compose(train + normalize), T.Compose(normalize)


def check_data_file(path, what="CIFAR-10", flag="--data-file"):
    """A clear error for a missing path, a directory (Paddle issue #32901) or a non-archive."""
    if not os.path.exists(path):
        raise DataError(f"{flag} {path}: no such file; pass the path of cifar-10-python.tar.gz")
    if os.path.isdir(path):
        raise DataError(f"{flag} {path} is a directory; pass the archive file itself, "
                        f"e.g. {os.path.join(path, 'cifar-10-python.tar.gz')}")
    if not tarfile.is_tarfile(path):
        raise DataError(f"{flag} {path} is not a tar archive; {what} must be the official cifar-10-python.tar.gz")


def load_cifar10(data_file, mode):
    """paddle.vision's Cifar10 for ``mode`` 'train' or 'test', images as PIL, no transform.

    data_file: a local official-layout archive, or "" for Paddle's download (cached).
    """
    from paddle.vision.datasets import Cifar10
    if data_file:
        check_data_file(data_file)
        try:
            return Cifar10(data_file=data_file, mode=mode, download=False, backend="pil")
        except Exception as e:  # a tar of the wrong layout fails deep inside Paddle
            raise DataError(f"--data-file {data_file} could not be read as CIFAR-10 "
                            f"({type(e).__name__}: {e}); it must be the official cifar-10-python.tar.gz layout")
    try:
        return Cifar10(mode=mode, download=True, backend="pil")
    except Exception as e:
        raise DataError(f"CIFAR-10 is not downloaded and could not be downloaded ({type(e).__name__}); "
                        "pass a local copy with --data-file PATH/cifar-10-python.tar.gz")


def split_indices(n, val_size, seed=0):
    """(train, val) index lists: a seeded permutation, the first ``val_size`` to validation.

    The split seed is fixed (0) by default so that every run and eval.py see the same
    validation images, whatever the training seed.
    """
    if not 0 <= val_size < n:
        raise DataError(f"--val-size {val_size} must be between 0 and {n - 1} (the training set has {n} images)")
    perm = np.random.RandomState(seed).permutation(n)
    return sorted(perm[val_size:].tolist()), sorted(perm[:val_size].tolist())


def cifar10_splits(cfg):
    """{'train', 'val', 'test'} SplitDatasets for a TrainConfig (val empty when val_size=0)."""
    train_tf, eval_tf = cifar10_transforms(cfg.augment)
    train_base = load_cifar10(cfg.data_file, "train")
    test_base = load_cifar10(cfg.data_file, "test")
    train_idx, val_idx = split_indices(len(train_base), cfg.val_size)
    if cfg.subset:
        if cfg.subset > len(train_idx):
            raise DataError(f"--subset {cfg.subset} is larger than the {len(train_idx)} training images left after --val-size")
        train_idx = train_idx[:cfg.subset]
    return dict(train=SplitDataset(train_base, train_idx, train_tf, seed=cfg.seed),
                val=SplitDataset(train_base, val_idx, eval_tf),
                test=SplitDataset(test_base, range(len(test_base)), eval_tf))

"""Tiny datasets in the official layouts, built by the tests themselves, and what the
tests share around a run: interrupting it, reading its checkpoints, the CI suites' marks."""
import io
import os
import pickle
import tarfile

import numpy as np
import paddle
import pytest

import checkpoint
import config
import models

# The repository: where the tests run our scripts from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pickles(path, files):
    """A .tar.gz at ``path`` holding each {name: object} pickled, as the CIFAR archives are."""
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def make_cifar_archive(path, n_train=300, n_test=100, seed=0, learnable=True):
    """A cifar-10-python.tar.gz in the official layout with random images.

    learnable=True gives each class a distinct mean colour so a tiny net can learn it.
    """
    rng = np.random.RandomState(seed)

    def batch(n):
        labels = rng.randint(0, 10, n)
        images = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.int32)
        if learnable:
            images = images // 4 + (labels[:, None, None, None] * 19 + np.array([0, 60, 120])[None, :, None, None]) % 190
        return {b"data": images.clip(0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist(),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": b"tiny"}

    per = n_train // 5
    files = {f"cifar-10-batches-py/data_batch_{i}": batch(per) for i in range(1, 6)}
    files["cifar-10-batches-py/test_batch"] = batch(n_test)
    files["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"c%d" % i for i in range(10)]}
    return write_pickles(path, files)


def make_cifar100_archive(path, n_train=400, n_test=200, seed=0):
    """A cifar-100-python.tar.gz in the official layout (train, test, meta; fine and
    coarse labels), each class a distinct mean colour."""
    rng = np.random.RandomState(seed)

    def split(n):
        fine = np.arange(n) % 100  # every class in every split
        images = rng.randint(0, 64, (n, 3, 32, 32)) + (fine[:, None, None, None] * np.array([7, 13, 29])[None, :, None, None]) % 192
        return {b"data": images.clip(0, 255).astype(np.uint8).reshape(n, 3072), b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(), b"filenames": [b"img_%d.png" % i for i in range(n)],
                b"batch_label": b"tiny"}

    files = {"cifar-100-python/train": split(n_train), "cifar-100-python/test": split(n_test),
             "cifar-100-python/meta": {b"fine_label_names": [b"class_%02d" % i for i in range(100)],
                                       b"coarse_label_names": [b"super_%02d" % i for i in range(20)]}}
    return write_pickles(path, files)


def make_image_folder(root, classes=("cats", "dogs", "owls"), per_class=8, seed=0):
    """A tiny class-per-folder image set: PNG and JPEG files in RGB, L, P, RGBA and CMYK."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    modes = [("RGB", "png"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("RGB", "jpg")]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            base = np.zeros((40, 48, 3), np.uint8) + np.array([80 * c, 255 - 80 * c, 40], np.uint8)
            pixels = (base + rng.randint(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
            mode, ext = modes[i % len(modes)]
            img = Image.fromarray(pixels).convert(mode)
            img.save(os.path.join(root, name, f"{i}.{ext}"))
    return str(root)


class Interrupt:
    """Wraps a loader so that it raises KeyboardInterrupt (Ctrl-C) after ``after`` batches."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.after:
                raise KeyboardInterrupt
            yield batch


def interrupt_in_epoch(train_one_epoch, epoch, step):
    """engine.train_one_epoch, but Ctrl-C is pressed after ``step`` batches of ``epoch`` (0-based)."""
    def wrapped(training, loader, this_epoch):
        if this_epoch == epoch:
            loader = Interrupt(loader, step)
        return train_one_epoch(training, loader, this_epoch)
    return wrapped


def checkpoint_weights(path):
    """A checkpoint's model weights as NumPy arrays, by parameter name."""
    return {k: np.asarray(v) for k, v in checkpoint.load(path)["model"].items()}


# A test of nothing that depends on which CPU kernels train: CI's suite without the oneDNN
# headers (CPU_KERNELS_EXPECTED=absent) leaves it to its two other suites, to keep CI short.
kernel_independent = pytest.mark.skipif(os.environ.get("CPU_KERNELS_EXPECTED") == "absent",
                                        reason="kernel-independent: run by CI's suites with the operators")

# A test of our own code around a step Paddle 2.6 and 3.x take alike, whose Paddle part
# every suite with the operators runs anyway (its first build of them): CI's Paddle 2.6
# suite with the operators (CI_PADDLE_SUITE=2.6) leaves it to the Paddle 3 suite, to keep
# CI short.
once_with_the_operators = pytest.mark.skipif(os.environ.get("CI_PADDLE_SUITE") == "2.6",
                                             reason="run by CI's Paddle 3 suite with the operators")

# A test that never reaches our kernels (no training or evaluation step: model counts,
# shapes, command lines refused before any step): it runs alike in CI's two Paddle 2.6
# suites, so the one with the operators (CI_PADDLE_SUITE=2.6, CPU_KERNELS_EXPECTED=built)
# leaves it to the one without them, to keep CI short.
kernel_free = pytest.mark.skipif(os.environ.get("CI_PADDLE_SUITE") == "2.6"
                                 and os.environ.get("CPU_KERNELS_EXPECTED") == "built",
                                 reason="kernel-free: run by CI's Paddle 2.6 suite without the operators")


def checkpoint_of(tmp_path, name, classes, size):
    """A checkpoint of ``name`` with random weights (what fit writes, minus the training state)
    for a folder of ``classes`` at ``size``: (its path, the model)."""
    paddle.seed(1)
    model = models.get_model(name, num_classes=len(classes), stem="cifar")
    cfg = config.make_config(dict(model=name, stem="cifar", dataset="folder", image_size=size))
    # BatchNorm running statistics away from 0/1, so that the ONNX graph's BN is exercised
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._mean.set_value(paddle.rand(layer._mean.shape) * 0.2)
            layer._variance.set_value(paddle.rand(layer._variance.shape) + 0.5)
    state = dict(model=model.state_dict(), config=config.to_dict(cfg), class_names=list(classes), epoch=1,
                 preprocess=dict(resize=size, crop=size, mean=[0.5] * 3, std=[0.25] * 3))
    path = str(tmp_path / f"{name}.pdckpt")
    paddle.save(state, path)
    return path, model

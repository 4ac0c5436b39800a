"""Tiny datasets in the official layouts, built by the tests themselves."""
import io
import os
import pickle
import tarfile

import numpy as np


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
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)

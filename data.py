"""Everything that turns a dataset into batches: CIFAR-10 and CIFAR-100 through paddle.vision
and image folders, the seeded train/val splits, the transforms, the loaders and each
epoch's batches. ``load(cfg)`` is the one door: the config's ``dataset`` key picks the
loader (LOADERS), which returns a ``Data`` record.

Augmentation is reproducible per sample: before transforming sample ``i`` in epoch
``e`` the dataset seeds Python's ``random`` and numpy's global generator (paddle.vision's
random transforms draw from both) with a hash of (seed, e, i). A run then gives the same images whatever
``num_workers`` is, and a resumed run sees exactly the images the uninterrupted run
would have (Paddle re-seeds each worker from a fresh random number per iterator).
"""
import dataclasses
import hashlib
import math
import multiprocessing
import os
import random
import shutil
import tarfile

import numpy as np
import paddle
import paddle.vision.transforms as T

import files
from errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the 50k CIFAR-10 training images (checked on the real archive).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# CIFAR-100's 50k training images (the values timm and the CIFAR-100 literature use)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class Data:
    """What a run trains and is evaluated on: ``splits`` (train, val, test: SplitDatasets;
    val empty with --val-size 0, test None for an image folder), the class names, and how
    a new image is prepared for the model (``preprocess``: resize the short side,
    center-crop, normalise; saved in every checkpoint for predict.py and export.py)."""
    splits: dict
    classes: list
    preprocess: dict


def load(cfg):
    """The ``Data`` of ``cfg.dataset``."""
    return LOADERS[cfg.dataset](cfg)


class SplitDataset(paddle.io.Dataset):
    """``base[indices[i]]`` with ``transform`` applied, seeded per (seed, epoch, index).

    base[j] must return (image, label). Call ``set_epoch(e)`` before each epoch.
    ``shape``: what ``transform`` returns, [3, H, W]. A sample that fails to load never
    raises inside the DataLoader (Paddle's loader thread would die and the run hang):
    it comes out as zeros with label -(i + 1) and is written into ``failed`` (shared
    memory the DataLoader workers inherit), which ``Checked`` reads on the host before
    the batch is used: nothing waits for the device to find out (GPU audit 2, N3).
    """

    def __init__(self, base, indices, transform=None, seed=None, shape=(3, 32, 32)):
        super().__init__()
        self.base, self.indices, self.transform, self.seed = base, list(indices), transform, seed
        self.shape = tuple(shape)
        self.epoch = 0
        self.failed = multiprocessing.RawValue("q", 0)  # 1 + the first failed sample's index; 0: none

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            return self.sample(i)
        except Exception:
            if not self.failed.value:
                self.failed.value = i + 1  # set before the batch is sent, so seen before it is used
            return np.zeros(self.shape, np.float32), np.asarray(-(i + 1), dtype="int64")

    def failure(self, i):
        """A UserError naming sample ``i`` that failed in the loader, and why (loaded again here)."""
        name = self.base.describe(self.indices[i]) if hasattr(self.base, "describe") else f"sample {self.indices[i]}"
        try:
            self.sample(i)
            why = "it failed in a DataLoader worker and loads now"
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:150] if str(e).strip() else ''}"
        return UserError(f"{name} could not be read ({why}); fix or remove it, then continue with --resume")

    def sample(self, i):
        image, label = self.base[self.indices[i]]
        if self.transform is not None:
            if self.seed is not None:
                key = hashlib.sha256(f"{self.seed}-{self.epoch}-{i}".encode()).digest()
                random.seed(key)
                np.random.seed(int.from_bytes(key[:4], "little"))
            image = self.transform(image)
        return image, np.asarray(label, dtype="int64")


def to_chw_array(image):
    """PIL RGB image -> float32 numpy [3, H, W] in [0, 1], what T.ToTensor gives but as numpy:
    ToTensor makes a Paddle tensor on the default place, which is the GPU in the main
    process (num_workers 0), one tiny host-to-device copy per image (GPU audit #16).
    The DataLoader turns the batch into one tensor."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255


NORMALIZE = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
             "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def statistics(normalize, dataset="cifar10"):
    """(mean, std) of ``normalize``: "dataset" is the training images' own (CIFAR-10's or CIFAR-100's)."""
    return NORMALIZE[dataset if normalize == "dataset" else normalize]


def cifar10_transforms(augment, normalize="cifar10", dataset="cifar10"):
    """(train, eval) transforms on PIL images -> float32 [3, 32, 32], normalised with the
    ``normalize`` statistics (see statistics())."""
    mean, std = statistics(normalize, dataset)
    to_input = [to_chw_array, T.Normalize(mean, std)]
    train = {
        "crop_flip": [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()],  # the paper, section 4.2
        "flip": [T.RandomHorizontalFlip()],
        # the AI Studio notebook the project started from (configs/resnet18_adam.yaml): both flips,
        # then brightness, contrast, saturation and hue jitter one after the other (its
        # Resize([32, 32]) of a 32x32 image changes nothing: left out)
        "flip_color": [T.RandomHorizontalFlip(0.5), T.RandomVerticalFlip(0.5), T.ColorJitter(brightness=0.5),
                       T.ColorJitter(contrast=0.5), T.ColorJitter(saturation=0.5), T.ColorJitter(hue=0.3)],
        "none": [],
        "translate_flip": [],  # made by DeviceCifarLoader (its flips alternate by epoch); TrainBatches refuses others
    }[augment]
    return T.Compose(train + to_input), T.Compose(to_input)


def cifar10_preprocess(normalize="cifar10", dataset="cifar10"):
    """How a checkpoint's model wants a new image (saved in the checkpoint, for predict and export)."""
    mean, std = statistics(normalize, dataset)
    return dict(resize=32, crop=32, mean=list(mean), std=list(std))


def image_size_of(cfg):
    """The side of a training image of a run ``cfg``: a folder's --image-size, a CIFAR's 32."""
    return cfg.image_size if cfg.dataset == "folder" else 32


def preprocess_of(cfg):
    """How the model of a run ``cfg`` wants a new image, from the config alone (no data read)."""
    if cfg.dataset == "folder":
        return imagenet_preprocess(cfg.image_size)
    return cifar10_preprocess(cfg.normalize, cfg.dataset)


# What differs between the two CIFARs: Paddle's class, the archive, the classes
CIFARS = {
    "cifar10": dict(name="CIFAR-10", dataset="Cifar10", archive="cifar-10-python.tar.gz", classes=10,
                    batches=dict(train="data_batch_1..5", test="test_batch")),
    "cifar100": dict(name="CIFAR-100", dataset="Cifar100", archive="cifar-100-python.tar.gz", classes=100,
                     batches=dict(train="train", test="test")),
}


def check_data_file(path, which="cifar10", flag="--data-file"):
    """A clear error for a missing path, a directory (Paddle issue #32901) or a non-archive."""
    archive, name = CIFARS[which]["archive"], CIFARS[which]["name"]
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file; pass the path of {archive}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; pass the archive file itself, "
                        f"e.g. {os.path.join(path, archive)}")
    if not tarfile.is_tarfile(path):
        raise UserError(f"{flag} {path} is not a tar archive; {name} must be the official {archive}")


def load_cifar(data_file, mode, which="cifar10"):
    """paddle.vision's Cifar10 or Cifar100 (``which``) for ``mode`` 'train' or 'test', images
    as PIL, no transform; CIFAR-100 with its 100 fine labels.

    data_file: a local official-layout archive, or "" for Paddle's download (cached).
    """
    from paddle.vision import datasets
    spec = CIFARS[which]
    cifar = getattr(datasets, spec["dataset"])
    if data_file:
        check_data_file(data_file, which)
        try:
            dataset = cifar(data_file=data_file, mode=mode, download=False, backend="pil")
        except Exception as e:  # a tar of the wrong layout fails deep inside Paddle
            raise UserError(f"--data-file {data_file} could not be read as {spec['name']} "
                            f"({type(e).__name__}: {e}); it must be the official {spec['archive']} layout")
    else:
        try:
            # every rank of a launch (or two runs) would download to the same cache file at
            # once, truncating each other's (GPU audit 2, N14): one downloads, the others
            # wait and find the file complete (Paddle checks its md5 before downloading)
            with files.one_at_a_time(os.path.join(paddle.dataset.common.DATA_HOME, "cifar", ".download.lock")):
                dataset = cifar(mode=mode, download=True, backend="pil")
        except Exception as e:
            raise UserError(f"{spec['name']} is not downloaded and could not be downloaded ({type(e).__name__}); "
                            f"pass a local copy with --data-file PATH/{spec['archive']}")
    check_cifar_rows(dataset, mode, data_file or f"the downloaded {spec['name']}", which)
    return dataset


def check_cifar_rows(dataset, mode, source, which="cifar10"):
    """Every row 3,072 bytes (32x32 RGB) and every label a class, checked once before
    training: a bad row would otherwise fail inside the DataLoader, mid-epoch."""
    spec = CIFARS[which]
    if len(dataset.data) == 0:
        raise UserError(f"{source} has no {mode} images (no {spec['batches'][mode]} in it); it must be the official "
                        f"{spec['archive']} layout")
    for i, (row, label) in enumerate(dataset.data):
        if np.size(row) != 3072 or not 0 <= int(label) < spec["classes"]:
            raise UserError(f"{source}: {mode} image {i} has {np.size(row)} values and label {label} "
                            f"(expected 3072 values and a label in 0..{spec['classes'] - 1}); the archive is "
                            "damaged: get a fresh copy")


def cifar100_classes(archive):
    """CIFAR-100's 100 fine class names, from the archive's ``meta``."""
    import pickle
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/meta")), None)
        if member is None:
            raise UserError(f"{archive} has no meta (the class names); it must be the official cifar-100-python.tar.gz")
        meta = pickle.load(tar.extractfile(member), encoding="bytes")
    return [n.decode() for n in meta[b"fine_label_names"]]


def split_indices(n, val_size, seed=0):
    """(train, val) index lists: a seeded permutation, the first ``val_size`` to validation.

    The split seed is fixed (0) by default so that every run and eval.py see the same
    validation images, whatever the training seed.
    """
    if not 0 <= val_size < n:
        raise UserError(f"--val-size {val_size} must be between 0 and {n - 1} (the training set has {n} images)")
    perm = np.random.RandomState(seed).permutation(n)
    return sorted(perm[val_size:].tolist()), sorted(perm[:val_size].tolist())


def cifar_data(cfg):
    """The ``Data`` of CIFAR-10 or CIFAR-100 (cfg.dataset): train and val carved from the
    50k training images (val empty when val_size=0), the 10k test images."""
    train_tf, eval_tf = cifar10_transforms(cfg.augment, cfg.normalize, cfg.dataset)
    train_base = load_cifar(cfg.data_file, "train", cfg.dataset)
    test_base = load_cifar(cfg.data_file, "test", cfg.dataset)
    train_idx, val_idx = split_indices(len(train_base), cfg.val_size)
    if cfg.subset:
        if cfg.subset > len(train_idx):
            raise UserError(f"--subset {cfg.subset} is larger than the {len(train_idx)} training images left after --val-size")
        train_idx = train_idx[:cfg.subset]
    splits = dict(train=SplitDataset(train_base, train_idx, train_tf, seed=cfg.seed),
                  val=SplitDataset(train_base, val_idx, eval_tf),
                  test=SplitDataset(test_base, range(len(test_base)), eval_tf))
    classes = list(CIFAR10_CLASSES) if cfg.dataset == "cifar10" else cifar100_classes(train_base.data_file)
    return Data(splits, classes, preprocess_of(cfg))


# -------------------------------------------------------------------------- loaders
def shm_too_small(num_workers):
    """Paddle's DataLoader passes batches through /dev/shm; AI Studio gives it 64 MB, and
    the workers then die with a bus error. Below 512 MB the loaders use pipes instead."""
    return (num_workers > 0 and os.path.isdir("/dev/shm")
            and shutil.disk_usage("/dev/shm").total < 512 * 2 ** 20)


def make_loader(dataset, batch_size, num_workers, batches=None):
    """A DataLoader over ``batches`` (lists of indices) or, when None, in order; a sample
    that failed to load is a UserError here (see SplitDataset)."""
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    loader = paddle.io.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                  use_shared_memory=not shm_too_small(num_workers),
                                  worker_init_fn=start_worker if num_workers else None)
    return Checked(loader, dataset)


def start_worker(worker_id):
    """A DataLoader worker's first step (its worker_init_fn)."""
    leave_stop_signals_to_the_main_process()
    end_with_the_main_process()


def leave_stop_signals_to_the_main_process():
    """In a DataLoader worker, SIGTERM ends the worker quietly, as Ctrl-C does. Paddle's
    worker start installs a C++ handler that prints a "FatalError: Termination signal"
    banner and dies of the signal, and the main process then stops with "DataLoader
    process killed by signal" instead of saving. Sent to the whole process group
    (timeout, Slurm, docker stop), SIGTERM reaches the main process too, which saves."""
    import signal
    signal.signal(signal.SIGTERM, quiet_worker_exit)


def end_with_the_main_process(every=1.0):
    """In a DataLoader worker, a thread that ends the worker within ``every`` seconds of
    the main process's end. Paddle's worker loop means to (its ParentWatchDog), but it
    waits for work with ``indices_queue.get(MP_STATUS_CHECK_INTERVAL)``, whose first
    argument is ``block``, not ``timeout``: it blocks for good (Paddle 2.6 and 3.3,
    io/dataloader/worker.py). So after a kill -9 or the kernel's out-of-memory kill of
    the main process, its workers stayed, each holding its memory, until the machine
    restarted. It removes the worker's shared-memory batches from /dev/shm, as the end of
    Paddle's worker loop does, and exits: nothing is left to hand a batch to."""
    import threading
    import time
    main_pid = multiprocessing.parent_process().pid

    def watch():
        while os.getppid() == main_pid:
            time.sleep(every)
        paddle.base.core._cleanup_mmap_fds()
        os._exit(0)
    threading.Thread(target=watch, name="end-with-the-main-process", daemon=True).start()


def quiet_worker_exit(signum, frame):
    """Inside Paddle's worker loop, end it: it ends on KeyboardInterrupt without a word
    (io/dataloader/worker.py). Outside it the worker is already exiting (an epoch's
    workers end with it, joining their queue's thread): nothing to stop, and an exception
    there would print a traceback."""
    while frame is not None:
        if frame.f_code.co_name == "_worker_loop":
            raise KeyboardInterrupt
        frame = frame.f_back


class Checked:
    """Iterate ``loader``, raising the dataset's failure() for a sample marked as failed."""

    def __init__(self, loader, dataset):
        self.loader, self.dataset = loader, dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            failed = self.dataset.failed.value  # host memory: the labels stay on the device
            if failed:
                self.dataset.failed.value = 0
                raise self.dataset.failure(failed - 1)
            yield images, labels


def epoch_batches(dataset, batch_size, seed, epoch, world_size=1, rank=0):
    """This rank's batches for ``epoch``: DistributedBatchSampler's shard, shuffled by (seed, epoch)."""
    sampler = paddle.io.DistributedBatchSampler(dataset, batch_size, num_replicas=world_size,
                                                rank=rank, shuffle=True, drop_last=False)
    sampler.set_epoch((seed * 1_000_003 + epoch) % 2 ** 32)  # it seeds RandomState(epoch)
    return list(sampler)


def eval_loader(dataset, batch_size, num_workers, world_size=1, rank=0):
    """This rank's share of ``dataset`` for evaluation: every world_size-th sample, no
    padding (DistributedBatchSampler pads with repeats, which would count twice)."""
    shard = list(range(rank, len(dataset), world_size))
    return make_loader(dataset, batch_size, num_workers,
                       [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)])


class TrainBatches:
    """The training batches of a run, built once: ``epoch(e, start)`` yields this rank's
    batches of epoch ``e`` (a seeded shuffle, sharded over the ranks) from the DataLoader
    (workers + PIL transforms) or the device loader, skipping the first ``start`` batches
    (the ones an interrupted epoch already did)."""

    def __init__(self, dataset, cfg, world_size=1, rank=0):
        self.dataset, self.cfg, self.world_size, self.rank = dataset, cfg, world_size, rank
        self.per_epoch = math.ceil(len(dataset) / (cfg.batch_size * world_size))
        self.device_loader = None
        if cfg.augment == "translate_flip" and cfg.loader != "device":
            raise UserError("--augment translate_flip is made by the device loader (its flips alternate by epoch): "
                            "add --loader device")
        if cfg.loader == "device":
            if cfg.dataset not in CIFARS:  # it holds the 32x32 uint8 rows of a CIFAR in memory
                raise UserError(f"--loader device is for CIFAR-10 and CIFAR-100, not --dataset {cfg.dataset}; "
                                "use --loader dataloader")
            self.device_loader = DeviceCifarLoader(dataset, cfg.augment, cfg.seed, statistics(cfg.normalize, cfg.dataset))

    def epoch(self, epoch, start=0):
        self.dataset.set_epoch(epoch)
        batches = epoch_batches(self.dataset, self.cfg.batch_size, self.cfg.seed, epoch,
                                self.world_size, self.rank)[start:]
        if self.device_loader is not None:
            return self.device_loader.epoch(epoch, batches)
        return make_loader(self.dataset, self.cfg.batch_size, self.cfg.num_workers, batches)


def first_images(split, n, cfg):
    """The first ``n`` images of ``split`` as evaluation prepares them (no augmentation,
    normalised): float32 numpy [n, 3, H, W]. The fast network whitens their patches."""
    transform = eval_transform(preprocess_of(cfg))
    return np.stack([transform(split.base[i][0]) for i in split.indices[:n]]).astype(np.float32)


# ------------------------------------------------------------------- image folders
def imagenet_preprocess(size):
    """Evaluation preprocessing at ``size``: resize to size*256/224, center-crop (ImageNet's 256/224)."""
    return dict(resize=int(round(size * 256 / 224)), crop=size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def eval_transform(preprocess):
    """PIL image -> float32 [3, crop, crop] for a checkpoint's ``preprocess`` dict."""
    return T.Compose([T.Resize(preprocess["resize"]), T.CenterCrop(preprocess["crop"]), to_chw_array,
                      T.Normalize(preprocess["mean"], preprocess["std"])])


def imagenet_train_transform(size):
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), to_chw_array,
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageTooLarge(ValueError):
    """PIL's DecompressionBombError (an image over Image.MAX_IMAGE_PIXELS x 2), which is
    neither an OSError nor a ValueError, as the ValueError every reader of images catches."""


def load_image(path):
    """An 8-bit RGB PIL image from any file PIL reads: grayscale, palette, RGBA and CMYK
    are converted, 16-bit grayscale is scaled (PIL's own convert would clip it to white).
    Raises OSError/ValueError (PIL's errors) for a file that does not decode, ImageTooLarge
    (a ValueError) for one over PIL's size limit."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)  # a phone photo as it is shown, not as its pixels are stored
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((pixels / (257 if pixels.max() > 255 else 1)).clip(0, 255).astype(np.uint8))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL's advice for palette images with transparency
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None


def is_hidden(name):
    return name.startswith(".")  # .ipynb_checkpoints, macOS ._name.jpg, .DS_Store


def list_images(folder):
    """Image files under ``folder`` (recursively, hidden files and folders skipped), sorted.
    A linked folder is followed when it stays inside ``folder`` and was not walked yet: a
    link to a parent or to another class's folder would count images twice, forever or
    under the wrong class."""
    top = os.path.realpath(folder)
    found, walked = [], {top}
    for root, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not is_hidden(d)):
            real = os.path.realpath(os.path.join(root, d))
            if real.startswith(top + os.sep) and real not in walked:
                walked.add(real)
                keep.append(d)
        dirs[:] = keep
        found += [os.path.join(root, f) for f in sorted(names)
                  if not is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


class ImageFolder(paddle.io.Dataset):
    """A folder with one sub-folder of images per class -> (RGB PIL image, class index).

    Checked when made, so training never meets a bad file mid-epoch: every image must
    open and decode, every class folder must hold images; hidden folders and files
    (.ipynb_checkpoints, macOS ._ files) are not classes or images.
    """

    def __init__(self, root):
        super().__init__()
        self.root = root
        folders = sorted(d.name for d in os.scandir(root) if d.is_dir() and not is_hidden(d.name))
        self.samples = [(path, c) for c, name in enumerate(folders) for path in list_images(os.path.join(root, name))]
        empty = [name for c, name in enumerate(folders) if not any(t == c for _, t in self.samples)]
        if empty:
            raise UserError(f"--data-dir {root}: class folder(s) {', '.join(empty[:5])} hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
        if len(folders) < 2:
            raise UserError(f"--data-dir {root} has {len(folders)} class folder(s) with images; it needs at least 2")
        self.classes = folders
        bad = []
        for path, _ in self.samples:
            try:
                load_image(path)
            except Exception as e:  # OSError, ValueError, DecompressionBombError, ...
                bad.append(f"{os.path.relpath(path, root)} ({type(e).__name__})")
        if bad:
            raise UserError(f"--data-dir {root}: {len(bad)} file(s) cannot be read as images: {', '.join(bad[:3])}"
                            + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") + "; remove or replace them")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return load_image(path), target

    def describe(self, i):
        return f"image {self.samples[i][0]}"


def folder_data(cfg):
    """The ``Data`` of the image folder ``cfg.data_dir`` (one sub-folder per class): train
    and val, no test split.

    The split is per class and seeded (seed 0, whatever the training seed): the
    first round(val_fraction * n) of each class's shuffled images go to validation;
    every class keeps at least one training image.
    """
    root = cfg.data_dir
    if not root:
        raise UserError("--data-dir is required: a folder with one sub-folder of images per class")
    if not os.path.isdir(root):
        raise UserError(f"--data-dir {root}: no such directory; it must hold one sub-folder of images per class")
    out, top = os.path.realpath(cfg.output_dir), os.path.realpath(root)
    if out == top or out.startswith(top + os.sep):
        raise UserError(f"--output-dir {cfg.output_dir} is inside --data-dir {root}: the run's own files (its PNGs) "
                        "would become a class; pick an --output-dir outside the image folder")
    base = ImageFolder(root)
    labels = np.array([target for _, target in base.samples])
    rng = np.random.RandomState(0)
    train_idx, val_idx = [], []
    for c, name in enumerate(base.classes):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        k = int(round(cfg.val_fraction * len(idx)))
        if k >= len(idx):
            raise UserError(f"--val-fraction {cfg.val_fraction} leaves class {name} ({len(idx)} images) no training "
                            "image; use a smaller --val-fraction")
        val_idx += idx[:k]
        train_idx += idx[k:]
    preprocess = imagenet_preprocess(cfg.image_size)
    shape = (3, cfg.image_size, cfg.image_size)
    splits = dict(train=SplitDataset(base, sorted(train_idx), imagenet_train_transform(cfg.image_size), seed=cfg.seed,
                                     shape=shape),
                  val=SplitDataset(base, sorted(val_idx), eval_transform(preprocess), shape=shape), test=None)
    return Data(splits, list(base.classes), preprocess)


LOADERS = dict(cifar10=cifar_data, cifar100=cifar_data, folder=folder_data)  # a new dataset: a function and a line


# ------------------------------------------------------- device-resident CIFAR loader
class DeviceCifarLoader:
    """The training split as one uint8 tensor on the device; each batch is gathered,
    padded, randomly cropped and flipped with batched tensor ops: no workers, no PIL,
    no host-to-device copy per step (in the spirit of airbench's CIFAR-10 loader).

    The crop offsets and flips are drawn per (seed, epoch, image) like the PIL pipeline's,
    so runs are reproducible and resume exactly. Same augmentations as ``crop_flip``
    (zero padding of 4, random 32x32 crop, horizontal flip), ``flip`` or ``none``; and
    ``translate_flip``, airbench94's: reflected padding of 2, a random 32x32 crop, and
    flips drawn once per image and turned over every other epoch (each image is seen
    mirrored in every other epoch, instead of at random: arXiv:2404.00498).
    """
    PAD = dict(crop_flip=4, translate_flip=2)

    def __init__(self, split, augment, seed, mean_std=(CIFAR10_MEAN, CIFAR10_STD), on_host=None):
        if augment not in ("crop_flip", "flip", "none", "translate_flip"):
            raise UserError(f"--loader device does augment crop_flip, flip, translate_flip or none, not {augment}; "
                            "use --loader dataloader")
        images, labels = [], []
        for i in split.indices:
            image, label = split.base[i]
            images.append(np.asarray(image, dtype=np.uint8))
            labels.append(int(label))
        images, labels = np.stack(images).transpose(0, 3, 1, 2), np.asarray(labels, dtype=np.int64)
        mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) * 255 for v in mean_std)
        self.augment, self.seed, self.pad = augment, seed, self.PAD.get(augment, 0)
        # crop_flip: zeros, as RandomCrop(padding=4); translate_flip: reflected, as airbench
        self.pad_mode = "reflect" if augment == "translate_flip" else "constant"
        # on the CPU the batches are made in NumPy (host_batch): Paddle's CPU kernels for
        # these small ops took 167 ms a batch of 1024, NumPy 12 ms (AMD EPYC, 2 cores)
        self.on_host = paddle.get_device() == "cpu" if on_host is None else on_host
        if self.on_host:  # [N, 3, 32 + 2 pad, 32 + 2 pad] uint8, padded once here
            self.images = np.pad(images, ((0, 0), (0, 0), (self.pad,) * 2, (self.pad,) * 2), mode=self.pad_mode)
            self.labels, self.mean, self.std = labels, mean, std
        else:  # [N, 3, 32, 32] uint8 on the device: 150 MB for the 50k training images
            self.images, self.labels = paddle.to_tensor(images), paddle.to_tensor(labels)
            self.mean, self.std = paddle.to_tensor(mean), paddle.to_tensor(std)

    def draws(self, epoch):
        """(dy, dx, flip) for every image of ``epoch``, indexed by position in the split."""
        n = self.labels.shape[0]
        rs = np.random.RandomState([self.seed, epoch, 7])
        dy = rs.randint(0, 2 * self.pad + 1, n)
        dx = rs.randint(0, 2 * self.pad + 1, n)
        if self.augment == "translate_flip":  # drawn once, turned over every other epoch
            flip = (np.random.RandomState([self.seed, 8]).rand(n) < 0.5) ^ bool(epoch % 2)
        else:
            flip = rs.rand(n) < 0.5 if self.augment in ("crop_flip", "flip") else np.zeros(n, bool)
        return dy, dx, flip

    def batch(self, idx, dy, dx, flip):
        """float32 [B, 3, 32, 32] normalised images and int64 [B] labels for the positions
        ``idx``; every argument is a device tensor (see ``epoch``), so nothing is copied
        from the host here. On the CPU, ``host_batch``."""
        if self.on_host:
            return self.host_batch(idx, dy, dx, flip)
        x = paddle.gather(self.images, idx).astype("float32")
        if self.pad:
            x = paddle.nn.functional.pad(x, [self.pad] * 4, mode=self.pad_mode)
            size = x.shape[-1] - 2 * self.pad
            ar = paddle.arange(size, dtype="int64")
            rows = paddle.gather(dy, idx).unsqueeze(1) + ar  # [B, 32]
            cols = paddle.gather(dx, idx).unsqueeze(1) + ar
            b, c = x.shape[0], x.shape[1]
            x = paddle.take_along_axis(x, rows.reshape([b, 1, size, 1]).expand([b, c, size, x.shape[-1]]), axis=2)
            x = paddle.take_along_axis(x, cols.reshape([b, 1, 1, size]).expand([b, c, size, size]), axis=3)
        f = paddle.gather(flip, idx).astype("bool").reshape([-1, 1, 1, 1])
        x = paddle.where(f, x.flip([3]), x)
        return (x - self.mean) / self.std, paddle.gather(self.labels, idx)

    def host_batch(self, idx, dy, dx, flip):
        """``batch`` made in NumPy from the images padded at start; the same numbers
        (tested). Every argument is a NumPy array."""
        x = self.images[idx]
        if self.pad:  # each image's window at (dy, dx): [B, 3, 2 pad + 1, 2 pad + 1, 32, 32] views, one picked
            size = x.shape[-1] - 2 * self.pad
            windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(2, 3))
            x = windows[np.arange(len(idx)), :, dy[idx], dx[idx]]
        x = np.where(flip[idx].astype(bool).reshape(-1, 1, 1, 1), x[:, :, :, ::-1], x)
        return paddle.to_tensor((x.astype(np.float32) - self.mean) / self.std), paddle.to_tensor(self.labels[idx])

    def epoch(self, epoch, batches):
        """An iterable over ``batches`` (lists of positions) for ``epoch``, with len(). The
        epoch's positions and draws go to the device once, here: a copy from the host per
        step would wait for the queued GPU work (a blocking cudaMemcpy; GPU audit #9)."""
        dy, dx, flip = self.draws(epoch)
        order = np.asarray([i for idx in batches for i in idx], dtype=np.int64)
        if not self.on_host:  # uint8 flips: Paddle 2.6 has no gather kernel for bool
            dy, dx, flip, order = (paddle.to_tensor(v.astype(t)) for v, t in
                                   ((dy, np.int64), (dx, np.int64), (flip, np.uint8), (order, np.int64)))
        ends = np.cumsum([0] + [len(idx) for idx in batches]).tolist()
        loader = self

        class Epoch:
            def __len__(self):
                return len(batches)

            def __iter__(self):
                for start, end in zip(ends[:-1], ends[1:]):
                    yield loader.batch(order[start:end], dy, dx, flip)
        return Epoch()

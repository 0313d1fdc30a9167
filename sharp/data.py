"""Datasets as uint8 tensors, and the device-resident loader that feeds training.

Every dataset becomes `(N, C, H, W)` uint8 images plus int64 labels, held whole on the
training device; batches are gathered, augmented and normalized there (no DataLoader
workers). Each epoch has one seeded permutation that does not depend on the batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sharp.config import INPUT_SCALINGS, check_choice
from sharp.errors import SharpError
from sharp.locks import ExclusiveLock, LocksUnsupported
from sharp.progress import progress_bar

SYNTHETIC_DEFAULT_SIZE = 2048
CROP_PADDING = 4
# The class names of torchvision's CIFAR readers (the datasets' own meta files), in label order:
# a `folder:` dataset with these classes, 32x32 RGB images and the 50,000 / 10,000 split is CIFAR.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
CIFAR_SHAPE, CIFAR_SPLIT = (3, 32, 32), (50_000, 10_000)


@dataclass
class Dataset:
    """A labelled image dataset split into train and test, as uint8 tensors."""

    name: str
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per channel, of train_images / 255
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])


def dataset_label(data: Dataset) -> str:
    """The dataset as a reader knows it, for titles and captions (never a local path): CIFAR-10 or
    CIFAR-100 (torchvision's, or a `folder:` copy recognised by its class names, 32x32 RGB images
    and 50,000 / 10,000 split), "digits (scikit-learn, 8x8)", "synthetic", else the folder's name."""
    kind, _, arg = data.name.partition(":")
    if kind == "cifar10":
        return "CIFAR-10"
    if kind == "cifar100":
        return "CIFAR-100"
    if kind == "digits":
        return "digits (scikit-learn, 8x8)"
    if kind != "folder":
        return data.name
    shape = tuple(data.train_images.shape[1:])
    split = (len(data.train_labels), len(data.test_labels))
    if shape == CIFAR_SHAPE and split == CIFAR_SPLIT:
        for label, classes in (("CIFAR-10", CIFAR10_CLASSES), ("CIFAR-100", CIFAR100_CLASSES)):
            if sorted(data.classes) == sorted(classes):
                return label
    return Path(arg.rstrip("/\\")).name or arg


def input_normalization(data: Dataset, scaling: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std), in units of pixels / 255, that every loader of a run subtracts
    and divides by: the training split's own ("standardize"), or 0 and 1 ("unit": pixels / 255
    alone, as Keskar et al.'s Keras code feeds its nets). Training and probes both take it from here."""
    check_choice(scaling, "--input-scaling", INPUT_SCALINGS)
    if scaling == "standardize":
        return data.mean, data.std
    return (0.0,) * data.in_channels, (1.0,) * data.in_channels


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1]."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _make_dataset(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
) -> Dataset:
    train_images = torch.from_numpy(np.ascontiguousarray(train[0]))
    mean, std = channel_stats(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=torch.as_tensor(np.asarray(train[1]), dtype=torch.int64),
        test_images=torch.from_numpy(np.ascontiguousarray(test[0])),
        test_labels=torch.as_tensor(np.asarray(test[1]), dtype=torch.int64),
        classes=list(classes),
        mean=mean,
        std=std,
    )


def load_cifar(name: str, root: str | Path, download: bool = False) -> Dataset:
    """CIFAR-10 or CIFAR-100 through torchvision's own reader (python pickle format)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        with _download_lock(Path(root)) if download else contextlib.nullcontext():
            train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise SharpError(
            f"{name} was not found (or is corrupt) under --data-root {root}: "
            "pass --download, or point --data-root at the folder holding it"
        ) from exc
    except OSError as exc:
        raise SharpError(f"{name} could not be downloaded to {root}: {exc}") from None
    return _make_dataset(
        name,
        (train.data.transpose(0, 3, 1, 2), train.targets),
        (test.data.transpose(0, 3, 1, 2), test.targets),
        train.classes,
    )


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """One download at a time into `root`: under torchrun every rank asks for the data at once;
    the first takes the lock and downloads, the others wait for it and then find the files.
    A read-only root needs no lock (nothing can be written there), and a filesystem without
    locks gets none (one process downloads safely; several may download twice)."""
    lock = ExclusiveLock(root / ".sharp-download.lock")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire(wait=True)
    except (PermissionError, LocksUnsupported):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 1,437 / 360, stratified, seed 0."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=360, stratify=bunch.target, random_state=0
    )
    return _make_dataset("digits", (x_train, y_train), (x_test, y_test), [str(d) for d in range(10)])


def load_synthetic(n_train: int = SYNTHETIC_DEFAULT_SIZE, num_classes: int = 10) -> Dataset:
    """Seeded CIFAR-shaped data (3x32x32): each class is a smooth random pattern plus noise.

    The patterns are low-frequency, so a conv net learns them in a few epochs, and the noise
    keeps them from being trivially separable.
    """
    gen = torch.Generator().manual_seed(20170101)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    n_test = max(num_classes, n_train // 4)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, 3, 32, 32, generator=gen)
        pixels = 0.5 + 0.18 * prototypes[labels] + 0.22 * noise
        images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        return images.numpy(), labels.numpy()

    return _make_dataset("synthetic", draw(n_train), draw(n_test), [f"class{c}" for c in range(num_classes)])


# --- image folders ---------------------------------------------------------------------


def _image_files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if (
                entry.is_file()
                and not entry.name.startswith(".")
                and (os.path.splitext(entry.name)[1].lower() in extensions)
            ):
                files.append((Path(entry.path), label))
    return files


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("L", "1", "I;16", "I", "F"):
                return np.asarray(image.convert("L"))[None]
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    except OSError as exc:
        raise SharpError(f"cannot read image {path}: {exc}; remove it or replace it") from None


def _stack(arrays: list[np.ndarray], files: list[tuple[Path, int]]) -> np.ndarray:
    first_size = arrays[0].shape[1:]
    for array, (path, _) in zip(arrays, files, strict=True):
        if array.shape[1:] != first_size:
            raise SharpError(
                f"images of mixed sizes: {files[0][0]} is {first_size[1]}x{first_size[0]} but {path} is "
                f"{array.shape[2]}x{array.shape[1]}; resize the folder's images to one size"
            )
    return np.stack(arrays)


def _cache_dir(root: Path) -> Path:
    own = root / ".sharp-cache"
    try:
        own.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=own):
            return own
    except OSError:
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharp" / digest
        home.mkdir(parents=True, exist_ok=True)
        return home


def _cache_key(files: list[tuple[Path, int]], root: Path) -> str:
    digest = hashlib.sha256()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_folder(root: str | Path) -> Dataset:
    """A folder `train/<class>/*` and `test/<class>/*` of images of one size.

    Decoded once with Pillow, then cached as uint8 `.npy` arrays in `ROOT/.sharp-cache/`
    (or `~/.cache/sharp/` when ROOT is read-only) under a key of the files' names, sizes
    and modification times, so a changed folder is decoded again.
    """
    root = Path(root)
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise SharpError(f"--dataset folder:{root} needs train/<class>/ and test/<class>/ subfolders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = sorted(
        p.name
        for p in test_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if extra:
        raise SharpError(f"folder:{root}: test class {extra[0]!r} has no train/ folder; add it or remove it")
    if len(classes) < 2:
        raise SharpError(f"folder:{root}: found {len(classes)} class folder(s) in train/; need at least 2")
    splits = {"train": _image_files(train_dir, classes), "test": _image_files(test_dir, classes)}
    for split, files in splits.items():
        if not files:
            raise SharpError(f"folder:{root}: no images in {split}/<class>/; add images Pillow can read")
    key = _cache_key(splits["train"] + splits["test"], root)
    cache = _cache_dir(root) / key
    if not (cache / "meta.json").exists():
        _build_folder_cache(splits, classes, cache)
    arrays = {
        name: np.load(cache / f"{name}.npy", allow_pickle=False)
        for name in ("train_images", "train_labels", "test_images", "test_labels")
    }
    meta = json.loads((cache / "meta.json").read_text())
    return Dataset(
        name=f"folder:{root}",
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        classes=meta["classes"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
    )


def _build_folder_cache(splits: dict[str, list[tuple[Path, int]]], classes: list[str], cache: Path) -> None:
    total = sum(len(f) for f in splits.values())
    decoded = {}
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
        progress_bar(total=total, desc="decoding images", unit="img", leave=False) as bar,
    ):
        for split, files in splits.items():
            arrays = []
            for array in pool.map(_decode, (p for p, _ in files)):
                arrays.append(array)
                bar.update()
            decoded[split] = arrays
    channels = max(a.shape[0] for arrays in decoded.values() for a in arrays)
    for split in decoded:  # one channel count for both splits
        decoded[split] = [
            np.repeat(a, channels, axis=0) if a.shape[0] < channels else a for a in decoded[split]
        ]
    all_files = splits["train"] + splits["test"]
    stacked = _stack(decoded["train"] + decoded["test"], all_files)
    n_train = len(splits["train"])
    train_images = stacked[:n_train]
    mean, std = channel_stats(torch.from_numpy(train_images))
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".building-"))
    try:
        np.save(tmp / "train_images.npy", train_images)
        np.save(tmp / "test_images.npy", stacked[n_train:])
        np.save(tmp / "train_labels.npy", np.array([y for _, y in splits["train"]], dtype=np.int64))
        np.save(tmp / "test_labels.npy", np.array([y for _, y in splits["test"]], dtype=np.int64))
        (tmp / "meta.json").write_text(json.dumps({"classes": classes, "mean": mean, "std": std}))
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "meta.json").exists():  # another process may have won the race
            raise


def load_dataset(spec: str, data_root: str | Path = "data", download: bool = False) -> Dataset:
    """`cifar10`, `cifar100`, `digits`, `synthetic[:N]` or `folder:PATH`."""
    name, _, arg = spec.partition(":")
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_root, download)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic(int(arg) if arg else SYNTHETIC_DEFAULT_SIZE)
    if name == "folder":
        return load_folder(arg)
    raise SharpError(
        f"--dataset {spec!r} is unknown: choose cifar10, cifar100, digits, synthetic or folder:PATH"
    )


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset of `n` examples, in ascending order.

    Classes are visited round-robin (each class's examples in a seeded random order), so
    every class gets n / classes examples, or all it has if it has fewer.
    """
    total = len(labels)
    if n >= total:
        return torch.arange(total)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=gen)
    shuffled = labels[order]
    classes = torch.unique(labels)
    rank = torch.empty(total, dtype=torch.int64)
    for c in classes:
        members = (shuffled == c).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    class_position = torch.randperm(len(classes), generator=gen)[torch.searchsorted(classes, shuffled)]
    key = rank * len(classes) + class_position
    chosen = order[torch.argsort(key)[:n]]
    return torch.sort(chosen).values


EVALUATION_ORDER_STREAM = 7  # epoch_seed stream of the evaluation order (the epoch loader uses others)


def evaluation_subset(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """`balanced_subset(labels, n, seed)` (every example when `n` is None or covers them) in a
    seeded random order, for every set that is read in batches to evaluate or probe a model.

    Where BN normalizes with batch statistics (Keskar et al.'s nets, `--bn-mode batch`,
    train-mode tracking) a batch's result depends on which examples share it, and a `folder:`
    dataset stores its images class by class: read in index order, a batch of 500 CIFAR-10
    test images holds two or three classes. A random order mixes the classes in every batch,
    as the binary CIFAR files do. Running-statistics BN and norm-free nets are per example,
    so the order moves their results only by the rounding of the sums.
    """
    index = torch.arange(len(labels)) if n is None else balanced_subset(labels, n, seed)
    generator = torch.Generator().manual_seed(epoch_seed(seed, 0, EVALUATION_ORDER_STREAM))
    return index[torch.randperm(len(index), generator=generator)]


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """An independent 63-bit seed per (run seed, epoch, purpose)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]) >> 1


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@dataclass
class Window:
    """The examples of one optimizer step, handed out as micro-batches."""

    loader: DeviceLoader
    positions: torch.Tensor  # positions in the epoch's permutation
    micro_batch: int
    end: int  # epoch position after this window
    last: bool = False  # the epoch's last window

    @property
    def count(self) -> int:
        return len(self.positions)

    def micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches: its contiguous share of the window, cut into micro-batches;
        or, when the loader shares every micro-batch (--sync-bn), its share of each global
        micro-batch of world_size x micro_batch examples, so that every rank runs the same
        number of forward passes over the same global micro-batches (a share may be empty)."""
        loader = self.loader
        if loader.share_micro_batches:
            for chunk in self.positions.split(self.micro_batch * loader.world_size):
                yield loader.gather(chunk.tensor_split(loader.world_size)[loader.rank])
            return
        share = self.positions.tensor_split(loader.world_size)[loader.rank]
        for chunk in share.split(self.micro_batch):
            yield loader.gather(chunk)


class DeviceLoader:
    """Training batches gathered, augmented and normalized on the device.

    The epoch's order is `torch.randperm(N)` seeded by (seed, epoch); crop offsets and flips
    are drawn per example for the whole epoch from another seeded stream. Neither depends on
    the batch or micro-batch size, so the same seed gives the same examples, augmented the
    same way, whatever the batching. With several processes, rank r takes the r-th of
    `world_size` contiguous shares of every window.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        augment: bool = False,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        share_micro_batches: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.dtype = dtype
        self.seed = seed
        self.augment = augment
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size  # each window is shared out over the ranks
        self.share_micro_batches = share_micro_batches
        shape = (1, -1, 1, 1)
        self._shift = torch.tensor([255.0 * m for m in mean], device=self.device, dtype=dtype).view(shape)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device, dtype=dtype).view(
            shape
        )
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def start_epoch(self, epoch: int) -> None:
        """Draw the epoch's permutation and (with augmentation) its crops and flips."""
        if self._epoch == epoch:
            return
        n = len(self)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
        self._order = torch.randperm(n, generator=gen).to(self.device)
        if self.augment:
            aug = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 1))
            self._offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=aug).to(self.device)
            self._flips = torch.randint(0, 2, (n,), generator=aug).bool().to(self.device)
        self._epoch = epoch

    def windows(
        self, epoch: int, batch_size: int, micro_batch: int, drop_last: bool = False, start: int = 0
    ) -> Iterator[Window]:
        """The epoch's optimizer steps from position `start`: windows of `batch_size` examples."""
        self.start_epoch(epoch)
        n = len(self)
        positions = torch.arange(n, device=self.device)
        stop = n - n % batch_size if drop_last else n
        for begin in range(start, stop, batch_size):
            end = min(begin + batch_size, n)
            yield Window(self, positions[begin:end], micro_batch, end, last=end >= stop)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All examples in stored order, normalized and never augmented (for evaluation)."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield self.normalize(self.images[start:end]), self.labels[start:end]

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized (and, for training, augmented) inputs and labels at epoch positions."""
        index = self._order[positions]
        images = self.images[index]
        if self.augment:
            images = self._crop_and_flip(images, self._offsets[index], self._flips[index])
        return self.normalize(images), self.labels[index]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = images.to(dtype=self.dtype, memory_format=memory_format)
        return (x - self._shift) * self._scale

    @staticmethod
    def _crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Random crop from a zero-padded image and horizontal flip, as one batched gather."""
        n, _, height, width = images.shape
        padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
        device = images.device
        rows = offsets[:, :1] + torch.arange(height, device=device)
        cols = torch.arange(width, device=device).expand(n, width)
        cols = torch.where(flips[:, None], width - 1 - cols, cols) + offsets[:, 1:]
        batch = torch.arange(n, device=device)[:, None, None]
        crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
        return crops.permute(0, 3, 1, 2)

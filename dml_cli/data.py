"""Datasets held in memory as tensors, and batches built from them on the training device.

Each split is a tensor of shape (N, C, H, W), uint8 where the source is uint8. ``TensorBatches``
copies a split to the device once, then indexes, augments and normalises whole batches there, so
the training loop runs no per-sample Python code.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf
from torch import Tensor

from dml_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "digits", "synthetic")
COMMON_KEYS = ("name", "root", "download", "val_size", "split_seed", "augment")
SYNTHETIC_KEYS = ("num_train", "num_test", "shape", "num_classes", "seed")

TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

# Per-channel mean and std of each official training split in [0, 1] units, the values in common
# use. digits and synthetic have none, so load_dataset computes theirs from the train split.
STANDARD_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

CROP_PADDING = 4
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
# Weight of the class pattern in a synthetic image, whose remaining weight is uniform pixel
# noise. With the default 512/128 images, a nearest-class-mean classifier reached 89-100% test
# accuracy over seeds 0-2 (measured once on CPU), so the classes are learnable but not trivial.
SYNTHETIC_SIGNAL = 0.2

# torchvision 0.29 raises RuntimeError for missing files, RuntimeError, URLError or another
# OSError for a failed download, and AssertionError, TypeError or ValueError for a corrupt file.
_READ_ERRORS = (
    RuntimeError,
    OSError,
    http.client.HTTPException,
    AssertionError,
    TypeError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
)


@dataclass
class DataSplits:
    """Train, val and test splits of one dataset, with what a model and a batcher need."""

    name: str
    train_images: Tensor = field(repr=False)
    train_labels: Tensor = field(repr=False)
    val_images: Tensor = field(repr=False)
    val_labels: Tensor = field(repr=False)
    test_images: Tensor = field(repr=False)
    test_labels: Tensor = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


def check_dataset_config(cfg: Any) -> None:
    """Validate a dataset config node without touching the disk.

    Raises ConfigError naming the first missing, unknown or invalid key under ``dataset.``.
    """
    cfg = _to_dict(cfg)
    name = cfg.get("name")
    if name not in DATASET_NAMES:
        choices = ", ".join(DATASET_NAMES)
        raise ConfigError(f"dataset.name={name!r} is not a known dataset; choose one of {choices}")

    keys = COMMON_KEYS + (SYNTHETIC_KEYS if name == "synthetic" else ())
    for key in keys:
        if key not in cfg:
            raise ConfigError(f"dataset.{key} is missing for dataset {name}; add it to its config")
    for key in cfg:
        if key not in keys:
            known = ", ".join(keys)
            raise ConfigError(f"dataset.{key} is not a known key for dataset {name}; use {known}")

    root = cfg["root"]
    if not isinstance(root, str | os.PathLike) or not str(root):
        raise ConfigError(f"dataset.root={root!r} is invalid: use a folder path")
    _check_bool(cfg, "download")
    _check_bool(cfg, "augment")
    _check_int(cfg, "split_seed")
    _check_val_size(cfg["val_size"])

    if name == "synthetic":
        _check_synthetic(cfg)


def _check_bool(cfg: Mapping, key: str) -> None:
    if not isinstance(cfg[key], bool):
        raise ConfigError(f"dataset.{key}={cfg[key]!r} is invalid: use true or false")


def _check_int(cfg: Mapping, key: str, minimum: int | None = None) -> None:
    value = cfg[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"dataset.{key}={value!r} is invalid: use {bound}")


def _check_val_size(val_size: Any) -> None:
    valid = "use an int count >= 1 or a float fraction in (0, 1)"
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ConfigError(f"dataset.val_size={val_size!r} is invalid: {valid}")
    if isinstance(val_size, int) and val_size < 1:
        raise ConfigError(f"dataset.val_size={val_size} is invalid: {valid}")
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        raise ConfigError(f"dataset.val_size={val_size} is invalid: {valid}")


def _check_synthetic(cfg: Mapping) -> None:
    _check_int(cfg, "num_train", minimum=2)
    _check_int(cfg, "num_test", minimum=1)
    _check_int(cfg, "num_classes", minimum=2)
    _check_int(cfg, "seed")

    shape = cfg["shape"]
    is_shape = (
        isinstance(shape, Sequence)
        and not isinstance(shape, str)
        and len(shape) == 3
        and all(isinstance(size, int) and not isinstance(size, bool) for size in shape)
        and all(size >= 1 for size in shape)
    )
    if not is_shape or shape[1] != shape[2]:
        raise ConfigError(
            f"dataset.shape={shape!r} is invalid: use [channels, height, width] of positive "
            "integers with height == width"
        )
    _val_count(cfg["val_size"], cfg["num_train"], "synthetic")


def load_dataset(cfg: Any) -> DataSplits:
    """Load a dataset into memory and carve the val split from its train split.

    ``cfg`` is the ``dataset`` config node (a DictConfig or a mapping). Raises ConfigError for an
    invalid config and DataError when the files are missing, cannot be downloaded or are corrupt.
    """
    cfg = _to_dict(cfg)
    check_dataset_config(cfg)
    name = cfg["name"]

    if name == "digits":
        train, test, num_classes = _load_digits()
    elif name == "synthetic":
        train, test = _make_synthetic(cfg)
        num_classes = cfg["num_classes"]
    else:
        train, test, num_classes = _load_torchvision(name, cfg["root"], cfg["download"])

    train_images, train_labels, val_images, val_labels = _carve_val(
        *train, cfg["val_size"], cfg["split_seed"], name
    )
    if name in STANDARD_STATS:
        mean, std = STANDARD_STATS[name]
    else:
        mean, std = _channel_stats(train_images, name)

    splits = DataSplits(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        test_images=test[0],
        test_labels=test[1],
        num_classes=num_classes,
        in_channels=train_images.shape[1],
        image_size=train_images.shape[2],
        mean=mean,
        std=std,
        augment=cfg["augment"],
    )
    log.info(
        "Dataset %s: train=%d val=%d test=%d images of %s, %d classes",
        name,
        len(train_labels),
        len(val_labels),
        len(splits.test_labels),
        "x".join(str(size) for size in train_images.shape[1:]),
        num_classes,
    )
    return splits


def _to_dict(cfg: Any) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"dataset config must be a mapping of keys, got {type(cfg).__name__}")
    return {
        key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
    }


def _val_count(val_size: int | float, num_train: int, name: str) -> int:
    """Return the number of val images for a train split of ``num_train`` images."""
    if isinstance(val_size, float):
        count = max(1, math.floor(val_size * num_train + 0.5))
    else:
        count = val_size
    if count >= num_train:
        raise ConfigError(
            f"dataset.val_size={val_size} leaves no train images in the {num_train}-image train "
            f"split of {name}; use an int in [1, {num_train - 1}] or a float in (0, 1) below "
            f"{(num_train - 0.5) / num_train:.4g}"
        )
    return count


def _carve_val(
    images: Tensor, labels: Tensor, val_size: int | float, split_seed: int, name: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a random subset of ``val_size`` images off the train split, fixed by split_seed.

    Both parts keep the original order of the images.
    """
    count = _val_count(val_size, len(labels), name)
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(len(labels), generator=generator)
    val_index = order[:count].sort().values
    train_index = order[count:].sort().values
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


def _channel_stats(images: Tensor, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std of uint8 images, in [0, 1] units."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        values = images[:, channel].to(torch.float64) / scale
        means.append(values.mean().item())
        stds.append(values.std(correction=0).item())
    if min(stds) == 0.0:
        raise DataError(
            f"Dataset {name} has a channel with std=0 in its train split, so it cannot be "
            "normalised; change dataset.seed or dataset.shape"
        )
    return tuple(means), tuple(stds)


def _load_digits() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    """Load scikit-learn's 8x8 digits and hold out a stratified fifth, fixed by seed 0, as test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are counts in 0..16, rescaled to the 0..255 range of the other datasets.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))

    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_TEST_SEED,
    )
    train_index = torch.from_numpy(np.sort(train_index))
    test_index = torch.from_numpy(np.sort(test_index))
    train = (images[train_index], labels[train_index])
    test = (images[test_index], labels[test_index])
    return train, test, len(bunch.target_names)


def _make_synthetic(cfg: Mapping) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Draw random uint8 images that carry a class signal a model can learn.

    Each class has a smooth random pattern. An image is that pattern, weighted by
    SYNTHETIC_SIGNAL, plus uniform pixel noise; labels are balanced over the classes.
    """
    channels, height, width = cfg["shape"]
    generator = torch.Generator().manual_seed(cfg["seed"])
    coarse_size = (max(1, height // 4), max(1, width // 4))
    coarse = torch.rand(cfg["num_classes"], channels, *coarse_size, generator=generator)
    patterns = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = (torch.arange(count) % cfg["num_classes"])[
            torch.randperm(count, generator=generator)
        ]
        noise = torch.rand(count, channels, height, width, generator=generator)
        pixels = SYNTHETIC_SIGNAL * patterns[labels] + (1.0 - SYNTHETIC_SIGNAL) * noise
        return (pixels * 255.0).round().to(torch.uint8), labels

    train = draw(cfg["num_train"])
    test = draw(cfg["num_test"])
    return train, test


def _absolute_root(root: str | os.PathLike) -> str:
    # Under Hydra a relative root is taken from the directory the program started in.
    return os.path.normpath(to_absolute_path(os.path.expanduser(os.fspath(root))))


def _torchvision_class(name: str) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, TORCHVISION_CLASSES[name])


def _expected_files(name: str) -> list[str]:
    """Return the files torchvision reads for a dataset, relative to its root."""
    dataset_class = _torchvision_class(name)
    if name in ("mnist", "fashion_mnist"):
        folder = f"{dataset_class.__name__}/raw"
        return [f"{folder}/{os.path.splitext(file)[0]}" for file, _ in dataset_class.resources]
    folder = dataset_class.base_folder
    files = [file for file, _ in dataset_class.train_list + dataset_class.test_list]
    files.append(dataset_class.meta["filename"])
    return [f"{folder}/{file}" for file in files]


def describe_missing(name: str, root: str | os.PathLike) -> str:
    """Return the files that dataset ``name`` needs under ``root``, as one line."""
    if name == "digits":
        return "no files: digits is bundled with scikit-learn"
    if name == "synthetic":
        return "no files: synthetic images are generated in memory"
    if name not in TORCHVISION_CLASSES:
        choices = ", ".join(DATASET_NAMES)
        raise ConfigError(f"dataset.name={name!r} is not a known dataset; choose one of {choices}")
    return f"{', '.join(_expected_files(name))} under {_absolute_root(root)}"


def _load_torchvision(
    name: str, root: str, download: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    train_images, train_labels, num_classes = _read_torchvision(name, root, download, train=True)
    test_images, test_labels, _ = _read_torchvision(name, root, download, train=False)
    return (train_images, train_labels), (test_images, test_labels), num_classes


def _read_torchvision(
    name: str, root: str, download: bool, *, train: bool
) -> tuple[Tensor, Tensor, int]:
    """Read one official split through torchvision as (N, C, H, W) uint8 images and labels.

    Returns the images, the labels and the number of classes.
    """
    root_abs = _absolute_root(root)
    dataset_class = _torchvision_class(name)
    try:
        dataset = dataset_class(root_abs, train=train, download=download)
    except _READ_ERRORS as err:
        raise DataError(_read_error_message(name, root_abs, download, err)) from err

    if isinstance(dataset.data, np.ndarray):
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    else:
        images = dataset.data.unsqueeze(1)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if len(images) != len(labels):
        split = "train" if train else "test"
        raise DataError(
            f"Dataset {name} in {root_abs} is corrupt: its {split} split has {len(images)} "
            f"images but {len(labels)} labels; delete its files and download them again"
        )
    return images, labels, len(dataset.classes)


def _read_error_message(name: str, root_abs: str, download: bool, err: BaseException) -> str:
    missing = [
        file for file in _expected_files(name) if not os.path.isfile(os.path.join(root_abs, file))
    ]
    expected = describe_missing(name, root_abs)
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if detail.endswith(":") and err.__cause__ is not None:
        # torchvision's download error ends in a colon and chains the network error.
        detail = f"{detail} {str(err.__cause__).strip()}".strip()
    cause = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    offline = "or point dataset.root at a folder that has them (dataset=digits needs no files)."

    if not missing:
        return (
            f"Dataset {name} in {root_abs} is unreadable or corrupt ({cause}); expected "
            f"{expected}. Delete those files and set dataset.download=true on a machine with "
            f"network access, {offline}"
        )
    if download:
        return (
            f"Dataset {name} not found in {root_abs} and its download failed ({cause}); expected "
            f"{expected}. Download them on a machine with network access and copy them there, "
            f"{offline}"
        )
    return (
        f"Dataset {name} not found in {root_abs} (dataset.download=false); expected {expected}. "
        f"Set dataset.download=true on a machine with network access, {offline}"
    )


def normalize_batch(images: Tensor, mean: Any, std: Any) -> Tensor:
    """Scale a batch to float32 and normalise each channel as (x - mean) / std, on its device.

    uint8 images are divided by 255 first; float images are taken to be in [0, 1] already.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    if mean.shape[1] != images.shape[1] or std.shape[1] != images.shape[1]:
        raise ValueError(
            f"mean and std need one value per channel: images have {images.shape[1]} channels, "
            f"mean has {mean.shape[1]} and std has {std.shape[1]} values"
        )
    if images.dtype == torch.uint8:
        scaled = images.to(torch.float32).div_(255.0)
    else:
        scaled = images.to(torch.float32)
    return (scaled - mean).div_(std)


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Randomly crop each image after zero padding of CROP_PADDING pixels, then randomly flip it.

    Returns a new tensor with the shape, dtype and device of ``images``. The offsets and flips
    are drawn from ``generator`` on its own device and then moved to the images, so a CPU
    generator gives the same result on any device.
    """
    count, channels, height, width = images.shape
    pad = CROP_PADDING
    padded = F.pad(images, (pad, pad, pad, pad))

    offsets = torch.randint(
        0, 2 * pad + 1, (2, count), generator=generator, device=generator.device
    )
    flips = torch.rand(count, generator=generator, device=generator.device) < 0.5
    rows = offsets[0, :, None] + torch.arange(height, device=generator.device)
    columns = torch.arange(width, device=generator.device).expand(count, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[1, :, None]
    rows = _copy_to_device(rows, images.device)
    columns = _copy_to_device(columns, images.device)

    # Two gathers pick each image's window: first its rows, then its (possibly reversed) columns.
    cropped = padded.gather(
        2, rows[:, None, :, None].expand(count, channels, height, padded.shape[3])
    )
    return cropped.gather(3, columns[:, None, None, :].expand(count, channels, height, width))


def _copy_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    # A copy from pageable host memory to CUDA waits for the GPU to finish its queued work, so
    # the copy goes through pinned memory without blocking: the batch then needs no host sync.
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Return a CPU generator whose state depends only on (seed, epoch)."""
    entropy = [seed % 2**64, epoch % 2**64]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TensorBatches:
    """Iterable over (images, labels) batches on `device`, float32 normalised images.

    The images and labels are copied to ``device`` once, here. Each epoch's order and
    augmentation come from a CPU generator seeded by (seed, epoch) alone, so the order and crops
    are the same on any device and a resumed run gets the batches of an uninterrupted one. Call
    ``set_epoch`` before each epoch; iterating twice without it repeats the same batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Any,
        std: Any,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: use a positive integer")

        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.num_samples = len(images)
        self.epoch = 0

        if drop_last and 0 < self.num_samples < batch_size:
            log.warning(
                "batch_size=%d is larger than the %d samples and drop_last is set, "
                "so each epoch yields no batches",
                batch_size,
                self.num_samples,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = _epoch_generator(self.seed, self.epoch)
        order = None
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).to(self.device)

        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = start + self.batch_size
            if order is None:
                images = self.images[start:stop]
                labels = self.labels[start:stop]
            else:
                index = order[start:stop]
                images = self.images[index]
                labels = self.labels[index]

            if self.augment:
                images = augment_batch(images, generator)
            images = normalize_batch(images, self.mean, self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels

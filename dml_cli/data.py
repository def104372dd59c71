"""Datasets held in memory as tensors, with the val split carved from the train split.

Each split is a tensor of shape (N, C, H, W), uint8 where the source is uint8. dml_cli.batches
turns a split into batches on the training device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cli.dataset_config import _to_dict, _val_count, check_dataset_config
from dml_cli.errors import DataError
from dml_cli.torchvision_datasets import _load_torchvision

log = logging.getLogger(__name__)

# Per-channel mean and std of each official training split in [0, 1] units, the values in common
# use. digits and synthetic have none, so load_dataset computes theirs from the train split.
STANDARD_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
# Weight of the class pattern in a synthetic image, whose remaining weight is uniform pixel
# noise. With the default 512/128 images, a nearest-class-mean classifier reached 89-100% test
# accuracy over seeds 0-2 (measured once on CPU), so the classes are learnable but not trivial.
SYNTHETIC_SIGNAL = 0.2


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

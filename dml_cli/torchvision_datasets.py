"""Reading of mnist, fashion_mnist, cifar10 and cifar100 from their torchvision files.

A file that is missing, fails to download or is corrupt raises DataError naming the files
expected under ``dataset.root`` and how to get them.
"""

from __future__ import annotations

import http.client
import os
import pickle

import numpy as np
import torch
from hydra.utils import to_absolute_path
from torch import Tensor

from dml_cli.dataset_config import DATASET_NAMES
from dml_cli.errors import ConfigError, DataError

TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

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
    if detail.endswith(":"):
        # torchvision's download error ends in a colon, followed by the network error when it
        # chains one.
        reason = err.__cause__ or err.__context__
        detail = f"{detail} {str(reason).strip()}" if reason is not None else detail[:-1]
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

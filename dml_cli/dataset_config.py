"""Validation of the ``dataset`` config node, which reads no dataset files."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from dml_cli.errors import ConfigError

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "digits", "synthetic")
COMMON_KEYS = ("name", "root", "download", "val_size", "split_seed", "augment")
SYNTHETIC_KEYS = ("num_train", "num_test", "shape", "num_classes", "seed")


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

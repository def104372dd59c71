"""Build a run's cohort and optimizers before any data is loaded, to check their arguments.

dml-train calls `check_cohort_build` before Hydra creates the run folder, so an invalid
`arch_args` or optimizer argument stops the program before anything is written. The students
are built on PyTorch's meta device, which records shapes but allocates no memory and runs no
kernels, for the image shape that the dataset config alone determines.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dml_cli.build import StudentSpec, build_optimizers, build_students, student_specs
from dml_cli.errors import ConfigError

log = logging.getLogger(__name__)

HYDRA_KEYS = ("_target_", "_partial_")


class DataShape(NamedTuple):
    """Data shape in the arguments that build_student takes: square images, class count."""

    in_channels: int
    image_size: int
    num_classes: int


# The shapes that load_dataset gives for the bundled datasets of a fixed shape. synthetic takes
# its shape from dataset.shape and dataset.num_classes.
FIXED_SHAPES = {
    "mnist": DataShape(1, 28, 10),
    "fashion_mnist": DataShape(1, 28, 10),
    "cifar10": DataShape(3, 32, 10),
    "cifar100": DataShape(3, 32, 100),
    "digits": DataShape(1, 8, 10),
}


def config_shape(dataset_cfg: DictConfig) -> DataShape | None:
    """Return the shape that load_dataset will give, or None when only the data determines it.

    `dataset_cfg` must have passed check_dataset_config.
    """
    name = dataset_cfg.get("name")
    if name == "synthetic":
        channels, height, _ = dataset_cfg.shape
        return DataShape(channels, height, dataset_cfg.num_classes)
    return FIXED_SHAPES.get(name)


def check_cohort_build(cfg: DictConfig) -> None:
    """Build each student and its optimizer from a validated config, without loading data.

    Raises ConfigError naming the student's arch or arch_args, or the optimizer key, that
    fails to build. A dataset whose shape only its files determine is skipped here, and train
    raises the same errors after loading it. torch's CPU random state is left unchanged.
    """
    shape = config_shape(cfg.dataset)
    if shape is None:
        log.debug("Dataset %s has no shape known before loading it", cfg.dataset.get("name"))
        return
    specs = student_specs(cfg.cohort, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        for spec in specs:
            _build_student(cfg, spec, shape)
    probe = _probe_student()
    for spec in specs:
        _check_optimizer(cfg, spec, probe)


def _build_student(cfg: DictConfig, spec: StudentSpec, shape: DataShape) -> None:
    try:
        with torch.device("meta"):
            build_students([spec], **shape._asdict())
        return
    except ConfigError as err:
        log.debug("Building %s on the meta device failed: %s", spec.name, err)
    except Exception as err:
        # Some torchvision models read tensor values while they are built, which a meta tensor
        # does not have (regnet_* in torchvision 0.29). train builds them after loading the data.
        log.debug(
            "Skipped checking %s, which cannot be built on the meta device: %s", spec.name, err
        )
        return

    # A failed forward pass on the meta device can come from an op without a meta kernel, so
    # the error is only reported when the CPU build raises it too.
    try:
        build_students([spec], **shape._asdict())
    except ConfigError as err:
        raise ConfigError(_student_message(cfg, spec, shape, err)) from err


def _student_message(
    cfg: DictConfig, spec: StudentSpec, shape: DataShape, err: ConfigError
) -> str:
    prefix = "cohort" if cfg.cohort.get("students") is None else f"cohort.students[{spec.index}]"
    if spec.arch_args:
        key, value = f"{prefix}.arch_args", spec.arch_args
    else:
        key, value = f"{prefix}.arch", spec.arch
    size = shape.image_size
    data = f"{shape.in_channels}x{size}x{size} images, {shape.num_classes} classes"
    return f"Invalid {key}={value!r} for {spec.name} on dataset {cfg.dataset.name} ({data}): {err}"


def _probe_student() -> nn.Module:
    # Optimizer constructors check their arguments, not the parameters, so one float32 CPU
    # parameter replaces each student. fused=true needs CPU or CUDA parameters, which torch
    # 2.14 checks only at the first step, but a later version may check it in the constructor.
    probe = nn.Module()
    probe.register_parameter("weight", nn.Parameter(torch.zeros(1)))
    return probe


def _check_optimizer(cfg: DictConfig, spec: StudentSpec, probe: nn.Module) -> None:
    err = _optimizer_error(cfg.optimizer, spec, probe)
    if err is None:
        return
    if isinstance(err, ConfigError) and err.__cause__ is None:
        raise err  # check_targets' message already names the rejected _target_.

    merged = OmegaConf.merge(cfg.optimizer, spec.optimizer)
    reason = str(err.__cause__ or err).strip().splitlines()[0]
    key = _first_rejected_key(merged, spec, probe)
    if key is None:
        raise ConfigError(f"Invalid optimizer settings for {spec.name}: {reason}.") from err

    path = f"optimizer.{key}"
    student = ""
    if key in spec.optimizer:
        path = f"cohort.students[{spec.index}].optimizer.{key}"
        student = f" for {spec.name}"
    value = merged[key]
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    raise ConfigError(
        f"Invalid {path}={value!r}{student}: {merged.get('_target_')} rejected it ({reason}). "
        f"Set a value that it accepts, or remove {path} to use its default."
    ) from err


def _first_rejected_key(merged: DictConfig, spec: StudentSpec, probe: nn.Module) -> str | None:
    """Return the first optimizer key, in config order, whose value the constructor rejects.

    Keys are added one at a time to the `_target_` alone, so the key returned is the one that
    makes the arguments invalid given the keys before it. Returns None when no key does.
    """
    spec = dataclasses.replace(spec, optimizer={})
    subset = OmegaConf.create({key: merged[key] for key in HYDRA_KEYS if key in merged})
    if _optimizer_error(subset, spec, probe) is not None:
        return None
    for key in merged:
        if key in HYDRA_KEYS:
            continue
        subset[key] = merged[key]
        if _optimizer_error(subset, spec, probe) is not None:
            return str(key)
    return None


def _optimizer_error(
    optimizer_cfg: DictConfig, spec: StudentSpec, probe: nn.Module
) -> Exception | None:
    try:
        build_optimizers(optimizer_cfg, [spec], [probe])
    except ConfigError as err:
        return err
    return None

"""Build a run's parts from its config: device, cohort, optimizers and schedulers.

Config files reach code only through this module. Runs travel between people, so a config is
untrusted: only the optimizers and schedulers in `ALLOWED_TARGETS` may be instantiated from it,
and students are built from the project's architecture registry by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from dml_cli.errors import ConfigError
from dml_cli.models import build_student, is_known_arch, known_archs

log = logging.getLogger(__name__)

ALLOWED_TARGETS = frozenset(
    {
        "torch.optim.SGD",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "torch.optim.lr_scheduler.StepLR",
        "torch.optim.lr_scheduler.MultiStepLR",
    }
)
DEVICE_TYPES = ("auto", "cpu", "cuda")
INIT_SEED_STRIDE = 1000


@dataclass
class StudentSpec:
    """One student of the cohort config, with its initial-weight seed."""

    name: str
    arch: str
    arch_args: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    index: int = 0
    init_seed: int = 0


def student_specs(cohort_cfg: DictConfig, seed: int) -> list[StudentSpec]:
    """List the cohort's students, expanding a generated cohort (`arch` and `size`)."""
    students = cohort_cfg.get("students")
    generated = students is None and cohort_cfg.get("size") is not None
    if generated:
        size = cohort_cfg.size
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"Invalid cohort.size={size}: it must be an integer >= 1.")
        arch_args = cohort_cfg.get("arch_args") or {}
        students = [
            {"name": f"student_{i}", "arch": cohort_cfg.arch, "arch_args": arch_args}
            for i in range(size)
        ]
    if not students:
        raise ConfigError(
            "Invalid cohort.students: the cohort is empty. List at least one student with a "
            "name and an arch, for example cohort=three_lenets."
        )

    specs = []
    for index, student in enumerate(students):
        student = _plain(student)
        if not isinstance(student, Mapping) or "arch" not in student:
            raise ConfigError(
                f"Invalid cohort.students[{index}]={student!r}: each student needs an arch, "
                "for example {name: student_0, arch: lenet5}."
            )
        name = str(student.get("name") or f"student_{index}")
        arch = str(student["arch"])
        if not is_known_arch(arch):
            key = "cohort.arch" if generated else f"cohort.students[{index}].arch"
            raise ConfigError(
                f"Unknown arch {arch!r} for {name} ({key}): use one of {', '.join(known_archs())}."
            )
        specs.append(
            StudentSpec(
                name=name,
                arch=arch,
                arch_args=dict(student.get("arch_args") or {}),
                optimizer=dict(student.get("optimizer") or {}),
                index=index,
                init_seed=seed * INIT_SEED_STRIDE + index,
            )
        )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"Invalid cohort.students: student names must be unique, got {names}.")
    return specs


def resolve_device(device_type: str) -> torch.device:
    """Map `device.type` to a torch device; `cuda` without CUDA is an error, not a fallback."""
    if device_type not in DEVICE_TYPES:
        raise ConfigError(
            f"Invalid device={device_type!r}: choose one of {', '.join(DEVICE_TYPES)}."
        )
    cuda = torch.cuda.is_available()
    if device_type == "cuda" and not cuda:
        raise ConfigError(
            "device=cuda was requested but CUDA is not available on this machine: "
            "use device=cpu or device=auto."
        )
    if device_type == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(device_type)


def build_students(
    specs: list[StudentSpec], *, in_channels: int, image_size: int, num_classes: int
) -> list[nn.Module]:
    """Build each student from its own seed, so students start from different weights."""
    students = []
    for spec in specs:
        torch.manual_seed(spec.init_seed)
        students.append(
            build_student(
                spec.arch,
                in_channels=in_channels,
                image_size=image_size,
                num_classes=num_classes,
                **spec.arch_args,
            )
        )
    return students


def build_optimizers(
    optimizer_cfg: DictConfig, specs: list[StudentSpec], students: list[nn.Module]
) -> list[torch.optim.Optimizer]:
    """Build one optimizer per student, applying the student's own overrides on top."""
    optimizers = []
    for spec, student in zip(specs, students, strict=True):
        merged = OmegaConf.merge(optimizer_cfg, spec.optimizer)
        factory = instantiate_allowed(merged, "optimizer")
        try:
            optimizers.append(factory(student.parameters()))
        except (TypeError, ValueError, RuntimeError) as err:
            # torch.optim constructors raise RuntimeError for options that exclude each other,
            # such as fused=true with foreach=true (torch 2.14).
            raise ConfigError(f"Invalid optimizer settings for {spec.name}: {err}.") from err
    return optimizers


def build_schedulers(scheduler_cfg: DictConfig | None, optimizers: list) -> list:
    """Build one scheduler per optimizer, or None for each when `scheduler=none`."""
    if scheduler_cfg is None or scheduler_cfg.get("_target_") is None:
        return [None] * len(optimizers)
    factory = instantiate_allowed(scheduler_cfg, "scheduler")
    try:
        return [factory(optimizer) for optimizer in optimizers]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid scheduler settings: {err}.") from err


def instantiate_allowed(node: DictConfig, key: str):
    """Instantiate `node` with Hydra after checking its `_target_` against the allow-list."""
    check_targets(node, key)
    try:
        return hydra.utils.instantiate(node)
    except Exception as err:  # Hydra wraps every constructor error in its own exception types.
        raise ConfigError(f"Invalid {key} config: {str(err).splitlines()[0]}") from err


def check_targets(node: object, key: str = "") -> None:
    """Raise ConfigError if any `_target_` in `node` is outside `ALLOWED_TARGETS`."""
    if isinstance(node, DictConfig | Mapping):
        for child_key, child in node.items():
            path = f"{key}.{child_key}" if key else str(child_key)
            if child_key == "_target_":
                if child is not None and child not in ALLOWED_TARGETS:
                    raise ConfigError(
                        f"Rejected {path}={child!r}: a config may only build "
                        f"{', '.join(sorted(ALLOWED_TARGETS))}."
                    )
            else:
                check_targets(child, path)
    elif isinstance(node, ListConfig | list | tuple):
        for index, child in enumerate(node):
            check_targets(child, f"{key}[{index}]")


def _plain(node: object) -> object:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node

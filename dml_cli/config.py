"""Config folder, the resolvers the configs use, and validation before anything runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dml_cli.build import DEVICE_TYPES, check_targets, student_specs
from dml_cli.dataset_config import _val_count, check_dataset_config
from dml_cli.engine import PRECISIONS, check_loss_arguments
from dml_cli.errors import ConfigError

HYDRA_OUTPUT_SUBDIR = ".hydra"

# Train split sizes before the val split is carved off, for the datasets whose size is fixed:
# the official torchvision train splits, and the 1,437 digits left after the stratified test
# fifth (360 of 1,797 images) is held out. synthetic's size is its dataset.num_train.
TRAIN_SPLIT_SIZES = {
    "mnist": 60_000,
    "fashion_mnist": 60_000,
    "cifar10": 50_000,
    "cifar100": 50_000,
    "digits": 1_437,
}


def config_dir() -> str:
    """Return the absolute path of the config folder.

    An installed wheel carries the configs as `dml_cli/conf`; a source checkout (and an editable
    install) keeps them in `conf/` at the top of the repository.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


# Folders named by resume= that did not exist when Hydra resolved its run dir, so that a
# mistyped path can be removed again after Hydra created it for the job log.
NEW_RESUME_DIRS: set[str] = set()


def resume_run_dir(resume: object, default: object) -> object:
    """Return the absolute folder of `resume`, or `default` when no run is resumed.

    `hydra.run.dir` and `hydra.sweep.subdir` use it, so a resumed run continues in its own
    folder. Hydra resolves them before it changes the working folder, so a relative path is
    taken from the folder dml-train started in.
    """
    if resume is None or str(resume) == "":
        return default
    path = os.path.abspath(os.path.expanduser(str(resume)))
    if not os.path.exists(path):
        NEW_RESUME_DIRS.add(path)
    return path


def hydra_output_subdir(resume: object) -> str | None:
    """Return `hydra.output_subdir`: None for a resumed run, so its first `.hydra/` is kept."""
    if resume is None or str(resume) == "":
        return HYDRA_OUTPUT_SUBDIR
    return None


def register_resolvers() -> None:
    """Register the `dml_run_dir` and `dml_output_subdir` resolvers that conf/train.yaml uses."""
    if not OmegaConf.has_resolver("dml_run_dir"):
        OmegaConf.register_new_resolver("dml_run_dir", resume_run_dir)
    if not OmegaConf.has_resolver("dml_output_subdir"):
        OmegaConf.register_new_resolver("dml_output_subdir", hydra_output_subdir)


register_resolvers()


# The keys each section of a training config may have; a misspelt key added with `+` would
# otherwise be ignored without a word. `dataset` keys are checked by check_dataset_config.
KNOWN_KEYS = {
    "": (
        "trainer",
        "dataset",
        "cohort",
        "optimizer",
        "scheduler",
        "loss",
        "device",
        "logger",
        "seed",
        "resume",
        "hydra",
    ),
    "trainer": (
        "epochs",
        "batch_size",
        "eval_batch_size",
        "precision",
        "compile",
        "channels_last",
        "deterministic",
        "checkpoint_every_steps",
        "log_every_steps",
        "num_workers",
    ),
    "loss": ("name", "temperature", "mimicry_weight", "update", "mimicry"),
    "cohort": ("name", "students", "arch", "size", "arch_args"),
    "device": ("type",),
    "logger": ("tensorboard", "flush_secs"),
}
STUDENT_KEYS = ("name", "arch", "arch_args", "optimizer")


def check_known_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for a key that no part of dml-train reads, naming the valid keys."""
    for section, known in KNOWN_KEYS.items():
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for key in node.keys():
            if key not in known:
                path = f"{section}.{key}" if section else str(key)
                raise ConfigError(
                    f"Unknown key {path}: check its spelling. Valid keys"
                    f"{' of ' + section if section else ''}: {', '.join(known)}."
                )
    students = cfg.cohort.get("students") or []
    for index, student in enumerate(students):
        if isinstance(student, DictConfig):
            for key in student.keys():
                if key not in STUDENT_KEYS:
                    raise ConfigError(
                        f"Unknown key cohort.students[{index}].{key}: a student has "
                        f"{', '.join(STUDENT_KEYS)}."
                    )


def check_learning_rates(cfg: DictConfig) -> None:
    """Raise ConfigError unless every learning rate, shared or per student, is positive."""
    rates = [("optimizer.lr", cfg.optimizer.get("lr"))]
    for index, student in enumerate(cfg.cohort.get("students") or []):
        student_optimizer = student.get("optimizer") if isinstance(student, DictConfig) else None
        if student_optimizer is not None and "lr" in student_optimizer:
            rates.append((f"cohort.students[{index}].optimizer.lr", student_optimizer.lr))
    for key, lr in rates:
        if lr is None:
            continue
        value = _number(lr, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"Invalid {key}={lr}: it must be a finite number > 0.")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, the value and the valid range of the first bad value.

    Runs before any data is loaded or any file is written.
    """
    check_known_keys(cfg)
    check_learning_rates(cfg)
    student_specs(cfg.cohort, _int(cfg, "seed", cfg.seed, minimum=None))
    loss = cfg.loss
    check_loss_arguments(
        _number(loss.temperature, "loss.temperature"),
        _number(loss.mimicry_weight, "loss.mimicry_weight"),
        loss["update"],
        loss["mimicry"],
        config_keys=True,
    )

    trainer = cfg.trainer
    _int(cfg, "trainer.epochs", trainer.epochs, minimum=0)
    _int(cfg, "trainer.batch_size", trainer.batch_size, minimum=1)
    _int(cfg, "trainer.eval_batch_size", trainer.eval_batch_size, minimum=1)
    _int(cfg, "trainer.log_every_steps", trainer.log_every_steps, minimum=1)
    _int(cfg, "trainer.num_workers", trainer.num_workers, minimum=0)
    if trainer.checkpoint_every_steps is not None:
        _int(cfg, "trainer.checkpoint_every_steps", trainer.checkpoint_every_steps, minimum=1)
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(
            f"Invalid trainer.precision={trainer.precision!r}: choose one of "
            f"{', '.join(PRECISIONS)}."
        )
    if cfg.device.type not in DEVICE_TYPES:
        raise ConfigError(
            f"Invalid device={cfg.device.type!r}: choose one of {', '.join(DEVICE_TYPES)}."
        )

    check_dataset_config(cfg.dataset)
    check_val_size(cfg.dataset)
    check_targets(cfg.optimizer, "optimizer")
    check_targets(cfg.scheduler, "scheduler")
    check_scheduler(cfg.scheduler)


def check_scheduler(scheduler_cfg: DictConfig) -> None:
    """Raise ConfigError for a scheduler setting that torch rejects or that fails mid-run.

    StepLR divides by step_size and CosineAnnealingLR by T_max when they step, after the first
    epoch, so a zero would otherwise stop the run with ZeroDivisionError.
    """
    if scheduler_cfg.get("_target_") is None:
        return
    for key in ("step_size", "T_max"):
        if key in scheduler_cfg:
            _int(scheduler_cfg, f"scheduler.{key}", scheduler_cfg[key], minimum=1)
    if "milestones" in scheduler_cfg:
        milestones = scheduler_cfg.milestones
        values = list(milestones) if isinstance(milestones, ListConfig | list) else [milestones]
        valid = isinstance(milestones, ListConfig | list) and all(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
            for value in values
        )
        if not valid:
            raise ConfigError(
                f"Invalid scheduler.milestones={milestones}: it must be a list of epochs, "
                "integers >= 1, such as [30,60]."
            )
    if "gamma" in scheduler_cfg:
        gamma = _number(scheduler_cfg.gamma, "scheduler.gamma")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ConfigError(
                f"Invalid scheduler.gamma={scheduler_cfg.gamma}: it must be a finite number > 0."
            )
    if "eta_min" in scheduler_cfg:
        eta_min = _number(scheduler_cfg.eta_min, "scheduler.eta_min")
        if not (math.isfinite(eta_min) and eta_min >= 0):
            raise ConfigError(
                f"Invalid scheduler.eta_min={scheduler_cfg.eta_min}: it must be a finite "
                "number >= 0."
            )


def check_val_size(dataset_cfg: DictConfig) -> None:
    """Raise ConfigError when `dataset.val_size` leaves no train images, before any data loads.

    Only datasets of a known size are checked here; load_dataset checks the others.
    """
    num_train = TRAIN_SPLIT_SIZES.get(dataset_cfg.name)
    if dataset_cfg.name == "synthetic":
        num_train = dataset_cfg.num_train
    if num_train is not None:
        _val_count(dataset_cfg.val_size, num_train, dataset_cfg.name)


def _int(cfg: DictConfig, key: str, value: object, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Invalid {key}={value!r}: it must be an integer.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"Invalid {key}={value}: it must be >= {minimum}.")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"Invalid {key}={value!r}: it must be a number.")
    return float(value)

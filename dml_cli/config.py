"""Where the configs live, and validation of a composed config before anything runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dml_cli.build import DEVICE_TYPES, check_targets, student_specs
from dml_cli.data import check_dataset_config
from dml_cli.engine import PRECISIONS, check_loss_arguments
from dml_cli.errors import ConfigError


def config_dir() -> str:
    """Return the absolute path of the config folder.

    An installed wheel carries the configs as `dml_cli/conf`; a source checkout (and an editable
    install) keeps them in `conf/` at the top of the repository.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key, the value and the valid range of the first bad value.

    Runs before any data is loaded or any file is written.
    """
    student_specs(cfg.cohort, _int(cfg, "seed", cfg.seed, minimum=None))
    loss = cfg.loss
    check_loss_arguments(
        _number(loss.temperature, "loss.temperature"),
        _number(loss.mimicry_weight, "loss.mimicry_weight"),
        loss["update"],
        loss["mimicry"],
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
    check_targets(cfg.optimizer, "optimizer")
    check_targets(cfg.scheduler, "scheduler")


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

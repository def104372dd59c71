"""Check a single run's command line before Hydra creates its run folder."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dml_cli.config import config_dir, validate_config
from dml_cli.dry_build import check_cohort_build
from dml_cli.errors import CheckpointError, ConfigError

# Flags after which Hydra does something other than one training run (help, printing the
# config, a multirun); those command lines go to Hydra unchecked.
HYDRA_FLAGS_PREFIX = "-"


def check_command_line(overrides: list[str]) -> None:
    """Compose and validate the config of `overrides` the way `dml-train` will.

    A misspelt group option, unknown key or invalid value then stops the program with one
    line, before Hydra writes a run folder. Raises ConfigError or CheckpointError.
    """
    if any(arg.startswith(HYDRA_FLAGS_PREFIX) for arg in overrides):
        return
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
            cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(str(err))) from err
    if cfg.resume is not None:
        check_resume_folder(Path(str(cfg.resume)).expanduser().absolute())
        return
    validate_config(cfg)
    check_cohort_build(cfg)


def check_resume_folder(run_dir: Path) -> None:
    """Raise CheckpointError unless `run_dir` is a dml-train run folder."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"Invalid resume={run_dir}: no such run folder. Pass the folder of an earlier "
            "dml-train run, the one that contains .hydra/ and checkpoints/."
        )
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise CheckpointError(
            f"Invalid resume={run_dir}: it is not a dml-train run folder (no .hydra/config.yaml)."
        )


def one_line(message: str) -> str:
    """Fold Hydra's multi-line composition error into one sentence with the valid options."""
    lines = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line.startswith("To append to your config use +"):
            line = "Check the key's spelling: dml-train --cfg job prints every key."
        if line:
            lines.append(line)
    if not lines:
        return message.strip()
    text = lines[0]
    rest = lines[1:]
    if rest and rest[0].startswith("Available options"):
        text += f". {rest[0]} {', '.join(rest[1:])}."
    elif rest:
        text += " " + " ".join(rest)
    return text

"""Check a `dml-train` command line before Hydra creates its run folder or sweep dir."""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dml_cli.build import resolve_device
from dml_cli.config import config_dir, validate_config
from dml_cli.dry_build import check_cohort_build
from dml_cli.errors import CheckpointError, ConfigError, DMLError
from dml_cli.resume import check_not_finished, load_saved_config, load_train_state, target_epochs

log = logging.getLogger(__name__)

# Command lines with any other flag (help, printing the config, a config dir) go to Hydra
# unchecked, because Hydra then does something other than train.
MULTIRUN_FLAGS = ("-m", "--multirun")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Composing one job's config took about 70 ms on a 2-core machine, so checking 256 jobs delays
# a sweep by about 17 s. The later jobs of a larger sweep are checked by train() when they start.
MAX_CHECKED_JOBS = 256
# Subfolders of a run folder that a resumed run writes into, next to the folder itself.
RESUME_WRITTEN_DIRS = ("checkpoints", "plots")
# Hydra's message for an override of a key that the composed config does not have.
MISSING_KEY_PATTERN = re.compile(r"Could not override '([^']+)'")
# A key this similar to the unknown one (difflib's ratio) is offered as its spelling. At 0.8,
# trainer.epoch suggests epochs but cohort.students.0.arch_args, a real new key, suggests nothing.
CLOSE_KEY_CUTOFF = 0.8


def check_command_line(args: list[str]) -> None:
    """Compose and validate the config of each job that `args` starts, as `dml-train` will.

    A misspelt group option, unknown key, invalid value or unusable folder then stops the program
    with one line, before Hydra writes a run folder or sweep dir. Raises ConfigError or
    CheckpointError.
    """
    flags = {arg for arg in args if arg.startswith("-")}
    overrides = [arg for arg in args if not arg.startswith("-")]
    if not flags:
        check_single_run(overrides)
    elif flags <= set(MULTIRUN_FLAGS):
        check_multirun(overrides)


def check_single_run(overrides: list[str]) -> None:
    """Check the config of one run and that Hydra can create its run folder."""
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = _compose(overrides)
    check_job_config(cfg)
    if cfg.resume is None:
        check_run_dir_unused(str(cfg.hydra.run.dir))
        check_folder_creatable(str(cfg.hydra.run.dir), "hydra.run.dir")


def check_multirun(overrides: list[str]) -> None:
    """Check the sweep dir and the config of each job of a multirun, before any job starts.

    With the basic sweeper each job is composed from its own overrides, as the sweeper expands
    them. Another sweeper (such as Optuna) chooses its jobs' values while it runs, so only the
    config the jobs share is checked.
    """
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = _parse(parser, overrides)
        for override in parsed:
            if override.is_hydra_override() and override.is_sweep_override():
                raise ConfigError(
                    f"Invalid override {override.input_line}: a multirun cannot sweep over a "
                    "hydra setting. Give it one value."
                )
        # Hydra composes this config too, from the overrides that are not swept, to set up the
        # sweeper and the launcher.
        fixed = [override.input_line for override in parsed if not override.is_sweep_override()]
        base = _compose(fixed)
        check_folder_creatable(str(base.hydra.sweep.dir), "hydra.sweep.dir")
        if base.hydra.sweeper._target_ == BASIC_SWEEPER:
            check_basic_sweep(parser, parsed, base)
        else:
            check_search_config(base, parsed)


def check_basic_sweep(parser: OverridesParser, parsed: list[Override], base: DictConfig) -> None:
    """Compose and check each job of a basic sweep, up to MAX_CHECKED_JOBS jobs."""
    # As in Hydra 1.3, the sweeper's params come before the command line's task overrides, and
    # each job is composed from the hydra overrides followed by the job's own.
    params = base.hydra.sweeper.get("params") or {}
    sweep = [f"{key}={value}" for key, value in params.items()]
    sweep += [override.input_line for override in parsed if not override.is_hydra_override()]
    hydra_overrides = [override.input_line for override in parsed if override.is_hydra_override()]
    num_jobs, jobs = expand_sweep(_parse(parser, sweep))
    if num_jobs > MAX_CHECKED_JOBS:
        log.warning(
            f"Checked the configs of the first {MAX_CHECKED_JOBS} of {num_jobs} sweep jobs "
            "before the sweep. The later jobs are checked when they start."
        )
    for job in itertools.islice(jobs, MAX_CHECKED_JOBS):
        try:
            check_job_config(_compose(hydra_overrides + job))
        except DMLError as err:
            raise type(err)(
                f"Sweep job {' '.join(job)} is invalid, so no job was started. {err}"
            ) from err


def expand_sweep(overrides: list[Override]) -> tuple[int, Iterator[list[str]]]:
    """Return the number of jobs and an iterator of each job's overrides, in Hydra's job order.

    As in Hydra 1.3's BasicSweeper, a later override of a key replaces the earlier one in its
    place, and the jobs are the cartesian product of the keys' values.
    """
    values_per_key: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values_per_key[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            try:
                values = list(override.sweep_string_iterator())
            except HydraException as err:
                raise ConfigError(one_line(str(err))) from err
            values_per_key[key] = [f"{key}={value}" for value in values]
        else:
            raise ConfigError(
                f"Invalid override {override.input_line}: the basic sweeper enumerates comma "
                "lists, choice(), range() and glob() only. Use one of them, or a search sweeper "
                "such as hydra/sweeper=optuna."
            )
    num_jobs = math.prod(len(values) for values in values_per_key.values())
    return num_jobs, (list(job) for job in itertools.product(*values_per_key.values()))


def check_search_config(base: DictConfig, parsed: list[Override]) -> None:
    """Check the config that a search sweeper's jobs share, apart from the values it sets.

    A problem in a config group that the sweeper sets (one of its params or a swept override)
    is left to the jobs, because a job's own value may fix it.
    """
    swept = [override.key_or_group for override in parsed if override.is_sweep_override()]
    swept += [str(key) for key in base.hydra.sweeper.get("params") or {}]
    groups = {key.lstrip("+~").split("@")[0].split(".")[0].split("/")[0] for key in swept}
    try:
        check_job_config(base)
    except DMLError as err:
        # NOTE: this matches the message text. The messages of validate_config and
        # check_resume_folder name the key at fault, so one that names no swept group is shared
        # by every job.
        if any(group in str(err) for group in groups):
            return
        raise


def check_job_config(cfg: DictConfig) -> None:
    """Raise ConfigError or CheckpointError for the first problem of one job's composed config."""
    try:
        if cfg.resume is not None:
            run_dir = Path(str(cfg.resume)).expanduser().absolute()
            check_resume_folder(run_dir)
            check_resumed_run(cfg, run_dir)
            return
        validate_config(cfg)
        resolve_device(cfg.device.type)
        check_cohort_build(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(str(err))) from err


def check_resume_folder(run_dir: Path) -> None:
    """Raise CheckpointError unless `run_dir` is a dml-train run folder that can be written."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"Invalid resume={run_dir}: no such run folder. Pass the folder of an earlier "
            "dml-train run, the one that contains .hydra/ and checkpoints/."
        )
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise CheckpointError(
            f"Invalid resume={run_dir}: it is not a dml-train run folder (no .hydra/config.yaml)."
        )
    for folder in (run_dir, *(run_dir / name for name in RESUME_WRITTEN_DIRS)):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise CheckpointError(
                f"Cannot resume {run_dir}: {folder} is not writable, so the run could not save "
                "its checkpoints. Make it writable, or resume a writable copy of the run folder."
            )


def check_resumed_run(cfg: DictConfig, run_dir: Path) -> None:
    """Raise DMLError when the resumed run has no device to run on or has nothing left to train.

    The resumed run keeps its saved device and epoch count unless the command line sets them.
    """
    task_overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []
    overridden = {str(line).split("=", 1)[0].lstrip("+~") for line in task_overrides}
    saved = load_saved_config(run_dir)
    if overridden & {"device", "device.type"}:
        device_type = cfg.device.type
    else:
        device_type = OmegaConf.select(saved, "device.type", default=None)
    if device_type is not None:
        resolve_device(str(device_type))

    # Only a run with a summary.json can have finished, so other runs skip loading the state.
    if not (run_dir / "summary.json").is_file():
        return
    saved_epochs = OmegaConf.select(saved, "trainer.epochs", default=None)
    if not isinstance(saved_epochs, int):
        return
    state = load_train_state(run_dir)
    requested = cfg.trainer.epochs if "trainer.epochs" in overridden else None
    check_not_finished(run_dir, state, target_epochs(saved, state, requested))


def check_run_dir_unused(folder: str) -> None:
    """Raise ConfigError when `folder`, the run dir of a new run, already contains a run."""
    path = Path(os.path.abspath(folder))
    if (path / ".hydra" / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        raise ConfigError(
            f"Invalid hydra.run.dir={folder}: {path} already contains a dml-train run, which "
            f"this run would overwrite. Resume it with resume={path}, or choose another "
            "hydra.run.dir."
        )


def check_folder_creatable(folder: str, key: str) -> None:
    """Raise ConfigError unless Hydra can create the folder `key` names, or write in it.

    The nearest existing folder on the path must be writable, as os.access reports it.
    """
    # Hydra takes a relative folder from the working folder, and does not expand "~".
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    fix = f"Set {key} to a writable folder"
    if not os.path.isabs(folder):
        fix += ", or start dml-train in a writable folder"
    if not os.path.isdir(existing):
        raise ConfigError(
            f"Cannot create {key}={folder}: {existing} is a file, not a folder. {fix}."
        )
    # NOTE: os.access goes by permissions only, so a folder such as /proc, which reports
    # writable to root but rejects mkdir, passes here and fails later in Hydra.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot create {key}={folder}: {existing} is not writable. {fix}.")


def one_line(message: str, close_key: str | None = None) -> str:
    """Fold Hydra's multi-line composition error into one sentence with the valid options.

    `close_key`, an existing key spelt like the one Hydra could not override, replaces the
    advice to add that key with a leading +.
    """
    lines = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line.startswith("To append to your config use +") and close_key is not None:
            line = f"Did you mean {close_key}?"
        elif line.startswith("To append to your config use +"):
            addition = line.removeprefix("To append to your config use ")
            line = (
                "Check the key's spelling (dml-train --cfg job prints every key), or add the "
                f"new key with a leading +: {addition}"
            )
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


def _compose(overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(str(err), _close_key(str(err), overrides))) from err


def _close_key(message: str, overrides: list[str]) -> str | None:
    """Return the existing key spelt most like the key Hydra could not override, if one is close.

    The keys come from the same parent node of the config composed without that override.
    """
    match = MISSING_KEY_PATTERN.search(message)
    if match is None:
        return None
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    others = [line for line in overrides if line.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose(config_name="train", overrides=others, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException):
        return None
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    keys = [str(name) for name in node.keys()]
    matches = difflib.get_close_matches(leaf, keys, n=1, cutoff=CLOSE_KEY_CUTOFF)
    if not matches:
        return None
    return f"{parent}.{matches[0]}" if parent else matches[0]


def _parse(parser: OverridesParser, overrides: list[str]) -> list[Override]:
    try:
        return parser.parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(one_line(str(err))) from err

"""Continue a run in its own folder from its saved config and training state.

A run folder may come from someone else, so its saved config is untrusted: every `_target_` in
it must be in the allow-list of `dml_cli.build`, and the training state loads with
`weights_only=True`. The saved config is the source of truth. An override given with `resume`
may only raise `trainer.epochs`, change where the run executes (`device`) or change how often it
saves or checks (`trainer.checkpoint_every_steps`, `trainer.log_every_steps`). Any other
override is rejected unless it repeats the saved value.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dml_cli.build import check_targets
from dml_cli.checkpoints import TRAIN_STATE_FORMAT, TRAIN_STATE_NAME, load_checkpoint
from dml_cli.config import HYDRA_OUTPUT_SUBDIR
from dml_cli.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Overrides that change where a resumed run executes or how often it saves and checks, but not
# what it trains. device may change because a preempted job can restart on another kind of
# node. The result is then close to an uninterrupted run, but not bitwise equal.
EXECUTION_KEYS = {
    "device": "device",
    "device.type": "device",
    "trainer.checkpoint_every_steps": "trainer.checkpoint_every_steps",
    "trainer.log_every_steps": "trainer.log_every_steps",
}
# Top-level keys every run config has, and the groups whose every key train() reads directly.
REQUIRED_KEYS = ("seed", "dataset", "cohort", "optimizer", "scheduler")
REQUIRED_GROUPS = ("trainer", "loss", "device")
_ABSENT = object()


def saved_config_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / HYDRA_OUTPUT_SUBDIR / "config.yaml"


def train_state_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints" / TRAIN_STATE_NAME


def resume_command(run_dir: Path | str) -> str:
    """Return the shell command that continues the run in `run_dir`."""
    return f"dml-train resume={shlex.quote(str(Path(run_dir).absolute()))}"


def load_saved_config(run_dir: Path | str) -> DictConfig:
    """Load a run's `.hydra/config.yaml` and reject any `_target_` outside the allow-list."""
    path = saved_config_path(run_dir)
    if not path.is_file():
        raise CheckpointError(
            f"Cannot resume {run_dir}: {path} not found. Pass the folder of a dml-train run, "
            "which contains .hydra/ and checkpoints/."
        )
    try:
        # OmegaConf reads YAML with a safe loader, so no YAML tag can build an object.
        saved = OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise CheckpointError(f"Failed to read {path}: {_first_line(err)}.") from err
    if not isinstance(saved, DictConfig):
        raise CheckpointError(f"Invalid run config {path}: it does not contain a config mapping.")
    check_targets(saved)
    return saved


def prepare_resume(
    resume: Path | str, current: DictConfig, overrides: Sequence[str]
) -> tuple[Path, DictConfig, dict]:
    """Load the run in `resume` and return its folder, the config to continue with, and its state.

    `current` is the config composed for this invocation and `overrides` the command-line
    overrides that produced it. Raises ConfigError for an override that would change the run and
    CheckpointError for a missing, unsafe or incomplete run folder.
    """
    run_dir = Path(to_absolute_path(os.path.expanduser(str(resume))))
    saved = load_saved_config(run_dir)
    state = load_train_state(run_dir)
    try:
        cfg = resume_config(saved, current, overrides, state)
    except OmegaConfBaseException as err:
        raise CheckpointError(
            f"Cannot resume from {saved_config_path(run_dir)}: {_first_line(err)}."
        ) from err
    check_not_finished(run_dir, state, cfg.trainer.epochs)
    cfg.resume = str(run_dir)
    return run_dir, cfg, state


def load_train_state(run_dir: Path | str) -> dict:
    """Load a run's `checkpoints/train_state.pt`, raising CheckpointError for a foreign file."""
    state = load_checkpoint(train_state_path(run_dir), TRAIN_STATE_FORMAT)
    if not isinstance(state.get("trainer"), dict) or "epoch" not in state["trainer"]:
        raise CheckpointError(
            f"Checkpoint {train_state_path(run_dir)} contains no trainer state: it was not "
            "written by dml-train."
        )
    return state


def target_epochs(saved: DictConfig, state: dict, requested: object = None) -> int:
    """Return the epoch count a resume trains to: `requested` if it is an int, else the saved."""
    if isinstance(requested, int) and not isinstance(requested, bool):
        return requested
    return _saved_target_epochs(saved, state)


def check_not_finished(run_dir: Path | str, state: dict, epochs: int) -> None:
    """Raise ConfigError when the run already trained `epochs` epochs and wrote its summary.

    A run stopped by a signal during its last validation saves a state at its final epoch but
    writes no summary.json, so it still resumes, to write its plots and summary.
    """
    done = finished_epochs(run_dir, state)
    if done is not None and done >= epochs:
        raise ConfigError(
            f"Cannot resume {run_dir}: the run already finished its {done} "
            f"epoch{'' if done == 1 else 's'}. To train on, pass resume={run_dir} "
            f"trainer.epochs=M with M > {done}."
        )


def finished_epochs(run_dir: Path | str, state: dict) -> int | None:
    """Return the epoch count of a finished run, or None when the run has not finished.

    A run has finished when its summary.json was written at the epoch of its training state.
    The summary of an earlier finish, before a resume raised trainer.epochs, has a lower count.
    """
    trainer_state = state["trainer"]
    epoch_state = trainer_state.get("epoch_state")
    if isinstance(epoch_state, dict) and epoch_state.get("batches_done"):
        return None
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    epoch = int(trainer_state["epoch"])
    if not isinstance(summary, dict) or summary.get("epochs") != epoch:
        return None
    return epoch


def resume_config(
    saved: DictConfig, current: DictConfig, overrides: Sequence[str], state: dict
) -> DictConfig:
    """Return `saved` with the overrides a resume may apply; raise ConfigError for the others."""
    _check_complete(saved, current)
    cfg = copy.deepcopy(saved)
    epochs = _saved_target_epochs(saved, state)
    for override in _parse(overrides):
        key = override.key_or_group
        if key == "resume":
            continue
        if key == "trainer.epochs":
            epochs = _raised_epochs(current.trainer.epochs, epochs)
        elif key in EXECUTION_KEYS:
            node = EXECUTION_KEYS[key]
            OmegaConf.update(cfg, node, _value_at(current, node), merge=False)
        elif _value_at(current, key) != _value_at(saved, key):
            raise ConfigError(
                f"Invalid override {override.input_line} for resume: it changes {key} of the "
                f"saved run. On resume only trainer.epochs (raised), "
                f"{', '.join(EXECUTION_KEYS)} may change."
            )

    done = int(state["trainer"]["epoch"])
    if epochs < done:
        raise ConfigError(
            f"Invalid trainer.epochs={epochs} for resume: the run already completed {done} "
            "epochs; trainer.epochs may only be raised."
        )
    cfg.trainer.epochs = epochs
    _warn_if_changed(saved, cfg)
    return cfg


def _parse(overrides: Sequence[str]) -> list:
    try:
        return OverridesParser.create().parse_overrides([str(line) for line in overrides])
    except HydraException as err:
        raise ConfigError(f"Invalid override: {_first_line(err)}") from err


def _saved_target_epochs(saved: DictConfig, state: dict) -> int:
    # A run resumed earlier with a raised trainer.epochs stores that target in its state.
    return max(int(saved.trainer.epochs), int(state.get("epochs") or 0))


def _raised_epochs(requested: object, epochs: int) -> int:
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < epochs:
        raise ConfigError(
            f"Invalid trainer.epochs={requested!r} for resume: the run trains for {epochs} "
            f"epochs, and trainer.epochs may only be raised (use an integer >= {epochs})."
        )
    return requested


def _value_at(cfg: DictConfig, key: str) -> object:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_complete(saved: DictConfig, current: DictConfig) -> None:
    keys = list(REQUIRED_KEYS)
    keys += [f"{group}.{key}" for group in REQUIRED_GROUPS for key in current[group]]
    for key in keys:
        if OmegaConf.select(saved, key, default=_ABSENT) is _ABSENT:
            raise CheckpointError(
                f"Cannot resume: the saved config is missing {key}, so it was written by another "
                "version of dml-train. Start a new run instead."
            )


def _warn_if_changed(saved: DictConfig, cfg: DictConfig) -> None:
    if _value_at(saved, "device.type") != _value_at(cfg, "device.type"):
        log.warning(
            f"Resuming on device={cfg.device.type} instead of device={saved.device.type}: the "
            "run continues, but its numbers will not match an uninterrupted run bit for bit."
        )
    old, new = _value_at(saved, "scheduler"), _value_at(cfg, "scheduler")
    if isinstance(old, dict) and isinstance(new, dict):
        changed = [key for key in new if old.get(key) != new[key]]
        if changed:
            settings = ", ".join(f"scheduler.{key}={old.get(key)}" for key in changed)
            log.warning(
                f"The scheduler follows trainer.epochs, but a resumed scheduler keeps its saved "
                f"state ({settings}), so the learning rate does not follow the schedule of a "
                f"straight {cfg.trainer.epochs}-epoch run."
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

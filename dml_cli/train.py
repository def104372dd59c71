"""`dml-train`: train a cohort with Deep Mutual Learning from a composed Hydra config."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dml_cli import __version__
from dml_cli.batches import TensorBatches
from dml_cli.build import (
    build_optimizers,
    build_schedulers,
    build_students,
    resolve_device,
    student_specs,
)
from dml_cli.checkpoints import atomic_write_json
from dml_cli.config import NEW_RESUME_DIRS, config_dir, validate_config
from dml_cli.console import check_or_exit, print_error, print_training_summary
from dml_cli.data import DataSplits, load_dataset
from dml_cli.engine import DMLTrainer, TrainingInterrupted
from dml_cli.errors import CheckpointError, DMLError
from dml_cli.loggers import build_loggers
from dml_cli.metrics import cohort_metrics
from dml_cli.models import count_parameters, use_channels_last
from dml_cli.preflight import check_command_line
from dml_cli.recorder import RunRecorder
from dml_cli.report import ReportCallback
from dml_cli.resume import prepare_resume, resume_command, train_state_path
from dml_cli.signals import TrainingAborted, exit_code, signal_name, stop_on_signals

log = logging.getLogger(__name__)

FAILED_NAME = "failed.json"
_failed_jobs: list[str] = []


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch, and optionally turn on deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def make_loaders(cfg: DictConfig, data: DataSplits, device: torch.device, channels_last: bool):
    """Build the train, val and test batch iterators, held on the training device."""
    common = {"mean": data.mean, "std": data.std, "device": device, "channels_last": channels_last}
    loader_train = TensorBatches(
        data.train_images,
        data.train_labels,
        batch_size=cfg.trainer.batch_size,
        shuffle=True,
        augment=data.augment,
        seed=cfg.seed,
        **common,
    )
    eval_batch_size = cfg.trainer.eval_batch_size
    loader_val = TensorBatches(
        data.val_images, data.val_labels, batch_size=eval_batch_size, **common
    )
    loader_test = TensorBatches(
        data.test_images, data.test_labels, batch_size=eval_batch_size, **common
    )
    return loader_train, loader_val, loader_test


def build_trainer(cfg: DictConfig, data: DataSplits, device: torch.device):
    """Build the cohort, its optimizers and schedulers, and the trainer that drives them."""
    specs = student_specs(cfg.cohort, cfg.seed)
    students = build_students(
        specs,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    )
    channels_last = use_channels_last(cfg.trainer.channels_last, students)
    if cfg.trainer.compile:
        for student in students:
            student.compile()
    optimizers = build_optimizers(cfg.optimizer, specs, students)
    schedulers = build_schedulers(cfg.scheduler, optimizers)
    trainer = DMLTrainer(
        students,
        optimizers,
        schedulers,
        names=[spec.name for spec in specs],
        temperature=cfg.loss.temperature,
        mimicry_weight=cfg.loss.mimicry_weight,
        update=cfg.loss["update"],
        mimicry=cfg.loss.mimicry,
        device=device,
        precision=str(cfg.trainer.precision),
        channels_last=channels_last,
        log_every_steps=cfg.trainer.log_every_steps,
    )
    return trainer, specs


def summarise(trainer: DMLTrainer, specs, loader_val, loader_test, cfg, wall_time_s: float):
    """Evaluate each student's best checkpoint on val and test, and collect the run's results."""
    trainer.load_best_weights()
    val = cohort_metrics(*trainer.predict(loader_val), trainer.names)
    test = cohort_metrics(*trainer.predict(loader_test), trainer.names)
    students = []
    for k, spec in enumerate(specs):
        students.append(
            {
                "name": spec.name,
                "arch": spec.arch,
                "arch_args": spec.arch_args,
                "init_seed": spec.init_seed,
                "num_params": count_parameters(trainer.students[k]),
                "best_epoch": trainer.best_epoch[k],
                "best_val_acc": val["students"][spec.name]["acc"],
                "test_acc": test["students"][spec.name]["acc"],
            }
        )
    return {
        "version": __version__,
        "dataset": cfg.dataset.name,
        "cohort": cfg.cohort.name,
        "loss": cfg.loss.name,
        "seed": cfg.seed,
        "epochs": trainer.epoch,
        "device": str(trainer.device),
        "students": students,
        "ensemble": {"val_acc": val["ensemble"]["acc"], "test_acc": test["ensemble"]["acc"]},
        "student_mean": {
            "val_acc": val["student_mean"]["acc"],
            "test_acc": test["student_mean"]["acc"],
        },
        "wall_time_s": wall_time_s,
    }


def train(cfg: DictConfig, run_dir: Path, *, resume_state: dict | None = None) -> dict:
    """Run one training job in `run_dir` and return its summary.

    With `resume_state` (a loaded `checkpoints/train_state.pt`) the job continues that state.
    On SIGINT or SIGTERM it saves the training state and raises TrainingInterrupted.
    """
    started = time.perf_counter()
    validate_config(cfg)
    device = resolve_device(cfg.device.type)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    log.info(f"Run dir {run_dir}, device {device}, seed {cfg.seed}")

    data = load_dataset(cfg.dataset)
    warn_partial_batch(cfg, data)
    trainer, specs = build_trainer(cfg, data, device)
    if resume_state is not None:
        restore_trainer(trainer, resume_state, run_dir, cfg.trainer.epochs)
    for spec, student in zip(specs, trainer.students, strict=True):
        log.info(
            f"{spec.name}: {spec.arch}, {count_parameters(student):,} trainable params, "
            f"init seed {spec.init_seed}"
        )
    loader_train, loader_val, loader_test = make_loaders(cfg, data, device, trainer.channels_last)

    student_meta = [
        {
            "name": spec.name,
            "arch": spec.arch,
            "arch_args": spec.arch_args,
            "index": spec.index,
            "init_seed": spec.init_seed,
        }
        for spec in specs
    ]
    data_meta = {
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
    }
    recorder = RunRecorder(
        run_dir,
        student_meta,
        data_meta,
        checkpoint_every_steps=cfg.trainer.checkpoint_every_steps,
        progress=sys.stderr.isatty(),
        epochs=cfg.trainer.epochs,
    )
    with stop_on_signals(trainer):
        try:
            callbacks = [recorder, *build_loggers(cfg, run_dir)]
            trainer.fit(loader_train, loader_val, cfg.trainer.epochs, callbacks=callbacks)
        except TrainingInterrupted:
            path = recorder.save_interrupted(trainer)
            log.warning(
                f"Saved the training state {describe_position(trainer)} to {path}. "
                f"Resume with: {resume_command(run_dir)}"
            )
            raise
    if trainer.epoch == 0:
        # With trainer.epochs=0 no epoch ran, so the initial weights stand for the best and last
        # checkpoints, and metrics.csv has its header only.
        for index in range(trainer.cohort_size):
            trainer.best_states[index] = trainer.students[index].state_dict()
            recorder.save_student(trainer, index, "best")
        recorder.save_files(trainer)

    summary = summarise(
        trainer, specs, loader_val, loader_test, cfg, time.perf_counter() - started
    )
    atomic_write_json(run_dir / "summary.json", summary)
    print_training_summary(summary)
    for student in summary["students"]:
        log.info(
            f"{student['name']}: best epoch {student['best_epoch']}, "
            f"val acc {student['best_val_acc']:.4f}, test acc {student['test_acc']:.4f}"
        )
    ensemble = summary["ensemble"]
    log.info(f"ensemble: val acc {ensemble['val_acc']:.4f}, test acc {ensemble['test_acc']:.4f}")
    log.info(f"Wrote {run_dir / 'summary.json'} in {summary['wall_time_s']:.1f}s")
    return summary


def warn_partial_batch(cfg: DictConfig, data: DataSplits) -> None:
    """Log a warning when the whole train split is smaller than one batch."""
    num_train = len(data.train_labels)
    if cfg.trainer.batch_size > num_train:
        log.warning(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {num_train}-image "
            f"train split: each epoch trains on one partial batch of {num_train} images."
        )


def restore_trainer(trainer: DMLTrainer, state: dict, run_dir: Path, epochs: int) -> None:
    """Load a saved training state into `trainer`; raise CheckpointError if it does not fit."""
    try:
        trainer.load_state_dict(state["trainer"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"Checkpoint {train_state_path(run_dir)} does not fit the run's config ({text}): "
            "it was not written by this run."
        ) from err
    log.info(
        f"Resuming {run_dir} {describe_position(trainer)}, training to trainer.epochs={epochs}"
    )


def describe_position(trainer: DMLTrainer) -> str:
    """Describe the training position, as in "after step=50 (epoch 2, batch 8)"."""
    batches_done = trainer.epoch_state.batches_done
    if batches_done:
        return f"after step={trainer.step} (epoch {trainer.epoch + 1}, batch {batches_done})"
    return f"after step={trainer.step} (end of epoch {trainer.epoch})"


def run_job(cfg: DictConfig) -> float | None:
    """Run one Hydra job; return the cohort's mean val accuracy for sweepers to optimise.

    A user error ends a single run with one line and exit code 2. In a multirun the job is
    recorded as failed in its folder and the sweep goes on. SIGINT and SIGTERM end the program
    with exit code 130 or 143 after the training state is saved, in a multirun too.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        resume_state = None
        if cfg.resume is not None:
            overrides = list(hydra_cfg.overrides.task)
            run_dir, cfg, resume_state = prepare_resume(cfg.resume, cfg, overrides)
            log.info(f"Resuming with overrides: {' '.join(overrides)}")
        summary = train(cfg, run_dir, resume_state=resume_state)
    except TrainingInterrupted as stop:
        sys.exit(exit_code(stop.signal_number))
    except (TrainingAborted, KeyboardInterrupt) as abort:
        number = getattr(abort, "signal_number", signal.SIGINT)
        print_error("dml-train", _stopped_message(number, run_dir))
        sys.exit(exit_code(number))
    except DMLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_error("dml-train", str(err))
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if cfg.resume is not None:
                _remove_new_resume_dir(run_dir)
            sys.exit(2)
        _failed_jobs.append(str(run_dir))
        atomic_write_json(run_dir / FAILED_NAME, {"status": "failed", "error": str(err)})
        return float("nan")
    return summary["student_mean"]["val_acc"]


def _remove_new_resume_dir(run_dir: Path) -> None:
    # Hydra creates the folder of resume=PATH for its job log even when PATH contains no run.
    # A folder that did not exist before this invocation contains nothing but that log.
    if str(run_dir) not in NEW_RESUME_DIRS:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(
            run_dir
        ):
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def _stopped_message(signal_number: int, run_dir: Path) -> str:
    text = f"Stopped at once by {signal_name(signal_number)}"
    if train_state_path(run_dir).is_file():
        return (
            f"{text}; the last complete training state is kept. "
            f"Resume with: {resume_command(run_dir)}"
        )
    return f"{text} before any training state was saved in {run_dir}."


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    """Console entry point of `dml-train`."""
    check_or_exit("dml-train", check_command_line, sys.argv[1:])
    _hydra_main()
    # Jobs run by the default launcher record failures here; jobs in other processes (joblib,
    # Slurm) are found by the sweep report.
    if _failed_jobs or ReportCallback.unfinished_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()

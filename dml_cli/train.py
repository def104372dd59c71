"""`dml-train`: train a cohort with Deep Mutual Learning from a composed Hydra config."""

from __future__ import annotations

import logging
import os
import random
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
from dml_cli.build import (
    build_optimizers,
    build_schedulers,
    build_students,
    resolve_device,
    student_specs,
)
from dml_cli.checkpoints import atomic_write_json
from dml_cli.config import config_dir, validate_config
from dml_cli.console import print_error, print_training_summary
from dml_cli.data import DataSplits, TensorBatches, load_dataset
from dml_cli.engine import DMLTrainer
from dml_cli.errors import DMLError
from dml_cli.metrics import cohort_metrics
from dml_cli.models import count_parameters, is_convolutional
from dml_cli.recorder import RunRecorder

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
    channels_last = bool(
        cfg.trainer.channels_last
        and device.type == "cuda"
        and all(is_convolutional(student) for student in students)
    )
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


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one training job in `run_dir` and return its summary."""
    started = time.perf_counter()
    validate_config(cfg)
    device = resolve_device(cfg.device.type)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    log.info(f"Run dir {run_dir}, device {device}, seed {cfg.seed}")

    data = load_dataset(cfg.dataset)
    trainer, specs = build_trainer(cfg, data, device)
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
    )
    trainer.fit(loader_train, loader_val, cfg.trainer.epochs, callbacks=[recorder])
    for index, state in enumerate(trainer.best_states):
        if state is None:
            # With trainer.epochs=0 no epoch set a best, so the initial weights stand for it.
            trainer.best_states[index] = trainer.students[index].state_dict()
            recorder.save_student(trainer, index, "best")

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


def run_job(cfg: DictConfig) -> float | None:
    """Run one Hydra job; return the cohort's mean val accuracy for sweepers to optimise.

    A user error ends a single run with one line and exit code 2. In a multirun the job is
    recorded as failed in its folder and the sweep goes on.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except DMLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_error("dml-train", str(err))
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(2)
        _failed_jobs.append(str(run_dir))
        atomic_write_json(run_dir / FAILED_NAME, {"status": "failed", "error": str(err)})
        return float("nan")
    return summary["student_mean"]["val_acc"]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    """Console entry point of `dml-train`."""
    _hydra_main()
    if _failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Python API: train a cohort of your own `nn.Module`s from a notebook or a script.

`DML` is a thin layer over the engine behind `dml-train` (`DMLTrainer`) and its run folder writer
(`RunRecorder`), so a cohort trained here follows the same loss, update order and metrics as one
trained from the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor, nn

from dml_cli.build import resolve_device
from dml_cli.console import console, print_cohort_metrics
from dml_cli.engine import DMLTrainer, check_cohort_arguments, predict_cohort
from dml_cli.models import count_parameters
from dml_cli.plots import ENSEMBLE_NAME
from dml_cli.recorder import RunRecorder

log = logging.getLogger(__name__)


class DML:
    """A cohort of students trained together with Deep Mutual Learning.

    `students` are any `nn.Module`s mapping a batch of images to logits, possibly of different
    architectures. `optimizers` (and `schedulers`, if given) hold one entry per student, in the
    order of the students, and each optimizer must update only its own student's parameters.
    The loaders may be any iterables of (images, labels) batches, such as a `DataLoader` over a
    torchvision dataset. `loader_val` picks each student's best epoch and is the default of
    `evaluate`. Schedulers are stepped once per epoch, after validation.

    `device` is "auto" (CUDA when available, else the CPU), "cpu", "cuda" or a `torch.device`.
    The students are moved there, and the optimizers keep working on the moved parameters.
    `output_dir` is the run folder that `train_students` writes; by default it is
    `outputs/<date>/<time>` under the working folder, the layout of `dml-train`. `precision`
    ("32", "bf16" or "16") and `log_every_steps` mean what `trainer.precision` and
    `trainer.log_every_steps` mean for `dml-train`.

    Raises ValueError for an empty cohort, a student that is not an `nn.Module`, or optimizers,
    schedulers or names that do not line up with the students. A temperature, mimicry weight,
    update or mimicry mode out of range raises `ConfigError`, a subclass of ValueError.
    """

    def __init__(
        self,
        students: Sequence[nn.Module],
        loader_train: Iterable,
        loader_val: Iterable,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[object | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        device: torch.device | str = "auto",
        temperature: float = 1.0,
        mimicry_weight: float = 1.0,
        update: str = "simultaneous",
        mimicry: str = "pairwise",
        output_dir: Path | str | None = None,
        precision: str = "32",
        log_every_steps: int = 20,
    ):
        students = _as_list(students, nn.Module, "students")
        optimizers = _as_list(optimizers, torch.optim.Optimizer, "optimizers")
        schedulers = list(schedulers) if schedulers is not None else None
        check_cohort_arguments(students, optimizers, schedulers, names)
        if names is not None and ENSEMBLE_NAME in names:
            raise ValueError(
                f"Invalid names={list(names)}: {ENSEMBLE_NAME!r} is the name of the cohort's "
                "averaged prediction in the history, so pick another student name."
            )
        _check_optimizers(students, optimizers, schedulers)
        _check_loader(loader_train, "loader_train")
        _check_loader(loader_val, "loader_val")

        self.trainer = DMLTrainer(
            students,
            optimizers,
            schedulers,
            names=names,
            temperature=temperature,
            mimicry_weight=mimicry_weight,
            update=update,
            mimicry=mimicry,
            device=_resolve(device),
            precision=precision,
            log_every_steps=log_every_steps,
        )
        self.loader_train = loader_train
        self.loader_val = loader_val
        self.run_dir = Path(output_dir) if output_dir is not None else None
        self._data_meta: dict | None = None

    @property
    def students(self) -> list[nn.Module]:
        return self.trainer.students

    @property
    def names(self) -> list[str]:
        return self.trainer.names

    @property
    def history(self) -> list[dict]:
        """One row per student and epoch plus one for the ensemble, as in metrics.csv."""
        return self.trainer.history

    def train_students(
        self,
        epochs: int,
        plot_losses: bool = True,
        save_model: bool = True,
        *,
        tensorboard: bool = False,
        progress: bool | None = None,
    ) -> dict[str, list[dict]]:
        """Train the cohort for `epochs` more epochs, validating after each one.

        Each call writes the run folder (`run_dir`): `metrics.csv` always, the curves of train
        loss, val loss and val accuracy in `plots/curves.png` when `plot_losses` is true, and
        `checkpoints/{name}_best.pt`, `checkpoints/{name}_last.pt` and
        `checkpoints/train_state.pt` when `save_model` is true. With `tensorboard`, event files
        go to `run_dir/tensorboard`. `progress` shows a progress bar per epoch, by default only
        in a terminal or a notebook. The students keep their last weights; call
        `load_best_weights` for the best epoch of each.

        Returns {name: rows} for every epoch trained so far, with the ensemble under
        "ensemble". A row contains epoch, train_loss, train_ce_loss, train_kl_loss, train_acc,
        val_loss, val_acc, lr and time_s (the ensemble has only the val columns).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Invalid epochs={epochs!r}: it must be an integer >= 0.")
        run_dir = self._ensure_run_dir()
        if progress is None:
            progress = console().is_terminal or console().is_jupyter
        callbacks: list[object] = [
            _ApiRecorder(
                run_dir,
                self._student_meta(),
                self._describe_data(),
                save_model=save_model,
                plot_losses=plot_losses,
                progress=progress,
            )
        ]
        if tensorboard:
            from dml_cli.loggers import TensorBoardLogger

            callbacks.append(TensorBoardLogger(run_dir / "tensorboard"))

        log.info(f"Run dir {run_dir}, device {self.trainer.device}")
        total_epochs = self.trainer.epoch + epochs
        self.trainer.fit(self.loader_train, self.loader_val, total_epochs, callbacks=callbacks)
        return self.history_by_student()

    def history_by_student(self) -> dict[str, list[dict]]:
        """Return the history rows grouped by student, with the ensemble last."""
        grouped: dict[str, list[dict]] = {name: [] for name in [*self.names, ENSEMBLE_NAME]}
        for row in self.trainer.history:
            grouped[row["student"]].append(row)
        return grouped

    def evaluate(self, loader: Iterable | None = None, *, title: str | None = None) -> dict:
        """Compute and print per-student and ensemble metrics on `loader` (default: loader_val).

        Uses the students' current weights. Returns the dict of `dml_cli.metrics.cohort_metrics`:
        "students" ({name: acc, top5, nll, ece}), "ensemble", "student_mean", "student_std",
        "agreement" and "kl".
        """
        if loader is None:
            loader = self.loader_val
        else:
            _check_loader(loader, "loader")
        metrics = self.trainer.evaluate(loader)
        archs = {
            name: type(student).__name__
            for name, student in zip(self.names, self.students, strict=True)
        }
        print_cohort_metrics(metrics, archs, title=title or "Evaluation")
        return metrics

    def get_parameters(self) -> dict[str, int]:
        """Return each student's number of trainable parameters, by name."""
        return {
            name: count_parameters(student)
            for name, student in zip(self.names, self.students, strict=True)
        }

    def load_best_weights(self) -> None:
        """Load each student's weights from its epoch of highest val accuracy so far."""
        self.trainer.load_best_weights()

    def _ensure_run_dir(self) -> Path:
        # Later calls continue training, so they write into the same folder.
        if self.run_dir is None:
            now = datetime.now()
            self.run_dir = Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def _student_meta(self) -> list[dict]:
        # Custom modules are not in the architecture registry, so a checkpoint records the class
        # name as its arch and has no init seed. Reload one with module.load_state_dict.
        return [
            {
                "name": name,
                "arch": type(student).__name__,
                "arch_args": {},
                "index": index,
                "init_seed": None,
            }
            for index, (name, student) in enumerate(zip(self.names, self.students, strict=True))
        ]

    def _describe_data(self) -> dict:
        """Read the input shape and class count from the first val batch, once."""
        if self._data_meta is not None:
            return self._data_meta
        # Starting a DataLoader iterator draws a seed from torch's global generator, so the peek
        # runs on a fork of it and leaves the training order as the caller seeded it.
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(self.loader_val), None)
            if batch is None:
                raise ValueError("loader_val yields no batches: pass a loader with at least one.")
            images = _check_batch(batch, "loader_val")
            logits, _ = predict_cohort(
                self.students[:1], [batch], self.trainer.device, precision=self.trainer.precision
            )
        self._data_meta = {
            "in_channels": int(images.shape[1]) if images.dim() == 4 else None,
            "image_size": int(images.shape[-1]) if images.dim() == 4 else None,
            "num_classes": int(logits.shape[-1]),
        }
        return self._data_meta


class _ApiRecorder(RunRecorder):
    """RunRecorder that writes checkpoints only with save_model and the curves only with
    plot_losses. The console rows and metrics.csv are unchanged."""

    def __init__(self, *args, save_model: bool, plot_losses: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_model = save_model
        self.plot_losses = plot_losses

    def on_best(self, trainer: DMLTrainer, index: int, old: float, new: float) -> None:
        if self.save_model:
            super().on_best(trainer, index, old, new)
            return
        old_text = "none" if old == float("-inf") else f"{old:.4f}"
        log.info(f"best val acc {trainer.names[index]}: {old_text} -> {new:.4f}")

    def save_student(self, trainer: DMLTrainer, index: int, which: str) -> Path | None:
        if not self.save_model:
            return None
        return super().save_student(trainer, index, which)

    def save_train_state(self, trainer: DMLTrainer) -> Path | None:
        if not self.save_model:
            return None
        return super().save_train_state(trainer)

    def on_train_end(self, trainer: DMLTrainer) -> None:
        if self.plot_losses:
            super().on_train_end(trainer)


def _resolve(device: torch.device | str) -> torch.device:
    if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
        return resolve_device(device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"Invalid device={device!r}: pass 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device."
        ) from err


def _as_list(items: object, item_type: type, key: str) -> list:
    # A single nn.Sequential is itself iterable, so it would otherwise pass as a cohort of layers.
    if isinstance(items, item_type):
        raise ValueError(
            f"{key} is a single {type(items).__name__}: pass a list with one entry per student."
        )
    if not isinstance(items, Iterable):
        raise ValueError(f"{key} is a {type(items).__name__}: pass a list, one per student.")
    return list(items)


def _check_loader(loader: object, key: str) -> None:
    if not isinstance(loader, Iterable) or isinstance(loader, Tensor | str | bytes):
        raise ValueError(
            f"{key} is a {type(loader).__name__}, not an iterable of (images, labels) batches: "
            "pass a torch.utils.data.DataLoader or a list of batches."
        )


def _check_batch(batch: object, key: str) -> Tensor:
    is_pair = isinstance(batch, list | tuple) and len(batch) == 2
    if not is_pair or not all(isinstance(part, Tensor) for part in batch):
        found = type(batch).__name__
        if isinstance(batch, list | tuple):
            found += " of " + ", ".join(type(part).__name__ for part in batch)
        raise ValueError(
            f"{key} yields a {found}, expected (images, labels) tensors: wrap the data in a "
            "TensorDataset or a dataset that returns (image, label) pairs."
        )
    return batch[0]


def _check_optimizers(
    students: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[object | None] | None,
) -> None:
    """Raise ValueError unless optimizer k (and scheduler k) belongs to student k.

    The lengths must already match, as check_cohort_arguments ensures.
    """
    for index, (student, optimizer) in enumerate(zip(students, optimizers, strict=True)):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"Optimizer {index} is a {type(optimizer).__name__}, not a torch.optim.Optimizer."
            )
        own = {id(parameter) for parameter in student.parameters()}
        for group in optimizer.param_groups:
            if any(id(parameter) not in own for parameter in group["params"]):
                raise ValueError(
                    f"Optimizer {index} updates parameters that are not student {index}'s: pass "
                    "one optimizer per student, in the order of the students."
                )
    for index, scheduler in enumerate(schedulers or []):
        if scheduler is None:
            continue
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                f"Scheduler {index} is a ReduceLROnPlateau, which needs a metric: the trainer "
                "steps schedulers once per epoch without one, so use an epoch-based scheduler."
            )
        if getattr(scheduler, "optimizer", None) is not optimizers[index]:
            raise ValueError(
                f"Scheduler {index} does not drive optimizer {index}: pass one scheduler per "
                "student, in the order of the students (None for a student without one)."
            )

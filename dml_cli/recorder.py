"""Record a run in its folder: metrics.csv, checkpoints, the training state and console rows."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dml_cli.checkpoints import (
    STUDENT_FORMAT,
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_NAME,
    atomic_write_text,
    save_checkpoint,
)
from dml_cli.engine import DMLTrainer, NonFiniteLossError, TrainingInterrupted
from dml_cli.errors import DMLError
from dml_cli.plots import plot_training_curves

log = logging.getLogger(__name__)

METRICS_COLUMNS = (
    "epoch",
    "student",
    "arch",
    "train_loss",
    "train_ce_loss",
    "train_kl_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "time_s",
)


def format_metrics_csv(rows: list[dict], archs: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        values = {"arch": archs.get(row["student"], "")}
        for key in METRICS_COLUMNS:
            if key in row:
                value = row[key]
                values[key] = f"{value:.6g}" if isinstance(value, float) else value
        writer.writerow(values)
    return buffer.getvalue()


class RunRecorder:
    """Trainer callback that writes a run's files and prints its console rows.

    Every file is written atomically, so a crash leaves the previous complete version, and no
    training state or last checkpoint is written from non-finite losses or weights.
    `student_meta` holds, per student, what a checkpoint needs to rebuild it (name, arch,
    arch_args, index, init_seed) and `data_meta` the input shape and class count. `epochs`, the
    run's target epoch count, is stored in the training state so that a resume can continue
    to it.
    """

    def __init__(
        self,
        run_dir: Path | str,
        student_meta: list[dict],
        data_meta: dict,
        *,
        checkpoint_every_steps: int | None = None,
        progress: bool = True,
        epochs: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.student_meta = student_meta
        self.data_meta = data_meta
        self.archs = {meta["name"]: meta["arch"] for meta in student_meta}
        self.checkpoint_every_steps = checkpoint_every_steps
        self.show_progress = progress
        self.epochs = epochs
        self._progress: Progress | None = None
        self._task = None
        self._best_messages: list[str] = []

    def checkpoint_path(self, name: str, which: str) -> Path:
        return self.checkpoint_dir / f"{name}_{which}.pt"

    def on_train_start(self, trainer: DMLTrainer) -> None:
        names = "  ".join(f"{name + ' loss, val acc':>28}" for name in trainer.names)
        log.info(f"{'epoch':>5}  {names}  {'ensemble':>8}  {'lr':>8}  {'time_s':>6}")

    def on_log(self, trainer: DMLTrainer, means: dict) -> None:
        if self._progress is None or self._task is None:
            return
        losses = " ".join(f"{name} {values['train_loss']:.3f}" for name, values in means.items())
        self._progress.update(
            self._task, completed=trainer.epoch_state.batches_done, losses=losses
        )

    def on_epoch_start(self, trainer: DMLTrainer, num_batches: int | None) -> None:
        if not self.show_progress:
            return
        self._progress = Progress(
            TextColumn(f"epoch {trainer.epoch + 1}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=num_batches, losses="")

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None

    def on_step(self, trainer: DMLTrainer) -> None:
        if self.checkpoint_every_steps and trainer.step % self.checkpoint_every_steps == 0:
            # A non-finite running loss is left for the engine to report with its first step.
            if _losses_finite(trainer):
                self.save_train_state(trainer)

    def on_best(self, trainer: DMLTrainer, index: int, old: float, new: float) -> None:
        name = trainer.names[index]
        path = self.save_student(trainer, index, "best")
        old_text = "none" if old == float("-inf") else f"{old:.4f}"
        self._best_messages.append(f"best val acc {name}: {old_text} -> {new:.4f}, saved {path}")

    def on_epoch_end(self, trainer: DMLTrainer, rows: list[dict]) -> None:
        self.end_epoch()
        _check_weights_finite(trainer)
        log.info(epoch_line(trainer.epoch, rows))
        for message in self._best_messages:
            log.info(message)
        self._best_messages.clear()
        self.save_files(trainer)
        # A signal that arrived during validation or these writes stops the run here, at an
        # epoch boundary, instead of after the next step.
        if trainer.stop_signal is not None:
            raise TrainingInterrupted(trainer.stop_signal)

    def save_files(self, trainer: DMLTrainer) -> None:
        """Write metrics.csv, each student's last checkpoint and the training state."""
        atomic_write_text(
            self.run_dir / "metrics.csv", format_metrics_csv(trainer.history, self.archs)
        )
        for index in range(trainer.cohort_size):
            self.save_student(trainer, index, "last")
        self.save_train_state(trainer)

    def on_train_end(self, trainer: DMLTrainer) -> None:
        if not trainer.history:
            return
        path = self.run_dir / "plots" / "curves.png"
        try:
            plot_training_curves(trainer.history, path)
        except OSError as err:
            raise DMLError(
                f"Failed to write {path}: {err.strerror or err}. Free disk space or fix the "
                "folder's permissions; metrics.csv and the checkpoints are complete."
            ) from err
        log.info(f"Wrote {path}")

    def save_interrupted(self, trainer: DMLTrainer) -> Path | None:
        """Stop the progress bar and save the training state of a run stopped by a signal."""
        self.end_epoch()
        return self.save_train_state(trainer)

    def save_student(self, trainer: DMLTrainer, index: int, which: str) -> Path:
        """Write a student's weights with what is needed to rebuild it, loadable weights_only."""
        meta = self.student_meta[index]
        if which == "best":
            state_dict = trainer.best_states[index]
            epoch = trainer.best_epoch[index]
            val_acc = trainer.best_val_acc[index]
        else:
            state_dict = trainer.students[index].state_dict()
            epoch = trainer.epoch
            val_acc = _last_val_acc(trainer, meta["name"])
        payload = {
            "format": STUDENT_FORMAT,
            **meta,
            **self.data_meta,
            "epoch": epoch,
            "val_acc": val_acc,
            "state_dict": state_dict,
        }
        return save_checkpoint(self.checkpoint_path(meta["name"], which), payload)

    def save_train_state(self, trainer: DMLTrainer) -> Path:
        """Write everything a resume needs, loadable with weights_only, over the previous state.

        Raises NonFiniteLossError, and leaves the previous state, when a weight is not finite.
        """
        _check_weights_finite(trainer)
        payload = {
            "format": TRAIN_STATE_FORMAT,
            "trainer": trainer.state_dict(),
            "epochs": self.epochs,
            "best_checkpoints": [
                str(self.checkpoint_path(name, "best").relative_to(self.run_dir))
                for name in trainer.names
            ],
        }
        return save_checkpoint(self.checkpoint_dir / TRAIN_STATE_NAME, payload)


def _losses_finite(trainer: DMLTrainer) -> bool:
    # The running sums of the epoch turn NaN or infinite with the first non-finite loss.
    return all(bool(torch.isfinite(value).all()) for value in trainer.epoch_state.sums.values())


def _check_weights_finite(trainer: DMLTrainer) -> None:
    epoch = trainer.epoch + (1 if trainer.epoch_state.batches_done else 0)
    for name, student in zip(trainer.names, trainer.students, strict=True):
        for tensor in student.state_dict().values():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteLossError(
                    f"Non-finite weights in {name} at epoch={epoch} step={trainer.step}: lower "
                    "optimizer.lr, set trainer.precision=32, or check the data. The last "
                    "complete checkpoint is kept."
                )


def _last_val_acc(trainer: DMLTrainer, name: str) -> float | None:
    for row in reversed(trainer.history):
        if row["student"] == name:
            return row["val_acc"]
    return None


def epoch_line(epoch: int, rows: list[dict]) -> str:
    """Format one row of the console's epoch table from the students' rows and the ensemble's.

    The lr column shows one value when the students share it, else each student's lr in cohort
    order, joined by "/".
    """
    cells = [f"{row['train_loss']:>18.4f} {row['val_acc']:>9.4f}" for row in rows[:-1]]
    ensemble = rows[-1]
    lrs = [f"{row['lr']:.2g}" for row in rows[:-1]]
    if len(set(lrs)) == 1:
        lrs = lrs[:1]
    return (
        f"{epoch:>5}  {'  '.join(cells)}  {ensemble['val_acc']:>8.4f}  "
        f"{'/'.join(lrs):>8}  {ensemble['time_s']:>6.1f}"
    )

"""The training engine shared by `dml-train` and the Python API: one loop for every cohort."""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from dml_cli.errors import ConfigError, DMLError
from dml_cli.losses import MIMICRY_MODES, cohort_loss
from dml_cli.metrics import cohort_metrics

log = logging.getLogger(__name__)

UPDATE_MODES = ("simultaneous", "sequential")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}

# mallopt parameter numbers from glibc's malloc.h, and the values keep_freed_memory_for_reuse
# sets: 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD_BYTES = 32 * 2**20
MALLOC_TRIM_THRESHOLD_BYTES = 256 * 2**20
_malloc_tuned = False


class NonFiniteLossError(DMLError):
    """A student's loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary because a signal asked it to."""

    def __init__(self, signal_number: int):
        super().__init__(f"training interrupted by signal {signal_number}")
        self.signal_number = signal_number


@dataclass
class EpochState:
    """Running sums of the current epoch, kept on the device so that steps never synchronise."""

    batches_done: int = 0
    num_samples: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)


class DMLTrainer:
    """Train a cohort of students together with Deep Mutual Learning.

    Each student has its own optimizer (and optional scheduler, stepped once per epoch). With
    `update="simultaneous"` every student runs one forward pass per batch and the cohort takes one
    backward pass. With `update="sequential"` students step one after another on the same batch
    and later students mimic peers already updated on it (2K - 1 forward passes at most).
    """

    def __init__(
        self,
        students: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[object | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        temperature: float = 1.0,
        mimicry_weight: float = 1.0,
        update: str = "simultaneous",
        mimicry: str = "pairwise",
        device: torch.device | str = "cpu",
        precision: str = "32",
        channels_last: bool = False,
        log_every_steps: int = 50,
    ):
        check_cohort_arguments(students, optimizers, schedulers, names)
        check_loss_arguments(temperature, mimicry_weight, update, mimicry)
        if str(precision) not in PRECISIONS:
            raise ConfigError(
                f"Invalid precision={precision!r} (trainer.precision): choose one of "
                f"{', '.join(PRECISIONS)}."
            )
        self.device = torch.device(device)
        self.students = [student.to(self.device) for student in students]
        if channels_last:
            self.students = [s.to(memory_format=torch.channels_last) for s in self.students]
        self.channels_last = channels_last
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers) if schedulers else [None] * len(self.students)
        self.names = list(names) if names else [f"student_{i}" for i in range(len(students))]
        self.temperature = float(temperature)
        self.mimicry_weight = float(mimicry_weight)
        self.update = update
        self.mimicry = mimicry
        self.precision = str(precision)
        self.log_every_steps = max(1, int(log_every_steps))
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "16")

        self.epoch = 0
        self.step = 0
        self.best_val_acc = [-math.inf] * len(self.students)
        self.best_epoch = [0] * len(self.students)
        self.best_states: list[dict[str, Tensor] | None] = [None] * len(self.students)
        self.history: list[dict] = []
        self.epoch_state = EpochState()
        self.stop_signal: int | None = None
        self.forward_passes = 0

        if len(self.students) == 1 or self.mimicry_weight == 0:
            log.info("Mimicry is off: the students train independently.")
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()

    @property
    def cohort_size(self) -> int:
        return len(self.students)

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, index: int, images: Tensor) -> Tensor:
        self.forward_passes += 1
        with self.autocast():
            return self.students[index](images)

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _train_step_simultaneous(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = torch.stack([self._forward(k, images) for k in range(self.cohort_size)])
        loss = cohort_loss(
            logits,
            labels,
            temperature=self.temperature,
            mimicry_weight=self.mimicry_weight,
            mimicry=self.mimicry,
        )
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss.total.sum()).backward()
        # NOTE: with precision "16", GradScaler.step hands its inf check to a fused optimizer
        # (the shipped configs' default) but reads it with .item() for any other, one host
        # sync per student per step. With "32" and "bf16" the scaler is off.
        for optimizer in self.optimizers:
            self.grad_scaler.step(optimizer)
        self.grad_scaler.update()
        return logits.detach(), torch.stack([loss.total, loss.ce_loss, loss.kl_loss]).detach()

    def _train_step_sequential(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # Every student's graph is built once up front. A student's own logits stay valid until
        # it steps, and a peer that already stepped on this batch is recomputed once without
        # gradient, so the batch costs K + (K - 1) forward passes.
        logits = [self._forward(k, images) for k in range(self.cohort_size)]
        current = [z.detach() for z in logits]
        terms = []
        for k in range(self.cohort_size):
            stacked = torch.stack(
                [logits[k] if i == k else current[i] for i in range(len(current))]
            )
            loss = cohort_loss(
                stacked,
                labels,
                temperature=self.temperature,
                mimicry_weight=self.mimicry_weight,
                mimicry=self.mimicry,
            )
            self.optimizers[k].zero_grad(set_to_none=True)
            self.grad_scaler.scale(loss.total[k]).backward()
            self.grad_scaler.step(self.optimizers[k])
            self.grad_scaler.update()
            terms.append(torch.stack([loss.total[k], loss.ce_loss[k], loss.kl_loss[k]]).detach())
            if k < self.cohort_size - 1:
                with torch.no_grad():
                    current[k] = self._forward(k, images).detach()
        return torch.stack(logits).detach(), torch.stack(terms, dim=1)

    def train_epoch(
        self,
        loader: Iterable,
        on_step: Callable[[DMLTrainer], None] | None = None,
        on_log: Callable[[DMLTrainer, dict], None] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Train every student for one pass over `loader` and return its mean train metrics.

        Resumes inside the epoch when `epoch_state` records batches already done. Raises
        `TrainingInterrupted` at a step boundary once `stop_signal` is set.
        """
        for student in self.students:
            student.train()
        state = self.epoch_state
        if not state.sums:
            state.sums = self._zero_sums()
        skip = state.batches_done
        # Row 0 tracks each student's cross-entropy and row 1 its total loss: a student whose
        # logits are NaN poisons every peer's mimicry term, and the cross-entropy names it.
        first_bad_step = torch.full((2, self.cohort_size), -1, device=self.device)

        for batch_index, (images, labels) in enumerate(_skip_batches(loader, skip), start=skip):
            images, labels = self._to_device(images, labels)
            if self.update == "simultaneous":
                logits, terms = self._train_step_simultaneous(images, labels)
            else:
                logits, terms = self._train_step_sequential(images, labels)
            self.step += 1
            batch_size = labels.shape[0]
            correct = (logits.argmax(dim=-1) == labels).sum(dim=1)
            state.sums["loss"] += terms[0] * batch_size
            state.sums["ce_loss"] += terms[1] * batch_size
            state.sums["kl_loss"] += terms[2] * batch_size
            state.sums["correct"] += correct
            state.num_samples += batch_size
            state.batches_done = batch_index + 1
            # A slice, not terms[[1, 0]]: a list index is copied to the device, which blocks.
            bad = ~torch.isfinite(terms[:2].flip(0))
            first_bad_step = torch.where(bad & (first_bad_step < 0), self.step, first_bad_step)

            at_log_step = self.step % self.log_every_steps == 0
            if at_log_step:
                self._raise_if_not_finite(first_bad_step)
                if on_log is not None:
                    on_log(self, self.epoch_means())
            if on_step is not None:
                on_step(self)
            if self.stop_signal is not None:
                self._raise_if_not_finite(first_bad_step)
                raise TrainingInterrupted(self.stop_signal)

        self._raise_if_not_finite(first_bad_step)
        means = self.epoch_means()
        self.epoch_state = EpochState()
        return means

    def _zero_sums(self) -> dict[str, Tensor]:
        zeros = torch.zeros(self.cohort_size, device=self.device)
        return {key: zeros.clone() for key in ("loss", "ce_loss", "kl_loss", "correct")}

    def epoch_means(self) -> dict[str, dict[str, float]]:
        """Read the running sums of the current epoch once, as per-student means."""
        state = self.epoch_state
        count = max(state.num_samples, 1)
        sums = {key: value.tolist() for key, value in state.sums.items()}
        return {
            name: {
                "train_loss": sums["loss"][k] / count,
                "train_ce_loss": sums["ce_loss"][k] / count,
                "train_kl_loss": sums["kl_loss"][k] / count,
                "train_acc": sums["correct"][k] / count,
            }
            for k, name in enumerate(self.names)
        }

    def _raise_if_not_finite(self, first_bad_step: Tensor) -> None:
        for bad_steps in first_bad_step.tolist():
            # One step after a student's loss turns NaN its peers' weights are NaN too, so the
            # student with the earliest bad step is the cause.
            found = [(step, k) for k, step in enumerate(bad_steps) if step >= 0]
            if found:
                bad_step, index = min(found)
                name = self.names[index]
                raise NonFiniteLossError(
                    f"Non-finite loss for {name} at epoch={self.epoch + 1} "
                    f"step={int(bad_step)}: lower optimizer.lr, set trainer.precision=32, "
                    "or check the data. Checkpoints of earlier epochs, if any, are kept."
                )

    def predict(self, loader: Iterable) -> tuple[Tensor, Tensor]:
        """Run every student over `loader` in one pass; return logits (K, N, C) and labels (N,)."""
        return predict_cohort(
            self.students,
            loader,
            self.device,
            precision=self.precision,
            channels_last=self.channels_last,
        )

    def evaluate(self, loader: Iterable) -> dict:
        """Return per-student, ensemble and cohort metrics over one pass of `loader`."""
        logits, labels = self.predict(loader)
        return cohort_metrics(logits, labels, self.names)

    def fit(
        self,
        loader_train: Iterable,
        loader_val: Iterable,
        epochs: int,
        callbacks: Sequence[object] = (),
    ) -> list[dict]:
        """Train until `epochs` epochs are done, validating after each; return the history rows.

        Continues from `self.epoch`, so a trainer restored with `load_state_dict` resumes. Each
        callback may define `on_train_start`, `on_epoch_start`, `on_log`, `on_step`, `on_best`,
        `on_epoch_end` and `on_train_end`, each called with this trainer first.
        """
        _call(callbacks, "on_train_start", self)
        while self.epoch < epochs:
            started = time.perf_counter()
            if hasattr(loader_train, "set_epoch"):
                loader_train.set_epoch(self.epoch + 1)
            num_batches = len(loader_train) if hasattr(loader_train, "__len__") else None
            _call(callbacks, "on_epoch_start", self, num_batches)
            train_metrics = self.train_epoch(
                loader_train,
                on_step=lambda trainer: _call(callbacks, "on_step", trainer),
                on_log=lambda trainer, means: _call(callbacks, "on_log", trainer, means),
            )
            self.epoch += 1
            val = self.evaluate(loader_val)
            lrs = [optimizer.param_groups[0]["lr"] for optimizer in self.optimizers]
            for scheduler in self.schedulers:
                if scheduler is not None:
                    scheduler.step()
            rows = self._epoch_rows(train_metrics, val, lrs, time.perf_counter() - started)
            self.history.extend(rows)
            self._update_best(val, callbacks)
            _call(callbacks, "on_epoch_end", self, rows)
        _call(callbacks, "on_train_end", self)
        return self.history

    def _epoch_rows(self, train_metrics: dict, val: dict, lrs: list[float], time_s: float):
        rows = []
        for name, lr in zip(self.names, lrs, strict=True):
            student_val = val["students"][name]
            rows.append(
                {
                    "epoch": self.epoch,
                    "student": name,
                    **train_metrics[name],
                    "val_loss": student_val["nll"],
                    "val_acc": student_val["acc"],
                    "lr": lr,
                    "time_s": time_s,
                }
            )
        rows.append(
            {
                "epoch": self.epoch,
                "student": "ensemble",
                "val_loss": val["ensemble"]["nll"],
                "val_acc": val["ensemble"]["acc"],
                "time_s": time_s,
            }
        )
        return rows

    def _update_best(self, val: dict, callbacks: Sequence[object]) -> None:
        for k, name in enumerate(self.names):
            val_acc = val["students"][name]["acc"]
            if val_acc <= self.best_val_acc[k]:
                continue
            old = self.best_val_acc[k]
            self.best_val_acc[k] = val_acc
            self.best_epoch[k] = self.epoch
            self.best_states[k] = _cpu_copy(self.students[k].state_dict())
            _call(callbacks, "on_best", self, k, old, val_acc)

    def load_best_weights(self) -> None:
        """Load each student's best weights so far (by val accuracy) into the students."""
        for student, state in zip(self.students, self.best_states, strict=True):
            if state is not None:
                student.load_state_dict(state)

    def state_dict(self) -> dict:
        """Return everything needed to continue training exactly, loadable with weights_only."""
        epoch_state = self.epoch_state
        return {
            "epoch": self.epoch,
            "step": self.step,
            "students": [student.state_dict() for student in self.students],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "grad_scaler": self.grad_scaler.state_dict(),
            "best_val_acc": list(self.best_val_acc),
            "best_epoch": list(self.best_epoch),
            "best_states": list(self.best_states),
            "history": copy.deepcopy(self.history),
            "epoch_state": {
                "batches_done": epoch_state.batches_done,
                "num_samples": epoch_state.num_samples,
                "sums": {key: value.cpu() for key, value in epoch_state.sums.items()},
            },
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict`, including the random number generators."""
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        for student, weights in zip(self.students, state["students"], strict=True):
            student.load_state_dict(weights)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"], strict=True):
            if scheduler is not None and scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.best_val_acc = list(state["best_val_acc"])
        self.best_epoch = list(state["best_epoch"])
        self.best_states = list(state["best_states"])
        self.history = list(state["history"])
        saved = state["epoch_state"]
        self.epoch_state = EpochState(
            batches_done=int(saved["batches_done"]),
            num_samples=int(saved["num_samples"]),
            sums={key: value.to(self.device) for key, value in saved["sums"].items()},
        )
        restore_rng_state(state["rng"])


@torch.inference_mode()
def predict_cohort(
    students: Sequence[nn.Module],
    loader: Iterable,
    device: torch.device | str,
    *,
    precision: str = "32",
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run every student over `loader` in one pass; return logits (K, N, C) and labels (N,).

    Students are put in eval mode for the pass and back in their previous mode after it. The
    logits come back as float32 on the CPU, so metrics over them do not depend on batching.
    """
    device = torch.device(device)
    dtype = PRECISIONS[str(precision)]
    modes = [student.training for student in students]
    for student in students:
        student.eval()
    all_logits, all_labels = [], []
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
            with autocast:
                logits = torch.stack([student(images) for student in students])
            # Kept on the device until the pass ends, so the batches run without a host sync.
            all_logits.append(logits.float())
            all_labels.append(labels)
    finally:
        for student, mode in zip(students, modes, strict=True):
            student.train(mode)
    if not all_labels:
        raise DMLError("Cannot evaluate on an empty split: it has no samples.")
    return torch.cat(all_logits, dim=1).cpu(), torch.cat(all_labels).cpu()


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's malloc thresholds so that freed CPU tensors are reused, not unmapped.

    By default glibc maps blocks above a threshold with mmap and unmaps them when they are
    freed (the threshold moves as blocks are freed), and it returns free heap memory to the
    system above a second threshold. A CPU training step then faults in fresh pages for its
    activations, at a cost that varies from process to process (benchmarks/README.md gives the
    measured faults per step and their cost). Fixing both thresholds keeps freed blocks for the
    next step. The setting is process-wide and made once. Returns whether the thresholds are
    set, which is False on a libc other than glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on a non-glibc libc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES) == 1
    _malloc_tuned = mmap_set and trim_set
    if not _malloc_tuned:
        log.warning("glibc mallopt rejected the malloc thresholds; CPU steps may page-fault more.")
    return _malloc_tuned


def check_cohort_arguments(students, optimizers, schedulers, names) -> None:
    """Raise ValueError unless the cohort, its optimizers and names line up one to one."""
    if len(students) == 0:
        raise ValueError("The cohort is empty: pass at least one student.")
    for index, student in enumerate(students):
        if not isinstance(student, nn.Module):
            raise ValueError(
                f"Student {index} is a {type(student).__name__}, not a torch.nn.Module."
            )
    if len(optimizers) != len(students):
        raise ValueError(
            f"Got {len(optimizers)} optimizers for {len(students)} students: pass one per student."
        )
    if schedulers and len(schedulers) != len(students):
        raise ValueError(
            f"Got {len(schedulers)} schedulers for {len(students)} students: pass one per "
            "student (None where a student has none)."
        )
    if names is not None and len(names) != len(students):
        raise ValueError(f"Got {len(names)} names for {len(students)} students.")
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"Student names must be unique, got {list(names)}.")


def check_loss_arguments(
    temperature, mimicry_weight, update, mimicry, *, config_keys: bool = False
) -> None:
    """Raise ConfigError for loss settings outside their valid range.

    Each message names the config key (loss.temperature=...) when `config_keys` is true, as
    dml-train's config check wants, and otherwise the argument, with its config key in
    parentheses.
    """

    def name(key: str, value: object) -> str:
        if config_keys:
            return f"loss.{key}={value!r}"
        return f"{key}={value!r} (loss.{key})"

    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"Invalid {name('temperature', temperature)}: it must be finite and > 0."
        )
    if not (math.isfinite(mimicry_weight) and mimicry_weight >= 0):
        raise ConfigError(
            f"Invalid {name('mimicry_weight', mimicry_weight)}: it must be finite and >= 0."
        )
    if update not in UPDATE_MODES:
        raise ConfigError(
            f"Invalid {name('update', update)}: choose one of {', '.join(UPDATE_MODES)}."
        )
    if mimicry not in MIMICRY_MODES:
        raise ConfigError(
            f"Invalid {name('mimicry', mimicry)}: choose one of {', '.join(MIMICRY_MODES)}."
        )


def capture_rng_state() -> dict:
    """Return the Python, NumPy and torch random states in a weights_only-loadable form."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Restore random states saved by `capture_rng_state`."""
    random.setstate(_to_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": np.array(numpy_state["key"], dtype=np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value):
    if isinstance(value, list | tuple):
        return tuple(_to_tuple(item) for item in value)
    return value


def _cpu_copy(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state_dict.items()}


def _skip_batches(loader: Iterable, skip: int) -> Iterable:
    # The batch order of an epoch is fixed by (seed, epoch), so skipping the first batches of a
    # fresh iterator lands exactly where an interrupted epoch stopped.
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator, None)
    return iterator


def _call(callbacks: Sequence[object], hook: str, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)

"""Crash-safe writes and safe loads of checkpoints and result files."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from dml_cli.errors import CheckpointError, DMLError

STUDENT_FORMAT = "dml_cli.student/1"
TRAIN_STATE_FORMAT = "dml_cli.train_state/1"
TRAIN_STATE_NAME = "train_state.pt"


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that a crash at any moment leaves the old or the new file, complete.

    The content goes to a temporary file in the same folder, which is flushed, synced and then
    renamed over `path`. Raises DMLError naming the file and the cause when the write fails,
    leaving any previous version of `path` untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        cause = err.strerror or str(err)
        raise DMLError(
            f"Failed to write {path}: {cause}. Free disk space or fix the folder's permissions; "
            "the previous version of the file, if any, is intact."
        ) from err
    except BaseException:
        # A second Ctrl-C raises inside the write: leave no partial temporary file behind.
        temporary.unlink(missing_ok=True)
        raise
    return path


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is synced; some file systems refuse it.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_write_json(path: Path | str, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_torch_save(path: Path | str, payload: object) -> Path:
    # torch.save into memory first, so a serialisation error never leaves a temporary file.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda file: file.write(buffer.getbuffer()))


def load_checkpoint(path: Path | str, expected_format: str | None = None) -> dict:
    """Load a checkpoint with `weights_only=True` so that it can never run code.

    Raises CheckpointError for a missing, truncated, corrupt or unsafe file, or one of another
    format than `expected_format`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Check the run folder and its name.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names a blocked class as a "GLOBAL"; other
        # unpickling errors come from bytes that are no pickle at all.
        if "GLOBAL" not in str(err):
            raise _corrupt(path, "its bytes are not a valid PyTorch file") from err
        raise CheckpointError(
            f"Rejected checkpoint {path}: it stores Python objects other than tensors and plain "
            "values, and loading it could run code. Only load checkpoints written by dml-train."
        ) from err
    except Exception as err:  # Garbage bytes surface as KeyError, EOFError, RuntimeError, ...
        raise _corrupt(path, f"{type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(payload, dict) or (
        expected_format is not None and payload.get("format") != expected_format
    ):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"Checkpoint {path} has format {found!r}, expected {expected_format!r}: it was not "
            "written by this version of dml-train."
        )
    return payload


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path} is truncated or corrupt ({detail}). Restore an intact copy of the "
        "file or train again."
    )


def _first_line(err: BaseException, max_length: int = 120) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else "no message"
    return line if len(line) <= max_length else line[: max_length - 3] + "..."

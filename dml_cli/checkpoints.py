"""Crash-safe writes and safe loads of checkpoints and result files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch

from dml_cli.errors import CheckpointError, DMLError

STUDENT_FORMAT = "dml_cli.student/1"
TRAIN_STATE_FORMAT = "dml_cli.train_state/1"
TRAIN_STATE_NAME = "train_state.pt"
# Payload key of the SHA-256 digest over the payload's tensors. torch.load does not check the
# CRC-32 of the zip records that hold tensor data, so damaged weights would otherwise load.
DIGEST_KEY = "tensor_sha256"
# The first bytes of a zip archive. torch.save has written zip archives since torch 1.6.
ZIP_MAGIC = b"PK\x03\x04"


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


def save_checkpoint(path: Path | str, payload: dict) -> Path:
    """Write a checkpoint atomically, with the digest of its tensors under DIGEST_KEY.

    A digest already in `payload`, such as one that `load_checkpoint` kept, is replaced.
    """
    payload = {key: value for key, value in payload.items() if key != DIGEST_KEY}
    payload[DIGEST_KEY] = tensor_digest(payload)
    return atomic_torch_save(path, payload)


def tensor_digest(payload: object) -> str:
    """Return the hex SHA-256 over each tensor's key path, dtype, shape and bytes.

    Mappings are walked in sorted key order, so the digest does not depend on insertion order.
    Values other than tensors, mappings, lists and tuples are not covered.
    """
    digest = hashlib.sha256()
    for key_path, tensor in _tensors(payload, ""):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key_path}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _tensors(value: object, key_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield key_path, value
    elif isinstance(value, Mapping):
        # Sorting by type name first keeps mixed key types, such as 1 and "1", comparable.
        for key in sorted(value, key=lambda key: (type(key).__name__, str(key))):
            yield from _tensors(value[key], f"{key_path}/{key!r}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{key_path}[{index}]")


def load_checkpoint(path: Path | str, expected_format: str | None = None) -> dict:
    """Load a checkpoint with `weights_only=True` so that it can never run code.

    A payload with a digest under DIGEST_KEY must match it, and is returned without that key. A
    payload without one, as older versions of dml_cli saved, loads unchecked. Raises
    CheckpointError for a missing, truncated, corrupt or unsafe file, or one of another format
    than `expected_format`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Check the run folder and its name.")
    try:
        with warnings.catch_warnings():
            # torch warns about a raw pickle of another protocol than its own 2, then rejects it.
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names a blocked class as a "GLOBAL"; other
        # unpickling errors come from bytes that are no pickle at all.
        if "GLOBAL" in str(err):
            raise CheckpointError(
                f"Rejected checkpoint {path}: it stores Python objects other than tensors and "
                "plain values, and loading it could run code. Only load checkpoints written by "
                "dml-train."
            ) from err
        raise _unreadable(path, "its bytes are not a valid PyTorch file") from err
    except Exception as err:  # Garbage bytes surface as KeyError, EOFError, RuntimeError, ...
        raise _unreadable(path, f"{type(err).__name__}: {_first_line(err)}") from err
    if isinstance(payload, dict) and DIGEST_KEY in payload:
        _check_digest(path, payload.pop(DIGEST_KEY), payload)
    if not isinstance(payload, dict) or (
        expected_format is not None and payload.get("format") != expected_format
    ):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"Checkpoint {path} has format {found!r}, expected {expected_format!r}: it was not "
            "written by this version of dml-train."
        )
    return payload


def _check_digest(path: Path, saved: object, payload: dict) -> None:
    if saved != tensor_digest(payload):
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: its tensor data does not match the digest saved with "
            "it. Restore the file from a copy, or retrain."
        )


def _unreadable(path: Path, detail: str) -> CheckpointError:
    """Build the error for a file that torch.load failed on: a damaged zip, or no zip at all."""
    try:
        with open(path, "rb") as file:
            is_zip = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError:
        is_zip = True
    if not is_zip and path.stat().st_size > 0:
        # Such as a raw pickle or a Git LFS pointer. An empty file is more likely a cut-off write.
        return CheckpointError(
            f"Rejected checkpoint {path}: it is not a PyTorch checkpoint, because torch.save "
            "writes a zip archive and this file is not one. Nothing in it was run. Restore the "
            "checkpoint that dml-train wrote."
        )
    return CheckpointError(
        f"Checkpoint {path} is truncated or corrupt ({detail}). Restore an intact copy of the "
        "file or train again."
    )


def _first_line(err: BaseException, max_length: int = 120) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else "no message"
    return line if len(line) <= max_length else line[: max_length - 3] + "..."

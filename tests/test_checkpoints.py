import os
import pickle
import warnings

import pytest
import torch

from dml_cli.checkpoints import (
    DIGEST_KEY,
    atomic_torch_save,
    load_checkpoint,
    save_checkpoint,
    tensor_digest,
)
from dml_cli.errors import CheckpointError


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_round_trip_keeps_tensors(tmp_path):
    path = atomic_torch_save(tmp_path / "a.pt", {"format": "x", "weight": torch.arange(3.0)})

    payload = load_checkpoint(path, "x")

    assert torch.equal(payload["weight"], torch.arange(3.0))


def test_object_building_pickle_rejected(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"format": "x", "payload": WritesMarker(str(marker))}, tmp_path / "evil.pt")

    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [b"hello\n", bytes(range(256)) * 4, b"version https://git-lfs.github.com/spec/v1\n"]
)
def test_non_zip_file_not_checkpoint(tmp_path, content):
    path = tmp_path / "student_0_last.pt"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage"])
def test_empty_or_broken_zip_corrupt(tmp_path, content):
    path = tmp_path / "student_0_last.pt"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


class RunsShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_raw_pickle_rejected_without_warning(tmp_path):
    path = tmp_path / "student_0_best.pt"
    marker = tmp_path / "marker"
    with open(path, "wb") as file:
        pickle.dump(RunsShellCommand(marker), file, protocol=4)

    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)

    assert [str(warning.message) for warning in caught_warnings] == []
    assert f"Rejected checkpoint {path}" in str(caught.value)
    assert "not a PyTorch checkpoint" in str(caught.value)
    assert "corrupt" not in str(caught.value)
    assert not marker.exists()


def test_truncated_file_is_corrupt(tmp_path):
    path = atomic_torch_save(tmp_path / "a.pt", {"format": "x", "weight": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:500])

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_wrong_format_named(tmp_path):
    path = atomic_torch_save(tmp_path / "a.pt", {"format": "other"})

    with pytest.raises(CheckpointError, match="format 'other', expected 'x'"):
        load_checkpoint(path, "x")


def test_missing_file_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def nested_state():
    """A payload shaped like train_state.pt: lists of dicts, int keys and mixed dtypes."""
    torch.manual_seed(0)
    return {
        "format": "x",
        "trainer": {
            "students": [{"weight": torch.randn(64, 32), "bias": torch.zeros(64)}],
            "optimizers": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}],
            "rng": torch.randint(0, 255, (100,), dtype=torch.uint8),
            "half": torch.randn(8, dtype=torch.bfloat16),
            "epoch": 2,
        },
    }


def test_digest_round_trip_hides_key(tmp_path):
    path = save_checkpoint(tmp_path / "state.pt", nested_state())

    payload = load_checkpoint(path, "x")

    assert DIGEST_KEY not in payload
    assert torch.equal(
        payload["trainer"]["students"][0]["weight"],
        nested_state()["trainer"]["students"][0]["weight"],
    )
    assert torch.load(path, weights_only=True)[DIGEST_KEY] == tensor_digest(nested_state())


def test_flipped_tensor_bytes_detected(tmp_path, corrupt_tensor_data):
    path = save_checkpoint(tmp_path / "student_0_best.pt", nested_state())
    corrupt_tensor_data(path)
    # torch.load itself does not notice.
    torch.load(path, weights_only=True)

    with pytest.raises(CheckpointError, match="does not match the digest") as caught:
        load_checkpoint(path, "x")
    assert f"Checkpoint {path} is corrupt" in str(caught.value)


def test_checkpoint_without_digest_loads(tmp_path):
    path = atomic_torch_save(tmp_path / "old.pt", nested_state())

    payload = load_checkpoint(path, "x")

    assert payload["trainer"]["epoch"] == 2
    assert DIGEST_KEY not in payload


def test_resaving_loaded_payload_refreshes_digest(tmp_path):
    path = save_checkpoint(tmp_path / "state.pt", nested_state())
    payload = torch.load(path, weights_only=True)
    payload["trainer"]["students"][0]["bias"].fill_(1.0)

    save_checkpoint(path, payload)

    assert torch.equal(
        load_checkpoint(path, "x")["trainer"]["students"][0]["bias"], torch.ones(64)
    )


def test_stale_digest_detected(tmp_path):
    path = save_checkpoint(tmp_path / "state.pt", nested_state())
    payload = torch.load(path, weights_only=True)
    payload["trainer"]["students"][0]["bias"].fill_(1.0)
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_checkpoint(path, "x")


def test_digest_covers_values_keys_dtypes():
    base = tensor_digest({"a": torch.zeros(4), "b": torch.ones(4)})

    assert tensor_digest({"b": torch.ones(4), "a": torch.zeros(4)}) == base
    assert tensor_digest({"a": torch.ones(4), "b": torch.zeros(4)}) != base
    assert tensor_digest({"a": torch.zeros(4), "c": torch.ones(4)}) != base
    assert tensor_digest({"a": torch.zeros(4, dtype=torch.int32), "b": torch.ones(4)}) != base
    assert tensor_digest({"a": torch.zeros(2, 2), "b": torch.ones(4)}) != base
    matrix = torch.arange(6.0).reshape(2, 3)
    transposed_copy = matrix.t().contiguous().t()
    assert not transposed_copy.is_contiguous()
    assert tensor_digest({"m": transposed_copy}) == tensor_digest({"m": matrix})

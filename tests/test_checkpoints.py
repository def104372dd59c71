import os

import pytest
import torch

from dml_cli.checkpoints import atomic_torch_save, load_checkpoint
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
    "content",
    [b"hello\n", bytes(range(256)) * 4, b"", b"version https://git-lfs.github.com/spec/v1\n"],
)
def test_garbage_file_is_corrupt(tmp_path, content):
    path = tmp_path / "student_0_last.pt"
    path.write_bytes(content)

    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


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

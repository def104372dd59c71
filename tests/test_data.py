"""Tests for loading datasets: the val carve, the config checks and the offline errors."""

import http.client
import struct
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dml_cli.data import load_dataset
from dml_cli.dataset_config import DATASET_NAMES, check_dataset_config
from dml_cli.errors import ConfigError, DataError
from dml_cli.torchvision_datasets import describe_missing

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
NUM_TRAIN = 50
NUM_TEST = 20
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    count, height, width = images.shape
    header = struct.pack(">IIII", 0x00000803, count, height, width)
    path.write_bytes(header + images.numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    header = struct.pack(">II", 0x00000801, len(labels))
    path.write_bytes(header + labels.to(torch.uint8).numpy().tobytes())


def make_idx_images(count: int, offset: int, seed: int) -> torch.Tensor:
    """Random 28x28 uint8 images whose pixel (0, 0) stores offset + index, to identify them."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
    images[:, 0, 0] = torch.arange(offset, offset + count, dtype=torch.uint8)
    return images


@pytest.fixture
def tiny_mnist(tmp_path):
    """Write 50 train and 20 test MNIST images in torchvision's layout under tmp_path."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_images = make_idx_images(NUM_TRAIN, offset=0, seed=1)
    test_images = make_idx_images(NUM_TEST, offset=100, seed=2)
    train_labels = torch.arange(NUM_TRAIN) % 10
    test_labels = (torch.arange(NUM_TEST) * 3) % 10
    write_idx_images(raw / "train-images-idx3-ubyte", train_images)
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_labels)
    return {
        "root": tmp_path,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


def dataset_cfg(name: str, **overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR.parent)):
        cfg = compose(config_name="train", overrides=[f"dataset={name}"]).dataset
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def mnist_cfg(root, **overrides):
    return dataset_cfg("mnist", root=str(root), download=False, **overrides)


def image_ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


def test_mnist_idx_files_load_exactly(tiny_mnist):
    splits = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=5))

    assert splits.name == "mnist"
    assert splits.train_images.shape == (45, 1, 28, 28)
    assert splits.val_images.shape == (5, 1, 28, 28)
    assert splits.test_images.shape == (NUM_TEST, 1, 28, 28)
    assert splits.train_images.dtype == torch.uint8
    assert splits.test_labels.dtype == torch.int64
    assert splits.train_labels.dtype == torch.int64
    assert torch.equal(splits.test_images[:, 0], tiny_mnist["test_images"])
    assert torch.equal(splits.test_labels, tiny_mnist["test_labels"])
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert splits.mean == (0.1307,)
    assert splits.std == (0.3081,)
    assert splits.augment is False


def test_mnist_train_labels_follow_images(tiny_mnist):
    splits = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=5))

    for images, labels in [
        (splits.train_images, splits.train_labels),
        (splits.val_images, splits.val_labels),
    ]:
        ids = torch.tensor(image_ids(images))
        assert torch.equal(labels, tiny_mnist["train_labels"][ids])
        assert torch.equal(images[:, 0], tiny_mnist["train_images"][ids])


@pytest.mark.parametrize(("val_size", "val_count"), [(5, 5), (1, 1), (0.1, 5), (0.25, 13)])
def test_val_carve_partitions_train_split(tiny_mnist, val_size, val_count):
    splits = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=val_size))
    train_ids = image_ids(splits.train_images)
    val_ids = image_ids(splits.val_images)

    assert len(val_ids) == val_count
    assert len(train_ids) == NUM_TRAIN - val_count
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(train_ids + val_ids) == list(range(NUM_TRAIN))
    assert train_ids == sorted(train_ids)


def test_val_carve_fixed_by_split_seed(tiny_mnist):
    first = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=10, split_seed=0))
    again = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=10, split_seed=0))
    other = load_dataset(mnist_cfg(tiny_mnist["root"], val_size=10, split_seed=1))

    assert image_ids(first.val_images) == image_ids(again.val_images)
    assert image_ids(first.val_images) != image_ids(other.val_images)
    assert torch.equal(first.test_images, other.test_images)


def test_loading_writes_no_files(tiny_mnist):
    root = tiny_mnist["root"]
    before = sorted(path.relative_to(root) for path in root.rglob("*"))

    load_dataset(mnist_cfg(root))

    assert sorted(path.relative_to(root) for path in root.rglob("*")) == before


@pytest.mark.parametrize("val_size", [NUM_TRAIN, NUM_TRAIN + 1, 0.99])
def test_val_size_too_large_raises(tiny_mnist, val_size):
    with pytest.raises(ConfigError) as info:
        load_dataset(mnist_cfg(tiny_mnist["root"], val_size=val_size))

    message = str(info.value)
    assert "dataset.val_size" in message
    assert str(val_size) in message
    assert f"[1, {NUM_TRAIN - 1}]" in message
    assert "\n" not in message


def test_synthetic_val_size_too_large_raises():
    with pytest.raises(ConfigError, match=r"dataset\.val_size=512 .*\[1, 511\]"):
        check_dataset_config(dataset_cfg("synthetic", val_size=512))


def test_missing_mnist_offline_raises_data_error(tmp_path):
    root = tmp_path / "absent"

    with pytest.raises(DataError) as info:
        load_dataset(mnist_cfg(root))

    message = str(info.value)
    assert str(root.resolve()) in message
    assert "dataset=digits" in message
    assert "dataset.download=true" in message
    assert "MNIST/raw/train-images-idx3-ubyte" in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not root.exists()


@pytest.mark.parametrize(
    "failure",
    [
        URLError("Name or service not known"),
        RuntimeError("Error downloading\nTried ..."),
        http.client.IncompleteRead(b""),
    ],
)
def test_failed_download_raises_data_error(tmp_path, monkeypatch, failure):
    import torchvision.datasets

    def fail_download(self):
        raise failure

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail_download)

    with pytest.raises(DataError) as info:
        load_dataset(dataset_cfg("mnist", root=str(tmp_path), download=True))

    message = str(info.value)
    assert "download failed" in message
    assert str(tmp_path.resolve()) in message
    assert "dataset=digits" in message
    assert "\n" not in message
    assert info.value.__cause__ is failure


def test_corrupt_mnist_file_raises_data_error(tiny_mnist):
    image_file = tiny_mnist["root"] / "MNIST" / "raw" / "train-images-idx3-ubyte"
    image_file.write_bytes(struct.pack(">I", 0x12345678) + bytes(100))

    with pytest.raises(DataError, match="unreadable or corrupt"):
        load_dataset(mnist_cfg(tiny_mnist["root"]))


def test_describe_missing_lists_expected_files(tmp_path):
    mnist = describe_missing("mnist", tmp_path)
    cifar10 = describe_missing("cifar10", tmp_path)

    for file in MNIST_FILES:
        assert f"MNIST/raw/{file}" in mnist
    assert "FashionMNIST/raw/t10k-labels-idx1-ubyte" in describe_missing("fashion_mnist", tmp_path)
    assert "cifar-10-batches-py/data_batch_5" in cifar10
    assert "cifar-10-batches-py/test_batch" in cifar10
    assert "cifar-100-python/train" in describe_missing("cifar100", tmp_path)
    assert str(tmp_path) in mnist
    assert describe_missing("digits", tmp_path).startswith("no files")


def test_digits_splits_cover_all_images():
    splits = load_dataset(dataset_cfg("digits"))
    sizes = [len(splits.train_labels), len(splits.val_labels), len(splits.test_labels)]

    assert sum(sizes) == 1797
    assert sizes[2] == 360
    assert sizes[1] == 144
    assert splits.train_images.shape[1:] == (1, 8, 8)
    assert splits.train_images.dtype == torch.uint8
    assert int(splits.train_images.max()) == 255
    assert splits.num_classes == 10
    assert torch.bincount(splits.test_labels).min() >= 34


def test_digits_test_split_ignores_split_seed():
    first = load_dataset(dataset_cfg("digits", split_seed=0))
    again = load_dataset(dataset_cfg("digits", split_seed=0))
    other = load_dataset(dataset_cfg("digits", split_seed=7))

    assert torch.equal(first.test_images, again.test_images)
    assert torch.equal(first.test_images, other.test_images)
    assert torch.equal(first.test_labels, other.test_labels)
    assert not torch.equal(first.val_labels, other.val_labels)


def test_digits_stats_come_from_train_split():
    splits = load_dataset(dataset_cfg("digits"))
    pixels = splits.train_images.to(torch.float64) / 255

    assert splits.mean[0] == pytest.approx(pixels.mean().item())
    assert splits.std[0] == pytest.approx(pixels.std(correction=0).item())


def test_synthetic_shapes_and_determinism():
    splits = load_dataset(dataset_cfg("synthetic", shape=[3, 16, 16], num_classes=4))
    again = load_dataset(dataset_cfg("synthetic", shape=[3, 16, 16], num_classes=4))

    assert splits.train_images.shape == (461, 3, 16, 16)
    assert splits.val_images.shape == (51, 3, 16, 16)
    assert splits.test_images.shape == (128, 3, 16, 16)
    assert splits.train_images.dtype == torch.uint8
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (4, 3, 16)
    assert len(splits.mean) == 3
    assert set(splits.test_labels.tolist()) == {0, 1, 2, 3}
    assert torch.equal(splits.train_images, again.train_images)


def test_synthetic_classes_beat_chance():
    splits = load_dataset(dataset_cfg("synthetic"))
    train = splits.train_images.flatten(1).float()
    test = splits.test_images.flatten(1).float()
    class_means = torch.stack(
        [train[splits.train_labels == label].mean(0) for label in range(splits.num_classes)]
    )

    predictions = torch.cdist(test, class_means).argmin(1)
    accuracy = (predictions == splits.test_labels).float().mean().item()

    assert accuracy > 0.5


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_config_files_pass_validation(name):
    cfg = dataset_cfg(name)

    check_dataset_config(cfg)
    assert cfg.name == name
    assert cfg.root == "data/"
    assert cfg.download is True
    assert cfg.val_size == 0.1
    assert cfg.split_seed == 0
    assert cfg.augment is (name in ("cifar10", "cifar100"))


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("name", "imagenet", "dataset.name='imagenet'"),
        ("val_size", 0, "dataset.val_size=0"),
        ("val_size", -3, "dataset.val_size=-3"),
        ("val_size", 1.0, "dataset.val_size=1.0"),
        ("val_size", "0.1", "dataset.val_size='0.1'"),
        ("val_size", True, "dataset.val_size=True"),
        ("download", "yes", "dataset.download='yes'"),
        ("split_seed", 1.5, "dataset.split_seed=1.5"),
        ("shape", [1, 28, 14], r"dataset.shape=\[1, 28, 14\]"),
        ("num_classes", 1, "dataset.num_classes=1"),
        ("val_sise", 0.1, "dataset.val_sise is not a known key"),
    ],
)
def test_invalid_config_raises_config_error(key, value, pattern):
    cfg = OmegaConf.to_container(dataset_cfg("synthetic"))
    cfg[key] = value

    with pytest.raises(ConfigError, match=pattern):
        check_dataset_config(cfg)


def test_missing_config_key_raises():
    cfg = OmegaConf.to_container(dataset_cfg("mnist"))
    del cfg["split_seed"]

    with pytest.raises(ConfigError, match="dataset.split_seed is missing"):
        load_dataset(cfg)


def test_download_error_colon_is_dropped(tmp_path, monkeypatch):
    import torchvision.datasets

    def fail_download(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail_download)

    with pytest.raises(DataError) as info:
        load_dataset(dataset_cfg("mnist", root=str(tmp_path), download=True))

    assert "(RuntimeError: Error downloading train-images-idx3-ubyte.gz);" in str(info.value)

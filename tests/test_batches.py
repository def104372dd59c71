"""Tests for dml_cli.batches: batch order, normalisation, augmentation and the device copy."""

import pytest
import torch
import torch.nn.functional as F

from dml_cli.batches import TensorBatches, augment_batch, normalize_batch
from dml_cli.errors import ConfigError


def make_batches(count: int, **options) -> TensorBatches:
    images = torch.arange(count, dtype=torch.uint8).reshape(count, 1, 1, 1).expand(count, 1, 2, 2)
    options.setdefault("batch_size", 4)
    return TensorBatches(images, torch.arange(count), mean=(0.0,), std=(1.0,), **options)


def test_batches_count_partial_batch():
    assert len(make_batches(10)) == 3
    assert [len(labels) for _, labels in make_batches(10)] == [4, 4, 2]
    assert len(make_batches(10, drop_last=True)) == 2
    assert [len(labels) for _, labels in make_batches(10, drop_last=True)] == [4, 4]
    assert len(make_batches(8)) == 2


def test_batch_larger_than_split():
    batches = make_batches(5, batch_size=64, shuffle=True)
    output = list(batches)

    assert len(batches) == 1
    assert len(output) == 1
    assert sorted(output[0][1].tolist()) == list(range(5))


def test_each_sample_once_per_epoch():
    batches = make_batches(23, batch_size=5, shuffle=True, seed=3)
    for epoch in range(3):
        batches.set_epoch(epoch)
        labels = torch.cat([labels for _, labels in batches])
        images = torch.cat([images for images, _ in batches])

        assert sorted(labels.tolist()) == list(range(23))
        assert torch.equal(images[:, 0, 0, 0] * 255, labels.float())


def epoch_order(batches: TensorBatches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return torch.cat([labels for _, labels in batches]).tolist()


def test_shuffle_depends_on_seed_and_epoch():
    first = epoch_order(make_batches(40, shuffle=True, seed=5), epoch=2)
    same = epoch_order(make_batches(40, shuffle=True, seed=5), epoch=2)
    next_epoch = epoch_order(make_batches(40, shuffle=True, seed=5), epoch=3)
    other_seed = epoch_order(make_batches(40, shuffle=True, seed=6), epoch=2)

    assert first == same
    assert first != next_epoch
    assert first != other_seed
    assert first != list(range(40))
    assert epoch_order(make_batches(40), epoch=4) == list(range(40))


def test_normalize_batch_hand_values():
    images = torch.tensor([[[[0, 51]], [[255, 102]]]], dtype=torch.uint8)

    output = normalize_batch(images, mean=(0.1, 0.5), std=(0.5, 0.25))

    expected = torch.tensor([[[[-0.2, 0.2]], [[2.0, -0.4]]]])
    assert output.dtype == torch.float32
    assert torch.allclose(output, expected, atol=1e-6)
    assert torch.equal(images, torch.tensor([[[[0, 51]], [[255, 102]]]], dtype=torch.uint8))


def test_normalize_batch_float_input_unscaled():
    images = torch.full((1, 1, 2, 2), 0.6)

    output = normalize_batch(images, mean=(0.2,), std=(0.4,))

    assert torch.allclose(output, torch.ones(1, 1, 2, 2))
    assert torch.equal(images, torch.full((1, 1, 2, 2), 0.6))


def test_normalize_batch_channel_mismatch_raises():
    with pytest.raises(ValueError, match="3 channels"):
        normalize_batch(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), mean=(0.5,), std=(0.5, 0.5))


def crop_flip_candidates(image: torch.Tensor) -> list[torch.Tensor]:
    """All 9 x 9 crops of the 4-pixel zero-padded image, each also flipped: the reference."""
    height, width = image.shape[1:]
    padded = F.pad(image, (4, 4, 4, 4))
    candidates = []
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + height, left : left + width]
            candidates.extend([crop, crop.flip(-1)])
    return candidates


def test_augment_batch_crops_and_flips():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 6, 6), generator=generator, dtype=torch.uint8)

    output = augment_batch(images, torch.Generator().manual_seed(1))

    assert output.shape == images.shape
    assert output.dtype == torch.uint8
    matches = []
    for image, augmented in zip(images, output, strict=True):
        found = [torch.equal(augmented, c) for c in crop_flip_candidates(image)]
        assert any(found)
        matches.append(found.index(True))
    flipped = sum(index % 2 for index in matches)
    assert 10 < flipped < 54
    assert len(set(index // 2 for index in matches)) > 20


def test_augment_batch_repeats_with_seed():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)

    first = augment_batch(images, torch.Generator().manual_seed(4))
    again = augment_batch(images, torch.Generator().manual_seed(4))
    other = augment_batch(images, torch.Generator().manual_seed(5))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_augmented_batches_repeat_per_epoch():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20)
    options = dict(batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=2)
    batches = TensorBatches(images, labels, augment=True, **options)
    resumed = TensorBatches(images, labels, augment=True, **options)
    plain = TensorBatches(images, labels, augment=False, **options)
    for loader in (batches, resumed, plain):
        loader.set_epoch(1)

    for (images_a, labels_a), (images_b, labels_b) in zip(batches, resumed, strict=True):
        assert torch.equal(images_a, images_b)
        assert torch.equal(labels_a, labels_b)
    augmented_images, augmented_labels = next(iter(batches))
    plain_images, plain_labels = next(iter(plain))
    assert torch.equal(augmented_labels, plain_labels)
    assert not torch.equal(augmented_images, plain_images)


def test_channels_last_batches():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    batches = TensorBatches(
        images, torch.arange(6), batch_size=4, mean=(0.5,) * 3, std=(0.5,) * 3, channels_last=True
    )

    batch, _ = next(iter(batches))

    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batch, normalize_batch(images[:4], (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_invalid_batch_size_raises(batch_size):
    with pytest.raises(ConfigError, match="batch_size"):
        make_batches(4, batch_size=batch_size)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    options = dict(batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=True)
    cpu = TensorBatches(images, torch.arange(37), device="cpu", seed=1, **options)
    cuda = TensorBatches(images, torch.arange(37), device="cuda", seed=1, **options)

    for (cpu_images, cpu_labels), (cuda_images, cuda_labels) in zip(cpu, cuda, strict=True):
        assert cuda_images.device.type == "cuda"
        assert torch.equal(cpu_labels, cuda_labels.cpu())
        assert torch.allclose(cpu_images, cuda_images.cpu())

"""Batches built on the training device from splits held in memory as tensors.

``TensorBatches`` copies a split to the device once, then indexes, augments and normalises whole
batches there, so the training loop runs no per-sample Python code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dml_cli.errors import ConfigError

log = logging.getLogger(__name__)

CROP_PADDING = 4


def normalize_batch(images: Tensor, mean: Any, std: Any) -> Tensor:
    """Scale a batch to float32 and normalise each channel as (x - mean) / std, on its device.

    uint8 images are divided by 255 first; float images are taken to be in [0, 1] already.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    if mean.shape[1] != images.shape[1] or std.shape[1] != images.shape[1]:
        raise ValueError(
            f"mean and std need one value per channel: images have {images.shape[1]} channels, "
            f"mean has {mean.shape[1]} and std has {std.shape[1]} values"
        )
    if images.dtype == torch.uint8:
        scaled = images.to(torch.float32).div_(255.0)
    else:
        scaled = images.to(torch.float32)
    return (scaled - mean).div_(std)


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Randomly crop each image after zero padding of CROP_PADDING pixels, then randomly flip it.

    Returns a new tensor with the shape, dtype and device of ``images``. The offsets and flips
    are drawn from ``generator`` on its own device and then moved to the images, so a CPU
    generator gives the same result on any device.
    """
    count, channels, height, width = images.shape
    pad = CROP_PADDING
    padded = F.pad(images, (pad, pad, pad, pad))

    offsets = torch.randint(
        0, 2 * pad + 1, (2, count), generator=generator, device=generator.device
    )
    flips = torch.rand(count, generator=generator, device=generator.device) < 0.5
    rows = offsets[0, :, None] + torch.arange(height, device=generator.device)
    columns = torch.arange(width, device=generator.device).expand(count, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[1, :, None]
    rows = _copy_to_device(rows, images.device)
    columns = _copy_to_device(columns, images.device)

    # Two gathers pick each image's window: first its rows, then its (possibly reversed) columns.
    cropped = padded.gather(
        2, rows[:, None, :, None].expand(count, channels, height, padded.shape[3])
    )
    return cropped.gather(3, columns[:, None, None, :].expand(count, channels, height, width))


def _copy_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    # A copy from pageable host memory to CUDA waits for the GPU to finish its queued work, so
    # the copy goes through pinned memory without blocking: the batch then needs no host sync.
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Return a CPU generator whose state depends only on (seed, epoch)."""
    entropy = [seed % 2**64, epoch % 2**64]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TensorBatches:
    """Iterable over (images, labels) batches on `device`, float32 normalised images.

    The images and labels are copied to ``device`` once, here. Each epoch's order and
    augmentation come from a CPU generator seeded by (seed, epoch) alone, so the order and crops
    are the same on any device and a resumed run gets the batches of an uninterrupted one. Call
    ``set_epoch`` before each epoch; iterating twice without it repeats the same batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Any,
        std: Any,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: use a positive integer")

        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.num_samples = len(images)
        self.epoch = 0

        if drop_last and 0 < self.num_samples < batch_size:
            log.warning(
                "batch_size=%d is larger than the %d samples and drop_last is set, "
                "so each epoch yields no batches",
                batch_size,
                self.num_samples,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = _epoch_generator(self.seed, self.epoch)
        order = None
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).to(self.device)

        for batch in range(len(self)):
            start = batch * self.batch_size
            stop = start + self.batch_size
            if order is None:
                images = self.images[start:stop]
                labels = self.labels[start:stop]
            else:
                index = order[start:stop]
                images = self.images[index]
                labels = self.labels[index]

            if self.augment:
                images = augment_batch(images, generator)
            images = normalize_batch(images, self.mean, self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels

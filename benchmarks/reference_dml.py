"""A DML training loop written the way the common DML libraries write it, as a speed baseline.

The loop follows the structure of KD_Lib's `DML.train_students` (SforAiDl/KD_Lib,
KD_Lib/KD/vision/DML/dml.py), re-implemented here:

- Data comes from a torchvision-style Dataset that turns each uint8 image into a PIL image and
  runs per-sample transforms (optional random crop and flip, ToTensor, Normalize) inside a
  DataLoader with `num_workers=0`, as in the library's examples.
- For each student in turn, the loss calls the student and every peer afresh: one student call
  and one peer call per peer for the mimicry terms, one more student call for the cross-entropy.
  Peer logits are not detached, so each backward pass also runs through the peers' graphs.
  Then the student's optimizer steps.
- After the students step, each student runs once more on the batch to count correct
  predictions, read with `.item()`.

So a batch costs K * (2 * (K - 1) + 1) + K = 2 * K^2 forward passes and K backward passes. The
mimicry term is the DML one, KL(p_peer || p_student) averaged over peers, where KD_Lib's default
`loss_fn` is MSE on logits. Two details differ from the library on purpose. The running loss is
summed detached, where KD_Lib keeps every batch's graph alive through its epoch sum. And the
forward passes run under autocast, with a gradient scaler for fp16, so that `--precision`
applies to every variant of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class PILImageDataset(Dataset):
    """In-memory uint8 images served one at a time as PIL images through `transform`.

    `images` has shape (N, C, H, W). As in torchvision's MNIST and CIFAR10 datasets, each item
    becomes a PIL image (mode "L" for one channel, "RGB" for three) before the transform.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform) -> None:
        pixels = images.permute(0, 2, 3, 1).numpy()
        self.pixels = pixels[..., 0] if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels)
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.pixels[index])
        return self.transform(image), self.labels[index]


def make_transform(mean: Sequence[float], std: Sequence[float], augment: bool, image_size: int):
    """Return the per-sample transform of the common CIFAR and MNIST recipes."""
    steps = []
    if augment:
        steps += [transforms.RandomCrop(image_size, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def make_reference_loader(
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    seed: int = 0,
) -> DataLoader:
    """Build the shuffled DataLoader of per-sample PIL transforms that the reference loop reads."""
    transform = make_transform(mean, std, augment, images.shape[-1])
    dataset = PILImageDataset(images, labels, transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


class ReferenceDML:
    """Train a cohort with the per-student recomputing loop described in the module docstring."""

    def __init__(
        self,
        students: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        device: torch.device | str = "cpu",
        precision: str = "32",
        temperature: float = 1.0,
    ) -> None:
        self.device = torch.device(device)
        self.students = [student.to(self.device) for student in students]
        self.optimizers = list(optimizers)
        self.dtype = AUTOCAST_DTYPES[str(precision)]
        self.temperature = float(temperature)
        self.grad_scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.dtype == torch.float16
        )
        self.forward_passes = 0

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _logits(self, index: int, images: Tensor) -> Tensor:
        self.forward_passes += 1
        with self._autocast():
            return self.students[index](images).float()

    def _student_loss(self, index: int, images: Tensor, labels: Tensor) -> Tensor:
        temperature = self.temperature
        cohort_size = len(self.students)
        kl_loss = torch.zeros((), device=self.device)
        for peer in range(cohort_size):
            if peer == index:
                continue
            log_probs = F.log_softmax(self._logits(index, images) / temperature, dim=-1)
            peer_probs = F.softmax(self._logits(peer, images) / temperature, dim=-1)
            kl = F.kl_div(log_probs, peer_probs, reduction="batchmean")
            kl_loss = kl_loss + kl * temperature**2
        if cohort_size > 1:
            kl_loss = kl_loss / (cohort_size - 1)
        return kl_loss + F.cross_entropy(self._logits(index, images), labels)

    def train_epoch(self, loader) -> dict[str, float]:
        """Train one pass over `loader`; return the mean batch loss and best student accuracy."""
        for student in self.students:
            student.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = 0
        num_samples = 0
        num_batches = 0
        for images, labels in loader:
            images = images.to(self.device)
            labels = labels.to(self.device)
            for optimizer in self.optimizers:
                optimizer.zero_grad()

            batch_loss = torch.zeros((), device=self.device)
            for index, optimizer in enumerate(self.optimizers):
                loss = self._student_loss(index, images, labels)
                self.grad_scaler.scale(loss).backward()
                self.grad_scaler.step(optimizer)
                self.grad_scaler.update()
                batch_loss = batch_loss + loss.detach()
            loss_sum += batch_loss / len(self.students)

            student_correct = []
            for index in range(len(self.students)):
                predictions = self._logits(index, images).argmax(dim=1)
                student_correct.append(predictions.eq(labels).sum().item())
            correct += max(student_correct)
            num_samples += len(labels)
            num_batches += 1
        mean_loss = loss_sum.item() / max(num_batches, 1)
        return {"loss": mean_loss, "acc": correct / max(num_samples, 1)}

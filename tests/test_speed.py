"""Tests for the engine's speed paths: in-memory batching, precision, compile, channels-last."""

import copy
import importlib.util
import math
import platform
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dml_cli import engine
from dml_cli.batches import TensorBatches
from dml_cli.engine import DMLTrainer, keep_freed_memory_for_reuse
from dml_cli.models import build_student

MEAN = (0.4,)
STD = (0.3,)
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def make_images(count=48, seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return images, labels


def make_lenets(cohort_size=3, size=8):
    students = []
    for index in range(cohort_size):
        torch.manual_seed(index)
        students.append(build_student("lenet5", in_channels=1, image_size=size, num_classes=10))
    return students


def make_trainer(students, **kwargs):
    optimizers = [
        torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        for student in students
    ]
    return DMLTrainer(students, optimizers, **kwargs)


class NormalizingDataset(Dataset):
    """Per-sample counterpart of TensorBatches: one uint8 image scaled and normalised per item."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(MEAN).reshape(-1, 1, 1)
        self.std = torch.tensor(STD).reshape(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        scaled = self.images[index].to(torch.float32).div_(255.0)
        return (scaled - self.mean).div_(self.std), self.labels[index]


class FixedOrderSampler(Sampler):
    def __init__(self, order):
        self.order = order

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def tensor_batches_order(num_samples, batch_size, seed, epoch):
    """Read the sample order of a shuffled TensorBatches epoch from labels that are indices."""
    probe = TensorBatches(
        torch.zeros(num_samples, 1, 1, 1, dtype=torch.uint8),
        torch.arange(num_samples),
        batch_size=batch_size,
        mean=MEAN,
        std=STD,
        shuffle=True,
        seed=seed,
    )
    probe.set_epoch(epoch)
    return torch.cat([labels for _, labels in probe]).tolist()


def flatten_means(means):
    return {f"{name}/{key}": value for name, row in means.items() for key, value in row.items()}


def train_one_epoch(trainer, loader):
    means = flatten_means(trainer.train_epoch(loader))
    weights = [copy.deepcopy(student.state_dict()) for student in trainer.students]
    return means, weights


def test_in_memory_batches_match_dataloader():
    images, labels = make_images(count=48)
    students = make_lenets(3)
    initial = [copy.deepcopy(student.state_dict()) for student in students]
    batches = TensorBatches(
        images, labels, batch_size=16, mean=MEAN, std=STD, shuffle=True, seed=7
    )
    batches.set_epoch(2)
    order = tensor_batches_order(48, 16, seed=7, epoch=2)
    dataloader = DataLoader(
        NormalizingDataset(images, labels), batch_size=16, sampler=FixedOrderSampler(order)
    )

    in_memory = make_trainer(copy.deepcopy(students))
    loaded = make_trainer(copy.deepcopy(students))
    in_memory_means, in_memory_weights = train_one_epoch(in_memory, batches)
    loaded_means, loaded_weights = train_one_epoch(loaded, dataloader)

    assert order != sorted(order)
    assert in_memory_means == pytest.approx(loaded_means, rel=1e-5)
    for trained, expected, start in zip(in_memory_weights, loaded_weights, initial, strict=True):
        assert not torch.equal(trained["classifier.5.weight"], start["classifier.5.weight"])
        for key in expected:
            torch.testing.assert_close(trained[key], expected[key], rtol=1e-5, atol=1e-6)


def test_dataloader_other_order_differs():
    # Guards the test above: with another sample order the weights must come out different.
    images, labels = make_images(count=48)
    students = make_lenets(2)
    batches = TensorBatches(images, labels, batch_size=16, mean=MEAN, std=STD, shuffle=True)
    batches.set_epoch(2)
    dataloader = DataLoader(NormalizingDataset(images, labels), batch_size=16)

    _, in_memory_weights = train_one_epoch(make_trainer(copy.deepcopy(students)), batches)
    _, loaded_weights = train_one_epoch(make_trainer(copy.deepcopy(students)), dataloader)

    key = "classifier.5.weight"
    assert not torch.allclose(in_memory_weights[0][key], loaded_weights[0][key], atol=1e-4)


@pytest.mark.parametrize(
    ("precision", "dtype", "scaler"),
    [("bf16", torch.bfloat16, False), ("16", torch.float16, True)],
)
def test_reduced_precision_trains_on_cpu(precision, dtype, scaler):
    images, labels = make_images(count=32)
    students = make_lenets(2)
    initial = copy.deepcopy(students[0].state_dict())
    conv_dtypes = []
    students[0].features[0].register_forward_hook(
        lambda module, inputs, output: conv_dtypes.append(output.dtype)
    )
    trainer = make_trainer(students, precision=precision)
    batches = TensorBatches(images, labels, batch_size=16, mean=MEAN, std=STD)

    means = trainer.train_epoch(batches)

    assert conv_dtypes == [dtype, dtype]
    assert trainer.grad_scaler.is_enabled() is scaler
    for name in trainer.names:
        assert math.isfinite(means[name]["train_loss"])
        assert math.isfinite(means[name]["train_kl_loss"])
        assert means[name]["train_kl_loss"] > 0
    trained = trainer.students[0].state_dict()
    assert not torch.equal(trained["features.0.weight"], initial["features.0.weight"])
    assert all(torch.isfinite(value).all() for value in trained.values())


def test_fp16_scaler_scales_loss():
    images, labels = make_images(count=16)
    trainer = make_trainer(make_lenets(2), precision="16")
    batches = TensorBatches(images, labels, batch_size=16, mean=MEAN, std=STD)

    trainer.train_epoch(batches)

    # A disabled scaler reports a scale of 1. With no overflow in one step, an enabled one keeps
    # its initial 2**16.
    assert trainer.grad_scaler.get_scale() == 2.0**16
    assert trainer.state_dict()["grad_scaler"]["scale"] == 2.0**16


@pytest.mark.slow
def test_compiled_lenet_trains_like_eager():
    images, labels = make_images(count=32)
    students = make_lenets(2)
    eager = make_trainer(copy.deepcopy(students))
    compiled_students = copy.deepcopy(students)
    for student in compiled_students:
        student.compile()
    compiled = make_trainer(compiled_students)
    batches = TensorBatches(images, labels, batch_size=16, mean=MEAN, std=STD)

    compiled_means = flatten_means(compiled.train_epoch(batches))
    eager_means = flatten_means(eager.train_epoch(batches))

    assert compiled_means == pytest.approx(eager_means, rel=1e-4)
    for compiled_student, eager_student in zip(compiled.students, eager.students, strict=True):
        compiled_state = compiled_student.state_dict()
        for key, value in eager_student.state_dict().items():
            torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5)


def test_channels_last_logits_match_contiguous():
    images, labels = make_images(count=40, size=28)
    students = make_lenets(2, size=28)
    contiguous = make_trainer(copy.deepcopy(students))
    channels_last = make_trainer(copy.deepcopy(students), channels_last=True)
    batches = TensorBatches(images, labels, batch_size=16, mean=MEAN, std=STD)

    contiguous_logits, _ = contiguous.predict(batches)
    channels_last_logits, _ = channels_last.predict(batches)
    contiguous.train_epoch(batches)
    channels_last.train_epoch(batches)

    conv_weight = channels_last.students[0].features[0].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last_logits, contiguous_logits, rtol=1e-4, atol=1e-5)
    for trained, expected in zip(channels_last.students, contiguous.students, strict=True):
        expected_state = expected.state_dict()
        for key, value in trained.state_dict().items():
            torch.testing.assert_close(value, expected_state[key], rtol=1e-4, atol=1e-5)


def is_glibc():
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not is_glibc(), reason="mallopt is glibc's")
def test_cpu_trainer_sets_malloc_thresholds(monkeypatch):
    monkeypatch.setattr(engine, "_malloc_tuned", False)

    make_trainer(make_lenets(1))

    assert engine._malloc_tuned is True
    assert keep_freed_memory_for_reuse() is True


def load_reference_module():
    spec = importlib.util.spec_from_file_location(
        "reference_dml", BENCHMARKS_DIR / "reference_dml.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cohort_size", [2, 3])
def test_reference_loop_runs_2k_squared_forwards(cohort_size):
    reference_dml = load_reference_module()
    images, labels = make_images(count=24)
    students = make_lenets(cohort_size)
    optimizers = [torch.optim.SGD(student.parameters(), lr=0.01) for student in students]
    loader = reference_dml.make_reference_loader(
        images, labels, batch_size=8, mean=MEAN, std=STD, augment=False
    )
    reference = reference_dml.ReferenceDML(students, optimizers)

    metrics = reference.train_epoch(loader)

    assert reference.forward_passes == 3 * 2 * cohort_size**2
    assert math.isfinite(metrics["loss"])
    assert 0.0 <= metrics["acc"] <= 1.0


def test_reference_transform_matches_normalize_batch():
    reference_dml = load_reference_module()
    images, _ = make_images(count=8)
    labels = torch.arange(8)
    loader = reference_dml.make_reference_loader(
        images, labels, batch_size=8, mean=MEAN, std=STD, augment=False
    )
    batches = TensorBatches(images, labels, batch_size=8, mean=MEAN, std=STD)

    reference_images, reference_labels = next(iter(loader))
    expected = {int(label): image for image, label in zip(*next(iter(batches)), strict=True)}

    assert reference_images.shape == (8, 1, 8, 8)
    for image, label in zip(reference_images, reference_labels, strict=True):
        torch.testing.assert_close(image, expected[int(label)], rtol=1e-5, atol=1e-5)


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput", BENCHMARKS_DIR / "bench_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_summary_and_target_verdicts():
    bench = load_benchmark_module()
    cases = [case for case in bench.CASES if case.name == "lenet3_b32"]
    speeds = {"dml": [4000, 4400, 4200], "reference": [600, 590, 610], "independent": [4300] * 3}
    results = [
        {
            "case": "lenet3_b32",
            "variant": variant,
            "images_per_s": speed,
            "peak_mib": 40.0 + repeat,
            "minor_faults_per_step": 1.0,
        }
        for variant, values in speeds.items()
        for repeat, speed in enumerate(values)
    ]
    results += [{"case": "lenet3_b32", "variant": "paired", "time_ratio": r} for r in (1.2, 1.0)]

    summary = bench.summarise(results, cases)
    lines = bench.check_targets(summary)

    assert summary["lenet3_b32"]["dml"]["images_per_s"] == 4200
    assert summary["lenet3_b32"]["dml"]["peak_mib"] == 42.0
    assert summary["lenet3_b32"]["paired"] == {"time_ratio": 1.1, "min": 1.0, "max": 1.2}
    assert lines[0] == "met: dml is 7.00x the reference at batch 32 (target >= 7x)"
    assert "independent students are 7.17x the reference" in lines[1]


def test_step_variants_prints_each_variant(capsys):
    spec = importlib.util.spec_from_file_location(
        "step_variants", BENCHMARKS_DIR / "step_variants.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    threads = torch.get_num_threads()
    try:
        module.main(["--batch-size", "4", "--steps", "2", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 LeNet-5, batch 4, 1 threads, 2 steps x 1 repeats")
    assert [line.split()[0] for line in lines[1:]] == ["loop", "vmap", "threads"]
    assert lines[1].endswith("1.00x the loop's time")

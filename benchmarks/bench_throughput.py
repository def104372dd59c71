"""Measure the training throughput of dml-train's engine against a library-style DML loop.

For each case (a cohort, a batch size and a dataset shape) three variants train the same cohort
from the same initial weights on the same data:

- dml: `DMLTrainer` with mimicry on, fed by `TensorBatches` (uint8 data held on the device);
- reference: `ReferenceDML`, which recomputes every peer's forward pass inside each student's
  loss and reads per-sample PIL transforms through a DataLoader (see reference_dml.py);
- independent: `DMLTrainer` with mimicry_weight=0, the `loss=independent` baseline, which is the
  cost of training the students alone and so the floor that DML cannot beat.

A fourth, paired run builds the dml and independent trainers in one process and alternates
their chunks, so the cost of mimicry shows without the noise between processes.

Every measurement runs in a fresh subprocess, so peak memory of one variant never mixes with
another's: on CPU the peak resident-set growth over the process's size before the data was
built, on CUDA `torch.cuda.max_memory_allocated`. The variants of one repeat run back to back
in a rotating order. Each run times its steps in NUM_CHUNKS chunks and takes the median chunk's
images per second; the table reports the median of that over the repeats.

    python benchmarks/bench_throughput.py               # all cases, 5 repeats
    python benchmarks/bench_throughput.py --quick       # a smoke run, about 85 s on 2 CPU cores
    python benchmarks/bench_throughput.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

VARIANTS = ("dml", "reference", "independent")
RESULT_PREFIX = "RESULT "
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# Optimizer of conf/optimizer/sgd.yaml, the default of dml-train.
SGD_SETTINGS = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4}
# trainer.log_every_steps of conf/trainer/default.yaml: the engine reads its sums this often.
LOG_EVERY_STEPS = 20
# Factor by which --quick shrinks each case's data and timed steps.
QUICK_SHRINK = 8
# A timed run is split into this many chunks, and its throughput is the median chunk's, so a few
# seconds in which another process takes the cores do not decide the result.
NUM_CHUNKS = 8


@dataclass(frozen=True)
class Case:
    """One benchmark setting: a cohort, the shape of its data and how long to time it."""

    name: str
    description: str
    archs: tuple[str, ...]
    shape: tuple[int, int, int]
    batch_size: int
    num_images: int
    # Timed steps; None times one epoch over num_images without the last partial batch.
    steps: int | None = None
    augment: bool = False
    mean: tuple[float, ...] = MNIST_STATS[0]
    std: tuple[float, ...] = MNIST_STATS[1]
    num_classes: int = 10
    warmup_steps: int = 10
    variants: tuple[str, ...] = VARIANTS

    @property
    def timed_steps(self) -> int:
        epoch_steps = self.num_images // self.batch_size
        return epoch_steps if self.steps is None else min(self.steps, epoch_steps)

    def shrunk(self, factor: int) -> Case:
        """Return the case with `factor` times fewer images and timed steps, for --quick."""
        num_images = max(self.num_images // factor, 4 * self.batch_size)
        steps = None if self.steps is None else max(self.steps // factor, 4)
        return dataclasses.replace(self, num_images=num_images, steps=steps, warmup_steps=2)


CASES = (
    Case(
        name="lenet3_b32",
        description="3 LeNet-5, 1x28x28, batch 32, one epoch of 8,192 images",
        archs=("lenet5",) * 3,
        shape=(1, 28, 28),
        batch_size=32,
        num_images=8192,
    ),
    Case(
        name="lenet3_b128",
        description="3 LeNet-5, 1x28x28, batch 128, one epoch of 8,192 images",
        archs=("lenet5",) * 3,
        shape=(1, 28, 28),
        batch_size=128,
        num_images=8192,
    ),
    Case(
        name="lenet3_b64_60k",
        description="3 LeNet-5, 1x28x28, batch 64 (the default run), 60,000 images, 200 steps",
        archs=("lenet5",) * 3,
        shape=(1, 28, 28),
        batch_size=64,
        num_images=60000,
        steps=200,
    ),
    Case(
        name="resnet32x2_b128",
        description="2 ResNet-32, 3x32x32 with crop and flip, batch 128, 2,048 images",
        archs=("resnet32",) * 2,
        shape=(3, 32, 32),
        batch_size=128,
        num_images=2048,
        augment=True,
        mean=CIFAR10_STATS[0],
        std=CIFAR10_STATS[1],
        warmup_steps=2,
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run: 1 repeat, less data"
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="training device (default cpu)"
    )
    parser.add_argument(
        "--precision", default="32", choices=("32", "bf16", "16"), help="trainer.precision"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 5, quick 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads for every variant (default: the usable CPU cores)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[case.name for case in CASES],
        choices=[case.name for case in CASES],
        help="cases to run (default all)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the engine's students (not (b))"
    )
    parser.add_argument(
        "--no-fused-optimizer",
        dest="fused_optimizer",
        action="store_false",
        help="build the engine's SGD optimizers without fused=True, as dml-train does with "
        "optimizer.fused=null ((b) never uses it)",
    )
    parser.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the engine's students in the default memory format, as dml-train does with "
        "trainer.channels_last=false; otherwise they run channels-last when all are "
        "convolutional ((b) never does)",
    )
    parser.add_argument(
        "--mnist-root",
        default=None,
        help="read MNIST-shaped cases' images from this torchvision MNIST root, e.g. "
        "/work/shared/data/mini-mnist, instead of random uint8 images",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc thresholds in the engine's runs, which the engine "
        "otherwise fixes on the CPU (see keep_freed_memory_for_reuse)",
    )
    parser.add_argument(
        "--no-paired",
        action="store_true",
        help="skip the run that alternates dml and independent chunks in one process",
    )
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid: use an integer >= 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads} is invalid: use an integer >= 1")
    if args.device == "cuda" and args.worker is None:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device=cuda was requested but CUDA is not available: use --device=cpu")
    return args


# ---------------------------------------------------------------------------------------------
# Worker: one variant of one case, in its own process.


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM, the peak resident set, on Linux 4.0 and later.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    if peak is None:
        # ru_maxrss is in KiB on Linux and cannot be reset, so it may include import peaks.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak


def load_images(case: Case, mnist_root: str | None):
    """Return (images, labels): uint8 (N, C, H, W) images and int64 labels for the case."""
    import torch

    if mnist_root is not None and case.shape == (1, 28, 28):
        from dml_cli.data import load_dataset

        data = load_dataset(
            {
                "name": "mnist",
                "root": mnist_root,
                "download": False,
                "val_size": 0.1,
                "split_seed": 0,
                "augment": False,
            }
        )
        images = torch.cat([data.train_images, data.val_images, data.test_images])
        labels = torch.cat([data.train_labels, data.val_labels, data.test_labels])
        repeats = -(-case.num_images // len(labels))
        return images.repeat(repeats, 1, 1, 1)[: case.num_images], labels.repeat(repeats)[
            : case.num_images
        ]

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (case.num_images, *case.shape), generator=generator, dtype=torch.uint8
    )
    labels = torch.randint(0, case.num_classes, (case.num_images,), generator=generator)
    return images, labels


def build_cohort(case: Case, fused_optimizer: bool):
    """Build the case's students, student k from seed k, and one SGD optimizer each."""
    import torch

    from dml_cli.models import build_student

    settings = {**SGD_SETTINGS, "fused": True} if fused_optimizer else SGD_SETTINGS
    students, optimizers = [], []
    for index, arch in enumerate(case.archs):
        torch.manual_seed(index)
        student = build_student(
            arch,
            in_channels=case.shape[0],
            image_size=case.shape[1],
            num_classes=case.num_classes,
        )
        students.append(student)
        optimizers.append(torch.optim.SGD(student.parameters(), **settings))
    return students, optimizers


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_engine(case: Case, variant: str, spec: dict, images, labels):
    """Build a warmed-up trainer for `variant` and its loader, set to the timed epoch."""
    import torch

    from dml_cli.batches import TensorBatches
    from dml_cli.engine import DMLTrainer
    from dml_cli.models import use_channels_last

    device = torch.device(spec["device"])
    students, optimizers = build_cohort(case, spec["fused_optimizer"])
    channels_last = use_channels_last(spec["channels_last"], students)
    if spec["compile"]:
        for student in students:
            student.compile()
    trainer = DMLTrainer(
        students,
        optimizers,
        mimicry_weight=1.0 if variant == "dml" else 0.0,
        device=device,
        precision=spec["precision"],
        channels_last=channels_last,
        log_every_steps=LOG_EVERY_STEPS,
    )
    loader = TensorBatches(
        images,
        labels,
        batch_size=case.batch_size,
        mean=case.mean,
        std=case.std,
        device=device,
        shuffle=True,
        augment=case.augment,
        seed=0,
        drop_last=True,
        channels_last=channels_last,
    )
    loader.set_epoch(0)
    trainer.train_epoch(islice(loader, case.warmup_steps))
    loader.set_epoch(1)
    return trainer, loader, device


def _time_engine(case: Case, variant: str, spec: dict, images, labels):
    trainer, loader, device = _build_engine(case, variant, spec, images, labels)
    faults_before = _minor_faults()
    chunks = _time_chunks(trainer.train_epoch, iter(loader), case.timed_steps, device)
    return *chunks, _minor_faults() - faults_before


def _time_paired(case: Case, spec: dict, images, labels) -> list[float]:
    """Alternate dml and independent chunks in one process; return each pair's time ratio.

    Both trainers share the process, so differences between processes (memory placement,
    another process's load) cancel out of the ratio of dml's time to the independent time.
    """
    runs = {}
    for variant in ("dml", "independent"):
        trainer, loader, device = _build_engine(case, variant, spec, images, labels)
        runs[variant] = (trainer.train_epoch, iter(loader))
    num_chunks = min(NUM_CHUNKS, case.timed_steps)
    chunk_size = case.timed_steps // num_chunks
    ratios = []
    for chunk in range(num_chunks):
        order = ("dml", "independent") if chunk % 2 == 0 else ("independent", "dml")
        times = {}
        for variant in order:
            train_epoch, batches = runs[variant]
            _, chunk_times = _time_chunks(train_epoch, batches, chunk_size, device, num_chunks=1)
            times[variant] = chunk_times[0]
        ratios.append(times["dml"] / times["independent"])
    return ratios


def _time_reference(case: Case, spec: dict, images, labels):
    import torch
    from reference_dml import ReferenceDML, make_reference_loader

    device = torch.device(spec["device"])
    students, optimizers = build_cohort(case, fused_optimizer=False)
    reference = ReferenceDML(students, optimizers, device=device, precision=spec["precision"])
    loader = make_reference_loader(
        images,
        labels,
        batch_size=case.batch_size,
        mean=case.mean,
        std=case.std,
        augment=case.augment,
    )
    reference.train_epoch(islice(loader, case.warmup_steps))
    faults_before = _minor_faults()
    chunks = _time_chunks(reference.train_epoch, iter(loader), case.timed_steps, device)
    return *chunks, _minor_faults() - faults_before


def _time_chunks(
    train_epoch, batches, steps: int, device, num_chunks: int = NUM_CHUNKS
) -> tuple[list[int], list[float]]:
    """Train on `steps` batches in up to `num_chunks` chunks; return their steps and times."""
    num_chunks = min(num_chunks, steps)
    chunk_steps = [steps // num_chunks + (i < steps % num_chunks) for i in range(num_chunks)]
    chunk_times = []
    _synchronize(device)
    for size in chunk_steps:
        started = time.perf_counter()
        train_epoch(islice(batches, size))
        _synchronize(device)
        chunk_times.append(time.perf_counter() - started)
    return chunk_steps, chunk_times


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_worker(spec: dict) -> dict:
    """Time one variant of one case in this process; return images/s and peak memory."""
    # Import everything a variant uses before the baseline, so imports do not count as growth.
    import reference_dml  # noqa: F401
    import torch

    import dml_cli.batches  # noqa: F401
    import dml_cli.data  # noqa: F401
    import dml_cli.engine

    torch.set_num_threads(spec["threads"])
    if spec["default_malloc"]:
        dml_cli.engine.keep_freed_memory_for_reuse = lambda: False
    fields = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in spec["case"].items()
    }
    case = Case(**fields)
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_reset = _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS") or 0

    images, labels = load_images(case, spec["mnist_root"])
    if spec["variant"] == "paired":
        ratios = _time_paired(case, spec, images, labels)
        return {"case": case.name, "variant": "paired", "time_ratio": statistics.median(ratios)}
    if spec["variant"] == "reference":
        chunk_steps, chunk_times, faults = _time_reference(case, spec, images, labels)
    else:
        chunk_steps, chunk_times, faults = _time_engine(
            case, spec["variant"], spec, images, labels
        )
    chunk_speeds = [
        steps * case.batch_size / time_s
        for steps, time_s in zip(chunk_steps, chunk_times, strict=True)
    ]

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = (_peak_rss_kib() - baseline_kib) / 1024
    return {
        "case": case.name,
        "variant": spec["variant"],
        "time_s": sum(chunk_times),
        "images_per_s": statistics.median(chunk_speeds),
        "mean_images_per_s": case.timed_steps * case.batch_size / sum(chunk_times),
        "peak_mib": peak_mib,
        "peak_reset": peak_reset,
        "minor_faults_per_step": faults / case.timed_steps,
    }


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, then print the table and the targets.


def run_measurement(case: Case, variant: str, args: argparse.Namespace) -> dict:
    spec = {
        "case": dataclasses.asdict(case),
        "variant": variant,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "compile": args.compile and variant != "reference",
        "channels_last": args.channels_last,
        "fused_optimizer": args.fused_optimizer and variant != "reference",
        "default_malloc": args.default_malloc,
        "mnist_root": args.mnist_root,
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"The {variant} variant of case {case.name} failed, see the error above.")
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise SystemExit(f"The {variant} variant of case {case.name} printed no result.")


def machine_description(args: argparse.Namespace) -> dict:
    import torch

    cpu_model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    description = {
        "cpu": cpu_model,
        "usable_cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "fused_optimizer": args.fused_optimizer,
        "default_malloc": args.default_malloc,
        "repeats": args.repeats,
        "quick": args.quick,
        "data": args.mnist_root or "random uint8 images",
    }
    if args.device == "cuda":
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def summarise(results: list[dict], cases: list[Case]) -> dict:
    """Return {case: {variant: {"images_per_s", "min", "max", "peak_mib", "faults_per_step"}}}.

    Speeds and faults are medians over the repeats and the peak is their maximum. A case with
    paired runs also gets {"paired": {"time_ratio", "min", "max"}}.
    """
    summary = {}
    for case in cases:
        summary[case.name] = {}
        for variant in case.variants:
            rows = [r for r in results if r["case"] == case.name and r["variant"] == variant]
            speeds = [row["images_per_s"] for row in rows]
            summary[case.name][variant] = {
                "images_per_s": statistics.median(speeds),
                "min": min(speeds),
                "max": max(speeds),
                "peak_mib": max(row["peak_mib"] for row in rows),
                "faults_per_step": statistics.median(row["minor_faults_per_step"] for row in rows),
            }
        paired = [r["time_ratio"] for r in results if r["case"] == case.name and "time_ratio" in r]
        if paired:
            summary[case.name]["paired"] = {
                "time_ratio": statistics.median(paired),
                "min": min(paired),
                "max": max(paired),
            }
    return summary


def format_table(summary: dict, cases: list[Case], device: str) -> str:
    memory = "peak MiB (CUDA allocated)" if device == "cuda" else "peak MiB (RSS growth)"
    lines = [
        f"| case | variant | images/s (median) | min - max | {memory} | page faults/step |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        for variant in case.variants:
            row = summary[case.name][variant]
            lines.append(
                f"| {case.name} | {variant} | {row['images_per_s']:,.0f} | "
                f"{row['min']:,.0f} - {row['max']:,.0f} | {row['peak_mib']:,.1f} | "
                f"{row['faults_per_step']:,.0f} |"
            )
    lines += [
        "",
        "| case | a/b speed (dml / reference) | a/c speed (dml / independent) | "
        "dml / independent time, paired (min - max) | a/c peak memory | a/b peak memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        rows = summary[case.name]
        paired = "n/a"
        if "paired" in rows:
            ratio = rows["paired"]
            paired = f"{ratio['time_ratio']:.3f} ({ratio['min']:.3f} - {ratio['max']:.3f})"
        lines.append(
            f"| {case.name} | {_ratio(rows, 'dml', 'reference', 'images_per_s')} | "
            f"{_ratio(rows, 'dml', 'independent', 'images_per_s')} | {paired} | "
            f"{_ratio(rows, 'dml', 'independent', 'peak_mib')} | "
            f"{_ratio(rows, 'dml', 'reference', 'peak_mib')} |"
        )
    return "\n".join(lines)


def _ratio(rows: dict, numerator: str, denominator: str, key: str) -> str:
    if numerator not in rows or denominator not in rows or rows[denominator][key] <= 0:
        return "n/a"
    return f"{rows[numerator][key] / rows[denominator][key]:.2f}"


def check_targets(summary: dict) -> list[str]:
    """Return one line per CPU target: met or missed, with the measured value."""
    lines = []
    lenet_b32 = summary.get("lenet3_b32")
    if lenet_b32 and "reference" in lenet_b32:
        speedup = lenet_b32["dml"]["images_per_s"] / lenet_b32["reference"]["images_per_s"]
        verdict = "met" if speedup >= 7.0 else "missed"
        lines.append(f"{verdict}: dml is {speedup:.2f}x the reference at batch 32 (target >= 7x)")
        if "independent" in lenet_b32:
            floor = (
                lenet_b32["independent"]["images_per_s"] / lenet_b32["reference"]["images_per_s"]
            )
            lines.append(
                f"  for comparison, the independent students are {floor:.2f}x the reference: "
                "DML does their work and more, so it cannot pass this by much"
            )
    lenet_b128 = summary.get("lenet3_b128")
    if lenet_b128 and "independent" in lenet_b128:
        # Time per image is the inverse of throughput.
        slowdown = lenet_b128["independent"]["images_per_s"] / lenet_b128["dml"]["images_per_s"]
        verdict = "met" if slowdown <= 1.10 else "missed"
        lines.append(
            f"{verdict}: dml takes {slowdown:.3f}x the independent students' time at batch 128 "
            "(target <= 1.10x)"
        )
    if lenet_b128 and "paired" in lenet_b128:
        slowdown = lenet_b128["paired"]["time_ratio"]
        verdict = "met" if slowdown <= 1.10 else "missed"
        lines.append(
            f"{verdict}: paired in one process, dml takes {slowdown:.3f}x the independent "
            "students' time at batch 128 (target <= 1.10x)"
        )
    default_run = summary.get("lenet3_b64_60k")
    if default_run and "independent" in default_run:
        memory = default_run["dml"]["peak_mib"] / default_run["independent"]["peak_mib"]
        verdict = "met" if memory <= 1.5 else "missed"
        lines.append(
            f"{verdict}: dml's peak memory is {memory:.2f}x the independent students' in the "
            "default MNIST setting (target <= 1.5x)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        result = run_worker(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    cases = [case for case in CASES if case.name in args.cases]
    if args.quick:
        cases = [case.shrunk(QUICK_SHRINK) for case in cases]
    machine = machine_description(args)
    print("Machine: " + ", ".join(f"{key}={value}" for key, value in machine.items()))
    load_1min = os.getloadavg()[0]
    print(f"Load average at start: {load_1min:.2f}")
    if load_1min > 0.5:
        print(
            f"WARNING: the 1-minute load average is {load_1min:.2f} before the benchmark starts. "
            "Other processes compete for the cores, so throughput will read low and noisy."
        )

    results = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for case in cases:
            offset = repeat % len(case.variants)
            order = case.variants[offset:] + case.variants[:offset]
            for variant in order:
                result = run_measurement(case, variant, args)
                result["repeat"] = repeat
                results.append(result)
                print(
                    f"  repeat {repeat + 1}/{args.repeats} {case.name:<16} {variant:<11} "
                    f"{result['images_per_s']:>9,.0f} images/s  {result['peak_mib']:>7,.1f} MiB  "
                    f"{result['minor_faults_per_step']:>7,.1f} page faults/step",
                    flush=True,
                )
            if not args.no_paired:
                result = run_measurement(case, "paired", args)
                result["repeat"] = repeat
                results.append(result)
                print(
                    f"  repeat {repeat + 1}/{args.repeats} {case.name:<16} {'paired':<11} "
                    f"dml takes {result['time_ratio']:.3f}x the independent time",
                    flush=True,
                )

    summary = summarise(results, cases)
    print()
    for case in cases:
        print(f"{case.name}: {case.description}")
    print()
    print(format_table(summary, cases, args.device))
    print()
    if args.device == "cpu" and not args.quick:
        for line in check_targets(summary):
            print(line)
    load_1min = os.getloadavg()[0]
    print(f"Load average at end: {load_1min:.2f}; took {time.perf_counter() - started:.0f}s")

    if args.json:
        payload = {"machine": machine, "results": results, "summary": summary}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

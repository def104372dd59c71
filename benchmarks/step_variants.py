"""Time other ways to run a cohort's training step, side by side in one process.

benchmarks/README.md explains why DML at batch 32 stays under 7x the reference loop: the
students' own kernels dominate a step. This script measures the alternatives it reports, for
three LeNet-5 students on random 1x28x28 images, each timed over the same number of steps:

- loop: each student's forward pass, one backward pass for the cohort, one fused SGD
  optimizer over all parameters (the engine's step without mimicry or metrics);
- vmap: the students stacked with torch.func.stack_module_state and run as one vmapped
  functional call, so each layer runs once for the cohort as a grouped convolution;
- threads: each student's forward, backward and optimizer step on its own Python thread, with
  one intra-op thread each.

With --profile it also prints the share of the engine's step (DMLTrainer with the defaults of
dml-train: fused SGD, channels-last, mimicry on) spent in the students' layers.

    python benchmarks/step_variants.py               # 2 threads, batch 32
    python benchmarks/step_variants.py --profile
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from dml_cli.batches import TensorBatches
from dml_cli.engine import DMLTrainer
from dml_cli.models import build_student

SGD_SETTINGS = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4}
COHORT_SIZE = 3
WARMUP_STEPS = 20
# The profiler names of the operators inside the LeNets' layers, forward and backward.
MODEL_OPS = (
    "aten::convolution_backward",
    "aten::mkldnn_convolution",
    "aten::max_pool2d_with_indices",
    "aten::max_pool2d_with_indices_backward",
    "aten::threshold_backward",
    "aten::mm",
    "aten::addmm",
    "aten::relu_",
    "aten::clamp_min_",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: the usable CPU cores)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the engine's step and print shares"
    )
    return parser.parse_args(argv)


def make_students() -> list[torch.nn.Module]:
    students = []
    for index in range(COHORT_SIZE):
        torch.manual_seed(index)
        students.append(build_student("lenet5", in_channels=1, image_size=28, num_classes=10))
    return students


def cross_entropy_step(cohort_logits, optimizer: torch.optim.Optimizer):
    """Return a step: logits of every student, their summed cross-entropy, one update."""

    def step(images, labels):
        logits = cohort_logits(images)
        loss = sum(F.cross_entropy(student_logits, labels) for student_logits in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def loop_step():
    students = make_students()
    parameters = [parameter for student in students for parameter in student.parameters()]
    optimizer = torch.optim.SGD(parameters, fused=True, **SGD_SETTINGS)

    def cohort_logits(images):
        return torch.stack([student(images) for student in students])

    return cross_entropy_step(cohort_logits, optimizer)


def vmap_step():
    students = make_students()
    params, buffers = stack_module_state(students)
    params = {key: value.detach().requires_grad_() for key, value in params.items()}
    skeleton = copy.deepcopy(students[0]).to("meta")
    optimizer = torch.optim.SGD(list(params.values()), fused=True, **SGD_SETTINGS)

    def one_student(student_params, student_buffers, batch):
        return functional_call(skeleton, (student_params, student_buffers), (batch,))

    cohort = vmap(one_student, in_dims=(0, 0, None))
    return cross_entropy_step(lambda images: cohort(params, buffers, images), optimizer)


def threads_step():
    students = make_students()
    optimizers = [
        torch.optim.SGD(student.parameters(), fused=True, **SGD_SETTINGS) for student in students
    ]
    pool = ThreadPoolExecutor(COHORT_SIZE)

    def train_one(index, images, labels):
        torch.set_num_threads(1)
        optimizers[index].zero_grad(set_to_none=True)
        F.cross_entropy(students[index](images), labels).backward()
        optimizers[index].step()

    def step(images, labels):
        futures = [pool.submit(train_one, index, images, labels) for index in range(COHORT_SIZE)]
        for future in futures:
            future.result()

    return step


def time_steps(step, images, labels, steps: int) -> float:
    """Return the mean seconds per step over `steps` steps, after WARMUP_STEPS untimed ones."""
    for _ in range(WARMUP_STEPS):
        step(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    return (time.perf_counter() - start) / steps


def profile_engine(args: argparse.Namespace) -> tuple[float, float]:
    """Profile the engine's step; return the total CPU time and the part in the model's ops."""
    from torch.profiler import ProfilerActivity, profile

    students = make_students()
    optimizers = [
        torch.optim.SGD(student.parameters(), fused=True, **SGD_SETTINGS) for student in students
    ]
    trainer = DMLTrainer(students, optimizers, device="cpu", channels_last=True)
    images = torch.randint(0, 256, (8192, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8192,))
    loader = TensorBatches(
        images,
        labels,
        batch_size=args.batch_size,
        mean=(0.1307,),
        std=(0.3081,),
        shuffle=True,
        channels_last=True,
    )
    loader.set_epoch(0)
    trainer.train_epoch(islice(loader, WARMUP_STEPS))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        trainer.train_epoch(islice(loader, min(args.steps, 100)))
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    model = sum(event.self_cpu_time_total for event in events if event.key in MODEL_OPS)
    return total, model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (args.batch_size,))
    variants = {"loop": loop_step, "vmap": vmap_step, "threads": threads_step}
    steps = {name: build() for name, build in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in steps.items():
            # The thread variant's workers set one intra-op thread, so reset the count.
            torch.set_num_threads(args.threads)
            times[name].append(time_steps(step, images, labels, args.steps))

    print(
        f"{COHORT_SIZE} LeNet-5, batch {args.batch_size}, {args.threads} threads, "
        f"{args.steps} steps x {args.repeats} repeats, torch {torch.__version__}"
    )
    loop_ms = statistics.median(times["loop"]) * 1e3
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"  {name:<8} {ms:7.2f} ms/step (median)  {ms / loop_ms:5.2f}x the loop's time")
    if args.profile:
        total, model = profile_engine(args)
        print(f"  engine step: {model / total:.0%} of profiled CPU time in the students' layers")


if __name__ == "__main__":
    main()

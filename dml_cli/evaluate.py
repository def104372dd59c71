"""`dml-eval`: score each student of a finished dml-train run, and the cohort, from its folder.

The run's saved `.hydra/config.yaml` rebuilds the dataset and the cohort, and each student's
checkpoint supplies its weights. A run folder may come from anyone, so its config must pass
`check_targets` and checkpoints load only through `load_checkpoint`, which uses
`weights_only=True`. Results go to `run_dir/eval/<split>-<checkpoint>.json` and `.csv` and are
written only once every step has succeeded.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.table import Table
from torch import nn

from dml_cli import __version__
from dml_cli.batches import TensorBatches
from dml_cli.build import StudentSpec, check_targets, resolve_device, student_specs
from dml_cli.checkpoints import (
    STUDENT_FORMAT,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from dml_cli.config import config_dir
from dml_cli.console import check_or_exit, console, print_error
from dml_cli.data import DataSplits, load_dataset
from dml_cli.engine import PRECISIONS, predict_cohort
from dml_cli.errors import CheckpointError, ConfigError, DMLError
from dml_cli.metrics import CLASSIFICATION_METRIC_KEYS, cohort_metrics
from dml_cli.models import build_student, count_parameters, use_channels_last
from dml_cli.preflight import one_line

log = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last")
SPLITS = ("test", "val")
RUN_CONFIG = Path(".hydra") / "config.yaml"
CHECKPOINT_FOLDER = "checkpoints"
EVAL_FOLDER = "eval"
# The keys that RunRecorder.save_student writes and that rebuilding a student needs.
CHECKPOINT_KEYS = (
    "name",
    "arch",
    "arch_args",
    "in_channels",
    "image_size",
    "num_classes",
    "state_dict",
)
# dml-train's default trainer.eval_batch_size, for a run config that lacks the key.
DEFAULT_BATCH_SIZE = 512
CSV_COLUMNS = (
    "kind",
    "name",
    "arch",
    "num_params",
    "epoch",
    *CLASSIFICATION_METRIC_KEYS,
    "agreement",
    "kl",
    "kl_reverse",
)


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    checkpoint: str = "best",
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    precision: str | None = None,
    dataset_root: str | os.PathLike | None = None,
    download: bool = False,
) -> dict:
    """Score each student of a dml-train run, and the cohort, on one split without writing files.

    `batch_size` and `precision` default to the run's `trainer.eval_batch_size` and
    `trainer.precision`, `dataset_root` to the run's `dataset.root`. A relative `run_dir` or
    `dataset_root` is taken from the folder the program started in. Returns the result dict that
    `write_results` saves. Raises ConfigError, DataError or CheckpointError with one line that
    names the bad key or file.
    """
    _check_options(checkpoint, split, batch_size, precision)
    run_dir = resolve_run_dir(run_dir)
    run_cfg = load_run_config(run_dir)
    config_path = run_dir / RUN_CONFIG

    cohort_cfg = OmegaConf.create(_resolved(run_cfg, "cohort", config_path))
    specs = student_specs(cohort_cfg, _resolved(run_cfg, "seed", config_path))
    checkpoints = [load_student_checkpoint(run_dir, spec, checkpoint) for spec in specs]
    torch_device = resolve_device(device)
    trainer_cfg = _resolved(run_cfg, "trainer", config_path) or {}
    if batch_size is None:
        batch_size = trainer_cfg.get("eval_batch_size", DEFAULT_BATCH_SIZE)
    if precision is None:
        precision = str(trainer_cfg.get("precision", "32"))
    # Checked again because the run config may supply the values.
    _check_options(checkpoint, split, batch_size, precision)
    log.info(f"Run dir {run_dir}: {checkpoint} checkpoints, {split} split, device {torch_device}")

    dataset_cfg = dict(_resolved(run_cfg, "dataset", config_path))
    if dataset_root is not None:
        dataset_cfg["root"] = os.fspath(dataset_root)
    dataset_cfg["download"] = download
    data = load_dataset(dataset_cfg)

    students = [build_checkpoint_student(path, payload, data) for path, payload in checkpoints]
    channels_last = use_channels_last(trainer_cfg.get("channels_last", False), students)
    students = [student.to(torch_device) for student in students]
    if channels_last:
        students = [student.to(memory_format=torch.channels_last) for student in students]
    rows = _student_rows(run_dir, specs, students, checkpoints)

    images, labels = _split_tensors(data, split)
    loader = TensorBatches(
        images,
        labels,
        batch_size=batch_size,
        mean=data.mean,
        std=data.std,
        device=torch_device,
        channels_last=channels_last,
    )
    logits, labels = predict_cohort(
        students, loader, torch_device, precision=precision, channels_last=channels_last
    )

    result = {
        "version": __version__,
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "split": split,
        "dataset": data.name,
        "cohort": cohort_cfg.get("name"),
        "num_samples": int(labels.numel()),
        "device": str(torch_device),
        "batch_size": batch_size,
        "precision": precision,
    }
    result.update(score_predictions(logits, labels, rows))
    return result


def _student_rows(run_dir: Path, specs: list, students: list, checkpoints: list) -> list[dict]:
    rows = []
    for spec, student, (path, payload) in zip(specs, students, checkpoints, strict=True):
        rows.append(
            {
                "name": spec.name,
                "arch": spec.arch,
                "arch_args": spec.arch_args,
                "num_params": count_parameters(student),
                "epoch": payload.get("epoch"),
                "checkpoint": str(path.relative_to(run_dir)),
            }
        )
        log.info(
            f"{spec.name}: {spec.arch}, {rows[-1]['num_params']:,} trainable params, "
            f"epoch {rows[-1]['epoch']} from {path}"
        )
    return rows


def _check_options(
    checkpoint: object, split: object, batch_size: object, precision: object
) -> None:
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"Invalid checkpoint={checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}."
        )
    if split not in SPLITS:
        raise ConfigError(f"Invalid split={split!r}: choose one of {', '.join(SPLITS)}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError(
            f"Invalid batch_size={batch_size!r}: use a positive integer, or null for the run's "
            "trainer.eval_batch_size."
        )
    if precision is not None and str(precision) not in PRECISIONS:
        raise ConfigError(
            f"Invalid precision={precision!r}: choose one of {', '.join(PRECISIONS)}, or null "
            "for the run's trainer.precision."
        )


def resolve_run_dir(run_dir: str | os.PathLike | None) -> Path:
    """Return the absolute run folder, or raise CheckpointError unless dml-train wrote it."""
    if run_dir is None or not os.fspath(run_dir):
        raise ConfigError(
            "Missing run_dir: pass the folder that dml-train wrote, for example "
            "run_dir=outputs/2025-01-31/12-00-00-000000."
        )
    path = Path(os.path.normpath(to_absolute_path(os.path.expanduser(os.fspath(run_dir)))))
    if not path.exists():
        raise CheckpointError(
            f"Run folder not found: run_dir={path}. Pass a folder that dml-train wrote. A "
            "relative path is taken from the folder dml-eval starts in."
        )
    if not (path / RUN_CONFIG).is_file():
        raise CheckpointError(
            f"run_dir={path} is not a dml-train run: {RUN_CONFIG} is missing. Pass the run "
            "folder itself, the one that contains summary.json and checkpoints/."
        )
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    """Load the run's saved config unresolved, and reject any `_target_` off the allow-list."""
    path = run_dir / RUN_CONFIG
    try:
        run_cfg = OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise CheckpointError(
            f"Failed to read the run config {path}: {_first_line(err)}. Restore the file from the "
            "run's backup or retrain."
        ) from err
    if not isinstance(run_cfg, DictConfig) or not all(
        key in run_cfg for key in ("dataset", "cohort", "seed")
    ):
        raise CheckpointError(
            f"run_dir={run_dir} is not a dml-train run: {path} lacks the dataset, cohort and "
            "seed keys that dml-train saves."
        )
    try:
        # Unresolved, so that an interpolated `_target_` is rejected rather than resolved.
        check_targets(OmegaConf.to_container(run_cfg, resolve=False))
    except ConfigError as err:
        raise ConfigError(f"{err} Run config: {path}.") from err
    return run_cfg


def _resolved(run_cfg: DictConfig, key: str, path: Path) -> object:
    """Return `key` of the run config as plain values, with its interpolations resolved."""
    try:
        node = OmegaConf.select(run_cfg, key, throw_on_missing=True)
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
        return node
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"Failed to resolve {key} in the run config {path}: {_first_line(err)}. Fix the value "
            "in that file."
        ) from err


def load_student_checkpoint(run_dir: Path, spec: StudentSpec, checkpoint: str) -> tuple:
    """Load `checkpoints/<name>_<checkpoint>.pt` and check it against the run config's student.

    Returns (path, payload). Raises CheckpointError naming the file when it is missing, unsafe,
    corrupt, incomplete or written for another student.
    """
    path = run_dir / CHECKPOINT_FOLDER / f"{spec.name}_{checkpoint}.pt"
    payload = load_checkpoint(path, STUDENT_FORMAT)
    missing = [key for key in CHECKPOINT_KEYS if key not in payload]
    if missing or not isinstance(payload["state_dict"], Mapping):
        absent = ", ".join(missing) if missing else "a state_dict mapping"
        raise CheckpointError(
            f"Checkpoint {path} lacks {absent}, so the student cannot be rebuilt. Use another "
            "checkpoint (checkpoint=last or checkpoint=best) or retrain."
        )
    expected = {"name": spec.name, "arch": spec.arch, "arch_args": spec.arch_args}
    for key, value in expected.items():
        if payload[key] != value:
            raise CheckpointError(
                f"Checkpoint {path} has {key}={payload[key]!r} but the run config's "
                f"cohort.students[{spec.index}] has {key}={value!r}: the file belongs to "
                "another run. Restore the checkpoint that dml-train wrote for this run."
            )
    return path, payload


def build_checkpoint_student(path: Path, payload: dict, data: DataSplits) -> nn.Module:
    """Build a student from the checkpoint's arch and shape, and load its weights.

    Raises CheckpointError naming the file when the checkpoint was trained on another input
    shape or class count than `data`, or its weights do not fit the arch.
    """
    for key, value in (
        ("in_channels", data.in_channels),
        ("image_size", data.image_size),
        ("num_classes", data.num_classes),
    ):
        if payload[key] != value:
            raise CheckpointError(
                f"Checkpoint {path} was trained with {key}={payload[key]!r} but dataset "
                f"{data.name} has {key}={value}: evaluate it on the dataset of its run."
            )
    student = build_student(
        payload["arch"],
        in_channels=payload["in_channels"],
        image_size=payload["image_size"],
        num_classes=payload["num_classes"],
        **payload["arch_args"],
    )
    mismatch = _state_dict_mismatch(student, payload["state_dict"])
    if mismatch is None:
        try:
            student.load_state_dict(payload["state_dict"])
        except (RuntimeError, TypeError, ValueError) as err:
            mismatch = _first_line(err)
    if mismatch is not None:
        raise CheckpointError(
            f"Checkpoint {path} does not fit arch {payload['arch']!r} of {payload['name']}: "
            f"{mismatch}. Restore the checkpoint that dml-train wrote for this run."
        )
    return student


def _state_dict_mismatch(student: nn.Module, state_dict: Mapping) -> str | None:
    """Describe how `state_dict` differs from the student's keys and shapes, or return None."""
    expected = student.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys such as {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys such as {unexpected[0]}")
    for key, tensor in expected.items():
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.shape != tensor.shape:
            problems.append(
                f"{key} has shape {tuple(value.shape)} where the arch needs {tuple(tensor.shape)}"
            )
            break
        if key in state_dict and not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            break
    return ", ".join(problems) if problems else None


def _split_tensors(data: DataSplits, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "val":
        return data.val_images, data.val_labels
    return data.test_images, data.test_labels


def score_predictions(logits: torch.Tensor, labels: torch.Tensor, students: list[dict]) -> dict:
    """Compute the result's metrics from the cohort's (K, N, C) logits and the labels.

    `students` contains one dict per student, in cohort order, with at least its name; each gets
    acc (top-1), top5, nll and ece added. Returns the students, the ensemble (mean of the
    students' probs), the students' mean and population std, the agreement of each pair and the
    mean KL(p_i || p_j) of each ordered pair, with the means of both over the pairs (None for a
    cohort of one).
    """
    names = [student["name"] for student in students]
    metrics = cohort_metrics(logits, labels, names)
    agreement = metrics["agreement"]
    kl = metrics["kl"]
    return {
        "students": [{**student, **metrics["students"][student["name"]]} for student in students],
        "ensemble": metrics["ensemble"],
        "student_mean": metrics["student_mean"],
        "student_std": metrics["student_std"],
        "agreement": agreement,
        "kl": kl,
        "agreement_mean": sum(agreement.values()) / len(agreement) if agreement else None,
        "kl_mean": sum(kl.values()) / len(kl) if kl else None,
    }


def format_csv(result: dict) -> str:
    """Format the result as CSV: one row per student, the ensemble, mean, std, and each pair.

    The `kind` column is student, ensemble, mean, std or pair. A pair row named `a/b` fills
    agreement, kl = KL(p_a || p_b) and kl_reverse = KL(p_b || p_a). Floats keep full precision.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
    writer.writeheader()
    for student in result["students"]:
        writer.writerow(_csv_values({"kind": "student", **student}))
    writer.writerow(_csv_values({"kind": "ensemble", "name": "ensemble", **result["ensemble"]}))
    writer.writerow(_csv_values({"kind": "mean", "name": "mean", **result["student_mean"]}))
    writer.writerow(_csv_values({"kind": "std", "name": "std", **result["student_std"]}))
    for pair, agreement in result["agreement"].items():
        first, second = pair.split("/", 1)
        row = {
            "kind": "pair",
            "name": pair,
            "agreement": agreement,
            "kl": result["kl"][f"{first}||{second}"],
            "kl_reverse": result["kl"][f"{second}||{first}"],
        }
        writer.writerow(_csv_values(row))
    return buffer.getvalue()


def _csv_values(row: dict) -> dict:
    return {key: repr(value) if isinstance(value, float) else value for key, value in row.items()}


def result_paths(result: dict) -> tuple[Path, Path]:
    """Return the JSON and CSV paths of a result: run_dir/eval/<split>-<checkpoint>.{json,csv}."""
    stem = Path(result["run_dir"]) / EVAL_FOLDER / f"{result['split']}-{result['checkpoint']}"
    return stem.with_suffix(".json"), stem.with_suffix(".csv")


def write_results(result: dict) -> tuple[Path, Path]:
    """Write the result's JSON and CSV files atomically and return their paths."""
    json_path, csv_path = result_paths(result)
    csv_text = format_csv(result)
    atomic_write_json(json_path, result)
    atomic_write_text(csv_path, csv_text)
    return json_path, csv_path


def result_tables(result: dict) -> list[Table]:
    """Build the console tables: the students and cohort rows, then the pairs if any."""
    title = (
        f"{result['cohort']} on {result['dataset']} {result['split']} "
        f"({result['num_samples']:,} images), {result['checkpoint']} checkpoints"
    )
    table = Table(title=title)
    for column in ("student", "arch", "params", "epoch", "top-1", "top-5", "NLL", "ECE"):
        table.add_column(column, justify="left" if column in ("student", "arch") else "right")
    for student in result["students"]:
        table.add_row(
            student["name"],
            student["arch"],
            f"{student['num_params']:,}",
            str(student["epoch"]),
            *_metric_cells(student),
        )
    table.add_section()
    table.add_row("ensemble", "", "", "", *_metric_cells(result["ensemble"]))
    table.add_row("mean", "", "", "", *_metric_cells(result["student_mean"]))
    table.add_row("std", "", "", "", *_metric_cells(result["student_std"]))
    tables = [table]

    if result["agreement"]:
        pairs = Table(title="Pairs of students")
        for column in ("pair", "agreement", "KL(first||second)", "KL(second||first)"):
            pairs.add_column(column, justify="left" if column == "pair" else "right")
        for pair, agreement in result["agreement"].items():
            first, second = pair.split("/", 1)
            pairs.add_row(
                pair,
                f"{agreement:.4f}",
                f"{result['kl'][f'{first}||{second}']:.4f}",
                f"{result['kl'][f'{second}||{first}']:.4f}",
            )
        tables.append(pairs)
    return tables


def _metric_cells(metrics: dict) -> list[str]:
    return [f"{metrics[key]:.4f}" for key in CLASSIFICATION_METRIC_KEYS]


def run_job(cfg: DictConfig) -> dict:
    """Evaluate the run that `cfg.run_dir` names, print the tables and write the result files.

    A user error ends the program with one line on stderr and exit code 2, unless
    HYDRA_FULL_ERROR=1 requests the traceback.
    """
    run_dir = None if OmegaConf.is_missing(cfg, "run_dir") else cfg.run_dir
    try:
        result = evaluate_run(
            run_dir,
            checkpoint=cfg.checkpoint,
            split=cfg.split,
            device=cfg.device.type,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            dataset_root=cfg.dataset.root,
            download=cfg.dataset.download,
        )
        json_path, csv_path = write_results(result)
    except DMLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_error("dml-eval", str(err))
        sys.exit(2)
    for table in result_tables(result):
        console().print(table)
    log.info(f"Wrote {json_path} and {csv_path}")
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


def main() -> None:
    """Console entry point of `dml-eval`."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        # Hydra's sweeper would write multirun.yaml into the working folder before any job ran.
        print_error(
            "dml-eval",
            "--multirun is not supported: run dml-eval once per run_dir, for example in a shell "
            "loop.",
        )
        sys.exit(2)
    check_or_exit("dml-eval", check_command_line, sys.argv[1:])
    _hydra_main()


def check_command_line(args: list[str]) -> None:
    """Compose the eval config from `args` as Hydra will, and raise ConfigError if that fails.

    Without this check Hydra prints its own multi-line message and exits with code 1. Command
    lines with a flag (--help, --cfg, ...) go to Hydra unchecked.
    """
    if any(arg.startswith("-") for arg in args):
        return
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        try:
            compose(config_name="eval", overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            unknown = re.match(r"Could not override '([^']+)'", str(err))
            if unknown is None:
                raise ConfigError(one_line(str(err))) from err
            raise ConfigError(_unknown_key_message(unknown.group(1))) from err


def _unknown_key_message(key: str) -> str:
    """Name the unknown key, the nearest valid key if one is close, and every valid key."""
    # Called inside initialize_config_dir, which compose needs.
    cfg = compose(config_name="eval", return_hydra_config=True)
    groups = {
        group: GlobalHydra.instance().config_loader().get_group_options(group)
        for group in cfg.hydra.runtime.choices
        if not group.startswith("hydra")
    }
    keys = [
        path
        for path in _leaf_keys(OmegaConf.to_container(cfg, resolve=False), "")
        if not path.startswith("hydra.") and path.split(".")[0] not in groups
    ]
    message = f"Invalid override: dml-eval has no key {key!r}"
    close = difflib.get_close_matches(key, keys + list(groups), n=1)
    if close:
        message += f" (did you mean {close[0]}?)"
    choices = [f"{group}={'|'.join(options)}" for group, options in groups.items()]
    return f"{message}. Valid keys: {', '.join(keys + choices)}."


def _leaf_keys(node: object, prefix: str) -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    return keys


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    main()

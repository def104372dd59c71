"""`dml-report`: one table and one plot for a Hydra multirun of `dml-train`.

A sweep dir contains one folder per job, each with `.hydra/overrides.yaml` and, when the job
finished, `summary.json` (or `failed.json` when it stopped on a user error). Jobs that share
every override except `seed` form one setting, and each setting becomes one row with the mean
and sample standard deviation over its seeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from dml_cli.checkpoints import atomic_write_text
from dml_cli.console import console, make_log_handler, print_error
from dml_cli.errors import DMLError
from dml_cli.plots import plot_accuracy_vs_cohort_size

log = logging.getLogger(__name__)

OVERRIDES_PATH = Path(".hydra") / "overrides.yaml"
SUMMARY_NAME = "summary.json"
FAILED_NAME = "failed.json"
REPORT_NAMES = ("report.csv", "report.md", "report.png")

# The test accuracies reported per setting, as (CSV prefix, column title).
METRICS = (
    ("student_mean_test_acc", "student mean test acc"),
    ("best_student_test_acc", "best student test acc"),
    ("ensemble_test_acc", "ensemble test acc"),
)
# Override keys that set the cohort size, the x axis of the plot, rather than a curve.
COHORT_SIZE_KEYS = ("cohort", "cohort.size", "cohort.students")


@dataclass
class JobResult:
    """One job folder of a sweep: its overrides and its outcome."""

    job: str  # the folder, relative to the sweep dir
    overrides: dict[str, str]  # override key -> value, in the order they were given
    seed: str | None
    status: str  # "finished", "failed" or "incomplete"
    error: str | None = None
    summary: dict | None = None

    def metrics(self) -> dict[str, float]:
        """Return the test accuracies of METRICS for a finished job.

        The best student is the one with the highest val accuracy, so the test split plays no
        part in choosing it.
        """
        students = self.summary["students"]
        best = max(students, key=lambda student: student["best_val_acc"])
        return {
            "student_mean_test_acc": float(self.summary["student_mean"]["test_acc"]),
            "best_student_test_acc": float(best["test_acc"]),
            "ensemble_test_acc": float(self.summary["ensemble"]["test_acc"]),
        }


@dataclass
class SettingRow:
    """The jobs of one setting (every override but seed) and their statistics over seeds."""

    overrides: dict[str, str]
    jobs: list[JobResult] = field(default_factory=list)

    @property
    def finished(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status == "finished"]

    @property
    def num_failed(self) -> int:
        return len(self.jobs) - len(self.finished)

    @property
    def cohort_size(self) -> int | None:
        sizes = [len(job.summary["students"]) for job in self.finished]
        return sizes[0] if sizes else None

    @property
    def loss(self) -> str | None:
        names = [str(job.summary.get("loss")) for job in self.finished]
        return names[0] if names else None

    def stat(self, metric: str) -> tuple[float, float]:
        """Return the mean and sample standard deviation of `metric` over finished seeds.

        Both are nan without finished jobs, and the std is nan with a single one.
        """
        values = [job.metrics()[metric] for job in self.finished]
        return _mean_std(values)

    def wall_time_s(self) -> float:
        values = [float(job.summary["wall_time_s"]) for job in self.finished]
        return statistics.mean(values) if values else math.nan


@dataclass
class SweepReport:
    """The rows of a sweep report and what they were built from."""

    sweep_dir: Path
    jobs: list[JobResult]
    rows: list[SettingRow]
    keys: list[str]  # every override key but seed, in order of first appearance
    varying_keys: list[str]  # the keys whose value differs between settings

    @property
    def common_overrides(self) -> list[str]:
        first = self.rows[0].overrides if self.rows else {}
        return [f"{key}={first[key]}" for key in self.keys if key not in self.varying_keys]

    @property
    def failed_jobs(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status != "finished"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.mean(values), std


def _override_key(override: str) -> str:
    """Return the key of an override as written, with any "+" or "~" prefix."""
    return override.split("=", 1)[0]


def _plain_key(key: str) -> str:
    return key.lstrip("+~")


def _natural_key(path: Path) -> list:
    """Sort job folders 2 before 10, the order Hydra numbers them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """List the job folders under `sweep_dir`: folders with `.hydra/overrides.yaml`.

    Raises DMLError when `sweep_dir` is missing, is a single run folder, contains several sweeps
    or contains no job.
    """
    if not sweep_dir.is_dir():
        raise DMLError(
            f"Sweep dir {sweep_dir} not found. Pass the folder of a multirun, such as "
            "outputs/multirun/<date>/<time>."
        )
    if (sweep_dir / OVERRIDES_PATH).is_file():
        raise DMLError(
            f"{sweep_dir} is a single run folder, not a sweep dir. Pass the folder of a "
            "multirun (dml-train -m ...), such as outputs/multirun/<date>/<time>."
        )
    nested_sweeps = sorted(path.parent for path in sweep_dir.glob("*/**/multirun.yaml"))
    if nested_sweeps:
        names = ", ".join(str(path) for path in nested_sweeps[:3])
        more = f" and {len(nested_sweeps) - 3} more" if len(nested_sweeps) > 3 else ""
        raise DMLError(
            f"{sweep_dir} is not a sweep dir but contains sweep dirs: {names}{more}. "
            "Pass one of them."
        )
    job_dirs = sorted(
        (path.parent.parent for path in sweep_dir.glob(f"**/{OVERRIDES_PATH}")),
        key=_natural_key,
    )
    if not job_dirs:
        raise DMLError(
            f"No jobs found in {sweep_dir}: no folder below it has {OVERRIDES_PATH}. Pass the "
            "folder of a multirun, such as outputs/multirun/<date>/<time>."
        )
    return job_dirs


def _read_json(path: Path) -> dict:
    with path.open() as file:
        data = json.load(file)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def read_job(sweep_dir: Path, job_dir: Path) -> JobResult:
    """Read one job folder's overrides and outcome.

    Raises DMLError when its overrides file is unreadable. A job whose summary is unreadable
    counts as failed, with the cause as its error.
    """
    overrides_path = job_dir / OVERRIDES_PATH
    try:
        items = yaml.safe_load(overrides_path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DMLError(f"Failed to read {overrides_path}: {err}. Fix or delete the job.") from err
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DMLError(f"Invalid {overrides_path}: expected a list of overrides, got {items!r}.")

    overrides: dict[str, str] = {}
    seed = None
    for item in map(str, items):
        key = _override_key(item)
        value = item.split("=", 1)[1] if "=" in item else ""
        if _plain_key(key) == "seed":
            seed = value
        else:
            overrides[key] = value

    job = JobResult(
        job=str(job_dir.relative_to(sweep_dir)), overrides=overrides, seed=seed, status=""
    )
    summary_path = job_dir / SUMMARY_NAME
    failed_path = job_dir / FAILED_NAME
    if summary_path.is_file():
        try:
            job.summary = _read_json(summary_path)
            job.metrics()
            float(job.summary["wall_time_s"])
            job.status = "finished"
            job.seed = str(job.summary.get("seed", seed))
        except (OSError, ValueError, KeyError, TypeError) as err:
            job.summary = None
            job.status = "failed"
            job.error = f"invalid {SUMMARY_NAME}: {type(err).__name__}: {err}"
    elif failed_path.is_file():
        job.status = "failed"
        try:
            job.error = str(_read_json(failed_path).get("error", "no reason recorded"))
        except (OSError, ValueError) as err:
            job.error = f"invalid {FAILED_NAME}: {err}"
    else:
        job.status = "incomplete"
        job.error = (
            f"no {SUMMARY_NAME}: the job crashed, was stopped or is still running "
            f"(see {job.job}/train.log)"
        )
    job.error = job.error.splitlines()[0] if job.error else job.error
    return job


def group_jobs(sweep_dir: Path, jobs: list[JobResult]) -> SweepReport:
    """Group jobs into settings, in the order of each setting's first job."""
    rows: dict[tuple, SettingRow] = {}
    keys: list[str] = []
    for job in jobs:
        keys.extend(key for key in job.overrides if key not in keys)
        setting = tuple(sorted(job.overrides.items()))
        rows.setdefault(setting, SettingRow(overrides=dict(job.overrides))).jobs.append(job)

    varying_keys = [
        key for key in keys if len({row.overrides.get(key) for row in rows.values()}) > 1
    ]
    return SweepReport(sweep_dir, jobs, list(rows.values()), keys, varying_keys)


def collect_report(sweep_dir: Path | str) -> SweepReport:
    """Read every job of `sweep_dir` and group them into settings. Writes nothing."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(sweep_dir, job_dir) for job_dir in find_job_dirs(sweep_dir)]
    return group_jobs(sweep_dir, jobs)


def _format_number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def _format_stat(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(std):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def csv_text(report: SweepReport) -> str:
    """Format one CSV row per setting, with every override key as a column."""
    columns = [*report.keys, "cohort_size", "seeds", "seed_values", "failed"]
    for metric, _ in METRICS:
        columns += [f"{metric}_mean", f"{metric}_std"]
    columns.append("wall_time_s_mean")

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        values: dict[str, Any] = {key: row.overrides.get(key, "") for key in report.keys}
        values["cohort_size"] = "" if row.cohort_size is None else row.cohort_size
        values["seeds"] = len(row.finished)
        values["seed_values"] = " ".join(str(job.seed) for job in row.finished)
        values["failed"] = row.num_failed
        for metric, _ in METRICS:
            mean, std = row.stat(metric)
            values[f"{metric}_mean"] = _format_number(mean, 6)
            values[f"{metric}_std"] = _format_number(std, 6)
        values["wall_time_s_mean"] = _format_number(row.wall_time_s(), 1)
        writer.writerow(values)
    return buffer.getvalue()


def _table_cells(report: SweepReport, row: SettingRow) -> list[str]:
    cells = [row.overrides.get(key, "") for key in report.varying_keys]
    cells += ["" if row.cohort_size is None else str(row.cohort_size), str(len(row.finished))]
    cells.append(str(row.num_failed))
    cells += [_format_stat(*row.stat(metric)) for metric, _ in METRICS]
    cells.append(_format_number(row.wall_time_s(), 1))
    return cells


def _table_columns(report: SweepReport) -> list[str]:
    titles = [title for _, title in METRICS]
    return [*report.varying_keys, "cohort size", "seeds", "failed", *titles, "wall time (s)"]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe(report: SweepReport) -> list[str]:
    num_finished = len(report.jobs) - len(report.failed_jobs)
    lines = [
        f"{_count(len(report.jobs), 'job')} in {_count(len(report.rows), 'setting')}: "
        f"{num_finished} finished, {len(report.failed_jobs)} failed or incomplete.",
        "Test accuracy is the mean ± sample standard deviation over seeds. The best student is "
        "the one with the highest val accuracy. Wall time is the mean per job.",
    ]
    if report.common_overrides:
        lines.append(f"Common overrides: {' '.join(report.common_overrides)}.")
    return lines


def markdown_text(report: SweepReport) -> str:
    """Format the report as markdown: a setting table, then the failed jobs with their errors."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    columns = _table_columns(report)
    lines = [f"# Sweep report: {report.sweep_dir}", ""]
    lines += [*_describe(report), ""]
    lines.append("| " + " | ".join(map(cell, columns)) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for row in report.rows:
        lines.append("| " + " | ".join(map(cell, _table_cells(report, row))) + " |")
    if report.failed_jobs:
        lines += ["", "## Failed jobs", "", "| job | overrides | error |", "| --- | --- | --- |"]
        for job in report.failed_jobs:
            overrides = " ".join(_job_overrides(job))
            lines.append(f"| {job.job} | {cell(overrides)} | {cell(job.error or '')} |")
    return "\n".join(lines) + "\n"


def _job_overrides(job: JobResult) -> list[str]:
    overrides = [f"{key}={value}" for key, value in job.overrides.items()]
    if job.seed is not None:
        overrides.append(f"seed={job.seed}")
    return overrides


def plot_series(report: SweepReport) -> dict[str, list[tuple[int, float, float]]]:
    """Map a curve label to (cohort size, mean, std) points of test accuracy.

    Each loss (and each value of any other varying override but the cohort's and seed) gets
    a student mean curve and an ensemble curve.
    """
    other_keys = [
        key
        for key in report.varying_keys
        if _plain_key(key) not in COHORT_SIZE_KEYS and _plain_key(key) != "loss"
    ]
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in report.rows:
        if row.cohort_size is None:
            continue
        name = " ".join(
            [row.loss or "", *(f"{key}={row.overrides.get(key, '')}" for key in other_keys)]
        )
        for metric, label in (
            ("student_mean_test_acc", "student mean"),
            ("ensemble_test_acc", "ensemble"),
        ):
            mean, std = row.stat(metric)
            series.setdefault(f"{name}, {label}", []).append((row.cohort_size, mean, std))
    for label, points in series.items():
        sizes = [size for size, _, _ in points]
        if len(set(sizes)) < len(sizes):
            log.warning(
                f"Curve {label!r} has several settings of one cohort size, so its points "
                "are joined in an arbitrary order at that size"
            )
    return series


def write_report(sweep_dir: Path | str) -> SweepReport:
    """Write report.csv, report.md and report.png into `sweep_dir` and return the report.

    Raises DMLError when `sweep_dir` is not a sweep dir with jobs or a file cannot be written.
    """
    report = collect_report(sweep_dir)
    atomic_write_text(report.sweep_dir / "report.csv", csv_text(report))
    atomic_write_text(report.sweep_dir / "report.md", markdown_text(report))
    plot_accuracy_vs_cohort_size(plot_series(report), report.sweep_dir / "report.png")
    return report


def report_table(report: SweepReport) -> Table:
    """Build the rich table of the settings, captioned with the job counts and common overrides."""
    table = Table(
        title=f"Sweep {report.sweep_dir}",
        caption="\n".join(_describe(report)),
        caption_justify="left",
    )
    for index, column in enumerate(_table_columns(report)):
        justify = "left" if index < len(report.varying_keys) else "right"
        table.add_column(column, justify=justify)
    for row in report.rows:
        table.add_row(*_table_cells(report, row))
    return table


def print_report(report: SweepReport) -> None:
    """Print the settings table, one line per failed job and the paths of the report files."""
    table = report_table(report)
    output = console()
    if not output.is_terminal:
        # Redirected output has no width to fit, so the table is printed whole, not squeezed
        # into the 80 columns rich assumes.
        options = output.options.update(max_width=1000)
        width = max(output.width, Measurement.get(output, options, table).maximum)
        output = Console(width=width, highlight=False)
    output.print(table)
    for job in report.failed_jobs:
        overrides = " ".join(_job_overrides(job))
        output.print(
            f"[red]{job.status}[/red] job {escape(job.job)} ({escape(overrides)}): "
            f"{escape(job.error or '')}",
            highlight=False,
            soft_wrap=True,
        )
    names = ", ".join(REPORT_NAMES)
    output.print(f"Wrote {names} to {report.sweep_dir}", highlight=False, soft_wrap=True)


class ReportCallback(Callback):
    """Hydra callback that writes and prints the sweep report when a multirun ends.

    A report that cannot be built logs one warning, so it never fails the sweep. The jobs that
    did not finish are kept in `unfinished_jobs`, so `dml-train` can exit non-zero for them
    even when a launcher ran the jobs in other processes.
    """

    unfinished_jobs: list[str] = []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
            ReportCallback.unfinished_jobs = [job.job for job in report.failed_jobs]
            print_report(report)
        except Exception as err:  # Any failure: the jobs' results matter more than the report.
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning(f"Failed to write the sweep report for {sweep_dir}: {message}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point of `dml-report`."""
    parser = argparse.ArgumentParser(
        prog="dml-report",
        description=(
            "Summarise a dml-train multirun: write report.csv, report.md and report.png into the "
            "sweep dir and print a table with one row per setting (every override but seed)."
        ),
    )
    parser.add_argument("sweep_dir", type=Path, help="folder of the multirun, with job folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[make_log_handler()])

    try:
        report = write_report(args.sweep_dir)
    except DMLError as err:
        print_error("dml-report", str(err))
        sys.exit(2)
    print_report(report)


if __name__ == "__main__":
    main()

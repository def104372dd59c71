"""Everything dml_cli prints to the terminal apart from log records: tables and error lines."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from dml_cli.errors import DMLError

_console = Console()


def make_log_handler() -> logging.Handler:
    """Create the console log handler named in the Hydra job logging config.

    A terminal gets rich's handler. Redirected output gets plain lines, because rich wraps and
    pads records to a fixed width when it cannot measure a terminal.
    """
    if _console.is_terminal:
        return RichHandler(
            console=_console, show_path=False, show_time=False, markup=False, rich_tracebacks=False
        )
    return logging.StreamHandler(sys.stdout)


def console() -> Console:
    return _console


def print_error(program: str, message: str) -> None:
    """Print a user error as one plain line on stderr and copy it to any log files."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    record = logging.LogRecord(program, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def check_or_exit(program: str, check: Callable[[list[str]], None], args: list[str]) -> None:
    """Run `check(args)`, and on a DMLError print it as one line and exit with status 2.

    With HYDRA_FULL_ERROR=1 the error propagates with its traceback instead.
    """
    try:
        check(args)
    except DMLError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_error(program, str(err))
        sys.exit(2)


def print_training_summary(summary: dict) -> None:
    """Print the per-student and ensemble results of a finished run as a table."""
    table = Table(title=f"{summary['cohort']} on {summary['dataset']}")
    for column in ("student", "arch", "params", "best epoch", "best val acc", "test acc"):
        table.add_column(column, justify="left" if column in ("student", "arch") else "right")
    for student in summary["students"]:
        table.add_row(
            student["name"],
            student["arch"],
            f"{student['num_params']:,}",
            str(student["best_epoch"]),
            f"{student['best_val_acc']:.4f}",
            f"{student['test_acc']:.4f}",
        )
    ensemble = summary["ensemble"]
    table.add_row(
        "ensemble", "", "", "", f"{ensemble['val_acc']:.4f}", f"{ensemble['test_acc']:.4f}"
    )
    _console.print(table)


def print_cohort_metrics(metrics: dict, archs: dict[str, str], title: str) -> None:
    """Print accuracy, top-5 accuracy, NLL and ECE per student and for the ensemble.

    `metrics` is a `dml_cli.metrics.cohort_metrics` result and `archs` maps names to archs.
    """
    table = Table(title=title)
    for column in ("student", "arch", "acc", "top5", "nll", "ece"):
        table.add_column(column, justify="left" if column in ("student", "arch") else "right")
    rows = [(name, archs.get(name, ""), values) for name, values in metrics["students"].items()]
    rows.append(("ensemble", "", metrics["ensemble"]))
    for name, arch, values in rows:
        cells = [f"{values[key]:.4f}" for key in ("acc", "top5", "nll", "ece")]
        table.add_row(name, arch, *cells)
    _console.print(table)

"""PNG figures of a run's training curves and of accuracy against cohort size.

Figures are built on matplotlib.figure.Figure directly, not through pyplot, so no global figure
registry or interactive backend is involved and nothing has to be closed after saving.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dml_cli.errors import DMLError

log = logging.getLogger(__name__)

DPI = 120
ENSEMBLE_NAME = "ensemble"

# (metrics.csv column, y axis label, panel title, whether the ensemble is drawn)
CURVE_PANELS = (
    ("train_loss", "train loss", "Train loss", False),
    ("val_loss", "val loss", "Val loss", True),
    ("val_acc", "val accuracy", "Val accuracy", True),
)


def _parse_value(row: Mapping, key: str) -> float | None:
    """Return row[key] as a float, or None when the key is missing, empty or not finite."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise DMLError(
            f"metrics.csv column {key} has invalid value {value!r} "
            f"(epoch={row.get('epoch')!r}, student={row.get('student')!r}). "
            "Expected a number or an empty cell, so rerun training or fix the file"
        ) from error
    if not math.isfinite(number):
        return None
    return number


def _parse_epoch(row: Mapping) -> int:
    epoch = _parse_value(row, "epoch")
    if epoch is None or epoch != int(epoch):
        raise DMLError(
            f"metrics.csv row has invalid epoch={row.get('epoch')!r} "
            f"(student={row.get('student')!r}). Expected an integer, "
            "so rerun training or fix the file"
        )
    return int(epoch)


def _collect_curves(
    rows: Sequence[Mapping],
) -> tuple[list[str], dict[str, dict[str, list[tuple[int, float]]]]]:
    """Group rows into student names and {column: {student: [(epoch, value), ...]}}.

    Points are sorted by epoch. Students keep the order of their first row, and the ensemble
    goes last.
    """
    students: list[str] = []
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {
        column: {} for column, *_ in CURVE_PANELS
    }
    num_non_finite = 0
    for row in rows:
        student = str(row.get("student") or "").strip()
        if not student:
            raise DMLError(
                f"metrics.csv row has an empty student column (epoch={row.get('epoch')!r}). "
                "Expected a name such as student_0 or ensemble, so rerun training or fix the file"
            )
        epoch = _parse_epoch(row)
        if student not in students:
            students.append(student)
        for column in curves:
            value = _parse_value(row, column)
            if value is None:
                raw = row.get(column)
                if raw is not None and str(raw).strip() != "":
                    num_non_finite += 1
                continue
            curves[column].setdefault(student, []).append((epoch, value))

    if num_non_finite:
        log.warning("Skipped %d non-finite values (nan or inf) in the curves", num_non_finite)

    order = [name for name in students if name != ENSEMBLE_NAME]
    if ENSEMBLE_NAME in students:
        order.append(ENSEMBLE_NAME)
    return order, {
        column: {name: sorted(by_student[name]) for name in order if name in by_student}
        for column, by_student in curves.items()
    }


def _draw_curve_panel(
    axes: Axes,
    by_student: dict[str, list[tuple[int, float]]],
    colors: dict[str, str],
    ylabel: str,
    title: str,
) -> None:
    for name, points in by_student.items():
        epochs = [epoch for epoch, _ in points]
        values = [value for _, value in points]
        if name == ENSEMBLE_NAME:
            axes.plot(epochs, values, linestyle="--", color="black", label=name)
        else:
            axes.plot(epochs, values, marker=".", color=colors[name], label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if not by_student:
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Matplotlib warns and keeps the default layout when long legend labels leave no room for
    # the axes. The figure is still useful, so the warning becomes one log line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message="constrained_layout not applied")
        figure.savefig(path, format="png", dpi=DPI)
    for warning in caught:
        if "constrained_layout not applied" in str(warning.message):
            log.info(
                "%s: the legend and labels leave no room for the plots, so they overlap", path
            )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    log.debug("Saved figure to %s", path)
    return path


def training_curves_figure(rows: list[dict]) -> Figure:
    """Build three panels of train loss, val loss and val accuracy against epoch.

    rows are metrics.csv rows as dicts of strings or numbers with at least the columns epoch,
    student, train_loss, val_loss and val_acc. Each student gets one line and keeps its color in
    every panel. The ensemble row is drawn dashed in the val panels only. Missing, empty and
    non-finite values are skipped rather than drawn as zero: the line joins the epochs around
    them, and the skipped epoch has no marker.
    Raises DMLError for a row without a student or integer epoch, or with a non-numeric value.
    """
    names, curves = _collect_curves(rows)
    student_names = [name for name in names if name != ENSEMBLE_NAME]
    colors = {name: f"C{index % 10}" for index, name in enumerate(student_names)}

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    panels = figure.subplots(1, len(CURVE_PANELS))
    for axes, (column, ylabel, title, with_ensemble) in zip(panels, CURVE_PANELS, strict=True):
        by_student = curves[column]
        if not with_ensemble:
            by_student = {k: v for k, v in by_student.items() if k != ENSEMBLE_NAME}
        _draw_curve_panel(axes, by_student, colors, ylabel, title)

    # One legend for the figure, with each name once even though it appears in several panels.
    handles = {}
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside right center",
        )
    return figure


def plot_training_curves(rows: list[dict], path: Path | str) -> Path:
    """Save training_curves_figure(rows) as a PNG at DPI dots per inch and return the path.

    Creates the parent folder of path.
    """
    return _save(training_curves_figure(rows), path)


def accuracy_vs_cohort_size_figure(series: dict[str, list[tuple[int, float, float]]]) -> Figure:
    """Build a plot of mean test accuracy against cohort size with std error bars.

    series maps a label such as "dml" or "independent" to (cohort_size, mean accuracy, std)
    points, in any order, and each label gets one line. A non-finite std, such as the sample std
    of a single seed, draws an error bar of length 0. The x ticks are the cohort sizes present.
    """
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.subplots()
    cohort_sizes: set[int] = set()
    for label, points in series.items():
        if not points:
            log.warning("No points for series %r, so it is left out of the plot", label)
            continue
        ordered = sorted((int(size), float(mean), float(std)) for size, mean, std in points)
        sizes = [size for size, _, _ in ordered]
        means = [mean for _, mean, _ in ordered]
        stds = [std if math.isfinite(std) else 0.0 for _, _, std in ordered]
        cohort_sizes.update(sizes)
        axes.errorbar(sizes, means, yerr=stds, marker="o", capsize=4, label=label)

    axes.set_xlabel("cohort size")
    axes.set_ylabel("test accuracy")
    axes.set_title("Test accuracy by cohort size")
    axes.grid(alpha=0.3)
    if cohort_sizes:
        axes.set_xticks(sorted(cohort_sizes))
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
    return figure


def plot_accuracy_vs_cohort_size(
    series: dict[str, list[tuple[int, float, float]]], path: Path | str
) -> Path:
    """Save accuracy_vs_cohort_size_figure(series) as a PNG and return the path.

    Creates the parent folder of path and writes at DPI dots per inch.
    """
    return _save(accuracy_vs_cohort_size_figure(series), path)

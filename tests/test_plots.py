"""PNG figures: files written and readable, and the drawn data, labels and legends."""

import csv
import logging
import math
import warnings

import matplotlib.image
import pytest
from PIL import Image

from dml_cli.errors import DMLError
from dml_cli.plots import (
    DPI,
    accuracy_vs_cohort_size_figure,
    plot_accuracy_vs_cohort_size,
    plot_training_curves,
    training_curves_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSV_COLUMNS = ["epoch", "student", "train_loss", "val_loss", "val_acc"]


def metrics_rows() -> list[dict]:
    """Three epochs of a two-student cohort plus the ensemble, as numbers.

    student_1 has no val_loss at epoch 2, and the ensemble never has a train_loss.
    """
    rows = []
    for epoch in (1, 2, 3):
        rows.append(
            {
                "epoch": epoch,
                "student": "student_0",
                "train_loss": 2.0 / epoch,
                "val_loss": 2.2 / epoch,
                "val_acc": 0.5 + 0.1 * epoch,
            }
        )
        rows.append(
            {
                "epoch": epoch,
                "student": "student_1",
                "train_loss": 2.5 / epoch,
                "val_loss": None if epoch == 2 else 2.6 / epoch,
                "val_acc": 0.45 + 0.1 * epoch,
            }
        )
        rows.append(
            {
                "epoch": epoch,
                "student": "ensemble",
                "train_loss": "",
                "val_loss": 2.0 / epoch,
                "val_acc": 0.55 + 0.1 * epoch,
            }
        )
    return rows


def rows_through_csv(rows: list[dict], tmp_path) -> list[dict]:
    """Write rows to a metrics.csv and read them back, so every value is a string."""
    csv_path = tmp_path / "metrics.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    with csv_path.open(newline="") as file:
        return list(csv.DictReader(file))


def lines_by_label(axes) -> dict:
    return {line.get_label(): line for line in axes.get_lines()}


def legend_texts(legend) -> list[str]:
    return [text.get_text() for text in legend.get_texts()]


def assert_readable_png(path, width: int, height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    # A blank image would have a single color everywhere.
    assert pixels.min() < pixels.max()


def test_training_curves_png_readable(tmp_path):
    path = tmp_path / "curves.png"
    returned = plot_training_curves(metrics_rows(), path)
    assert returned == path
    # The figure is 15 x 4.5 inches.
    assert_readable_png(path, width=15 * DPI, height=round(4.5 * DPI))


def test_training_curves_creates_parent_folder(tmp_path):
    path = tmp_path / "run_dir" / "plots" / "curves.png"
    returned = plot_training_curves(metrics_rows(), str(path))
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_training_curves_axis_labels_and_titles():
    figure = training_curves_figure(metrics_rows())
    panels = figure.axes
    assert len(panels) == 3
    assert [axes.get_xlabel() for axes in panels] == ["epoch"] * 3
    assert [axes.get_ylabel() for axes in panels] == ["train loss", "val loss", "val accuracy"]
    assert [axes.get_title() for axes in panels] == ["Train loss", "Val loss", "Val accuracy"]


def test_training_curves_legend_names_students():
    figure = training_curves_figure(metrics_rows())
    assert len(figure.legends) == 1
    assert legend_texts(figure.legends[0]) == ["student_0", "student_1", "ensemble"]


def test_training_curves_ensemble_dashed_val_only():
    train_panel, val_loss_panel, val_acc_panel = training_curves_figure(metrics_rows()).axes
    assert "ensemble" not in lines_by_label(train_panel)
    for axes in (val_loss_panel, val_acc_panel):
        lines = lines_by_label(axes)
        assert lines["ensemble"].get_linestyle() == "--"
        assert lines["student_0"].get_linestyle() == "-"
    ensemble = lines_by_label(val_acc_panel)["ensemble"]
    assert list(ensemble.get_xdata()) == [1, 2, 3]
    assert list(ensemble.get_ydata()) == pytest.approx([0.65, 0.75, 0.85])


def test_training_curves_ensemble_train_loss_ignored():
    rows = [
        {"epoch": 1, "student": "student_0", "train_loss": 1.0, "val_acc": 0.5},
        {"epoch": 1, "student": "ensemble", "train_loss": 0.9, "val_acc": 0.6},
    ]
    train_panel, _, val_acc_panel = training_curves_figure(rows).axes
    assert list(lines_by_label(train_panel)) == ["student_0"]
    assert list(lines_by_label(val_acc_panel)) == ["student_0", "ensemble"]


def test_training_curves_student_color_consistent():
    panels = training_curves_figure(metrics_rows()).axes
    colors = [lines_by_label(axes)["student_1"].get_color() for axes in panels]
    assert len(set(colors)) == 1
    assert colors[0] != lines_by_label(panels[0])["student_0"].get_color()


def test_training_curves_skips_missing_values(tmp_path):
    rows = rows_through_csv(metrics_rows(), tmp_path)
    assert rows[4]["val_loss"] == ""
    _, val_loss_panel, _ = training_curves_figure(rows).axes

    student_1 = lines_by_label(val_loss_panel)["student_1"]
    assert list(student_1.get_xdata()) == [1, 3]
    assert list(student_1.get_ydata()) == pytest.approx([2.6, 2.6 / 3])
    student_0 = lines_by_label(val_loss_panel)["student_0"]
    assert list(student_0.get_xdata()) == [1, 2, 3]

    path = plot_training_curves(rows, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_training_curves_skips_nan_and_absent_keys():
    rows = [
        {"epoch": "1", "student": "student_0", "train_loss": "nan", "val_acc": "0.4"},
        {"epoch": "2", "student": "student_0", "train_loss": "1.5", "val_acc": "0.6"},
    ]
    train_panel, val_loss_panel, val_acc_panel = training_curves_figure(rows).axes
    train_line = lines_by_label(train_panel)["student_0"]
    assert list(train_line.get_xdata()) == [2]
    assert lines_by_label(val_loss_panel) == {}
    assert list(lines_by_label(val_acc_panel)["student_0"].get_ydata()) == pytest.approx(
        [0.4, 0.6]
    )


def test_training_curves_sorts_by_epoch():
    rows = [
        {"epoch": 3, "student": "student_0", "val_acc": 0.8},
        {"epoch": 1, "student": "student_0", "val_acc": 0.5},
        {"epoch": 2, "student": "student_0", "val_acc": 0.7},
    ]
    val_acc_panel = training_curves_figure(rows).axes[2]
    line = lines_by_label(val_acc_panel)["student_0"]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.7, 0.8])


def test_training_curves_empty_rows_still_saved(tmp_path):
    path = plot_training_curves([], tmp_path / "empty.png")
    assert_readable_png(path, width=15 * DPI, height=round(4.5 * DPI))


def test_training_curves_rejects_bad_values():
    with pytest.raises(DMLError, match="val_acc has invalid value 'high'"):
        training_curves_figure([{"epoch": "1", "student": "student_0", "val_acc": "high"}])
    with pytest.raises(DMLError, match="invalid epoch='1.5'"):
        training_curves_figure([{"epoch": "1.5", "student": "student_0", "val_acc": "0.5"}])
    with pytest.raises(DMLError, match="empty student column"):
        training_curves_figure([{"epoch": "1", "student": "", "val_acc": "0.5"}])


COHORT_SERIES = {
    "dml": [(4, 0.74, 0.01), (2, 0.71, 0.02), (3, 0.73, 0.015)],
    "independent": [(2, 0.68, 0.02), (3, 0.685, math.nan), (4, 0.69, 0.01)],
}


def test_cohort_size_png_readable(tmp_path):
    path = tmp_path / "sweep_dir" / "accuracy_vs_cohort_size.png"
    returned = plot_accuracy_vs_cohort_size(COHORT_SERIES, path)
    assert returned == path
    assert_readable_png(path, width=round(6.5 * DPI), height=round(4.5 * DPI))


def test_cohort_size_labels_ticks_legend():
    figure = accuracy_vs_cohort_size_figure(COHORT_SERIES)
    (axes,) = figure.axes
    assert axes.get_xlabel() == "cohort size"
    assert axes.get_ylabel() == "test accuracy"
    assert axes.get_title() != ""
    assert list(axes.get_xticks()) == [2, 3, 4]
    assert legend_texts(axes.get_legend()) == ["dml", "independent"]


def test_cohort_size_points_sorted_with_errors():
    (axes,) = accuracy_vs_cohort_size_figure(COHORT_SERIES).axes
    dml_container, independent_container = axes.containers
    data_line, _caps, (bar_lines,) = dml_container
    assert list(data_line.get_xdata()) == [2, 3, 4]
    assert list(data_line.get_ydata()) == pytest.approx([0.71, 0.73, 0.74])
    # Each error bar segment runs from mean - std to mean + std.
    segments = bar_lines.get_segments()
    assert [segment[0][1] for segment in segments] == pytest.approx([0.69, 0.715, 0.73])
    assert [segment[1][1] for segment in segments] == pytest.approx([0.73, 0.745, 0.75])

    # The nan std of the independent series at cohort size 3 becomes a bar of length 0.
    _, _, (independent_bars,) = independent_container
    middle = independent_bars.get_segments()[1]
    assert middle[0][1] == pytest.approx(0.685)
    assert middle[1][1] == pytest.approx(0.685)


def test_cohort_size_empty_series_saved(tmp_path):
    path = plot_accuracy_vs_cohort_size({"dml": []}, tmp_path / "empty.png")
    assert_readable_png(path, width=round(6.5 * DPI), height=round(4.5 * DPI))


def test_crowded_legend_logs_instead_of_warning(tmp_path, caplog):
    series = {f"{'very long label ' * 12}{index}": [(1, 0.9, 0.01)] for index in range(40)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="dml_cli.plots"):
            path = plot_accuracy_vs_cohort_size(series, tmp_path / "crowded.png")

    assert path.stat().st_size > 0
    assert "leave no room for the plots" in caplog.text

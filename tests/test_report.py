"""`dml-report` on hand-made sweep dirs: rows, statistics, files, failures and bad folders."""

import csv
import json
import logging
import math

import pytest
import yaml
from omegaconf import OmegaConf

from dml_cli.report import (
    ReportCallback,
    collect_report,
    main,
    markdown_text,
    plot_series,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NON_FINITE_ERROR = "Non-finite loss at step 12 for student_1: lower optimizer.lr."

# (cohort.size, loss, seed, students' (val acc, test acc), ensemble test acc), in the order
# Hydra numbers the jobs of `cohort.size=2,3 seed=0,1 loss=dml,independent`.
FINISHED_JOBS = [
    (2, "dml", 0, [(0.82, 0.80), (0.88, 0.90)], 0.92),
    (2, "independent", 0, [(0.80, 0.78), (0.76, 0.74)], 0.80),
    # The student with the best val acc (student_0) is not the one with the best test acc.
    (2, "dml", 1, [(0.90, 0.86), (0.80, 0.88)], 0.90),
    (2, "independent", 1, [(0.78, 0.80), (0.74, 0.76)], 0.82),
    (3, "dml", 0, [(0.90, 0.91), (0.89, 0.90), (0.88, 0.89)], 0.94),
    (3, "independent", 0, [(0.80, 0.81), (0.79, 0.80), (0.78, 0.79)], 0.85),
    (3, "dml", 1, [(0.92, 0.93), (0.91, 0.92), (0.90, 0.91)], 0.96),
]


def write_job(sweep_dir, num, overrides, summary=None, failed=None):
    job_dir = sweep_dir / str(num)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))
    if failed is not None:
        (job_dir / "failed.json").write_text(json.dumps(failed))
    return job_dir


def make_summary(loss, seed, students, ensemble_test_acc, wall_time_s=10.0):
    test_accs = [test_acc for _, test_acc in students]
    return {
        "dataset": "digits",
        "cohort": "homogeneous",
        "loss": loss,
        "seed": seed,
        "students": [
            {"name": f"student_{k}", "arch": "lenet5", "best_val_acc": val_acc, "test_acc": test}
            for k, (val_acc, test) in enumerate(students)
        ],
        "ensemble": {"val_acc": 0.0, "test_acc": ensemble_test_acc},
        "student_mean": {"val_acc": 0.0, "test_acc": sum(test_accs) / len(test_accs)},
        "wall_time_s": wall_time_s,
    }


def job_overrides(size, loss, seed):
    return ["dataset=digits", f"cohort.size={size}", f"seed={seed}", f"loss={loss}"]


@pytest.fixture
def sweep_dir(tmp_path):
    """Seven finished jobs, one failed on a non-finite loss and one that never finished."""
    sweep_dir = tmp_path / "multirun" / "2024-01-01" / "12-00-00-000000"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for size, loss, seed, students, ensemble in FINISHED_JOBS:
        summary = make_summary(loss, seed, students, ensemble, wall_time_s=10.0 + num)
        write_job(sweep_dir, num, job_overrides(size, loss, seed), summary=summary)
        num += 1
    failed = {"status": "failed", "error": NON_FINITE_ERROR}
    write_job(sweep_dir, num, job_overrides(3, "dml", 2), failed=failed)
    write_job(sweep_dir, num + 1, job_overrides(3, "independent", 1))
    return sweep_dir


def read_csv(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_rows_group_seeds_per_setting(sweep_dir):
    report = collect_report(sweep_dir)

    settings = [(row.overrides["cohort.size"], row.overrides["loss"]) for row in report.rows]
    assert settings == [("2", "dml"), ("2", "independent"), ("3", "dml"), ("3", "independent")]
    assert [len(row.finished) for row in report.rows] == [2, 2, 2, 1]
    assert [row.num_failed for row in report.rows] == [0, 0, 1, 1]
    assert [row.cohort_size for row in report.rows] == [2, 2, 3, 3]
    assert report.varying_keys == ["cohort.size", "loss"]
    assert report.common_overrides == ["dataset=digits"]


def test_stats_are_mean_and_sample_std(sweep_dir):
    row = collect_report(sweep_dir).rows[0]

    mean, std = row.stat("student_mean_test_acc")
    assert mean == pytest.approx(0.86)
    assert std == pytest.approx(math.sqrt(2 * 0.01**2))
    mean, std = row.stat("ensemble_test_acc")
    assert mean == pytest.approx(0.91)
    assert std == pytest.approx(math.sqrt(2 * 0.01**2))
    assert row.wall_time_s() == pytest.approx((10.0 + 12.0) / 2)


def test_best_student_chosen_by_val_acc(sweep_dir):
    row = collect_report(sweep_dir).rows[0]

    # Seed 0 picks student_1 (test 0.90), seed 1 picks student_0 (test 0.86, not 0.88).
    mean, std = row.stat("best_student_test_acc")
    assert mean == pytest.approx(0.88)
    assert std == pytest.approx(math.sqrt(2 * 0.02**2))


def test_single_seed_has_no_std(sweep_dir):
    row = collect_report(sweep_dir).rows[3]

    mean, std = row.stat("student_mean_test_acc")
    assert mean == pytest.approx(0.80)
    assert math.isnan(std)


def test_failed_and_incomplete_jobs_keep_reason(sweep_dir):
    report = collect_report(sweep_dir)

    failed = {job.job: job for job in report.failed_jobs}
    assert sorted(failed) == ["7", "8"]
    assert failed["7"].status == "failed"
    assert failed["7"].error == NON_FINITE_ERROR
    assert failed["7"].seed == "2"
    assert failed["8"].status == "incomplete"
    assert "no summary.json" in failed["8"].error
    assert "8/train.log" in failed["8"].error


def test_write_report_creates_three_files(sweep_dir):
    write_report(sweep_dir)

    for name in ("report.csv", "report.md", "report.png"):
        assert (sweep_dir / name).is_file(), name
    assert (sweep_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_csv_has_row_per_setting(sweep_dir):
    write_report(sweep_dir)
    rows = read_csv(sweep_dir / "report.csv")

    assert len(rows) == 4
    assert list(rows[0])[:4] == ["dataset", "cohort.size", "loss", "cohort_size"]
    assert [row["loss"] for row in rows] == ["dml", "independent", "dml", "independent"]
    assert [row["seeds"] for row in rows] == ["2", "2", "2", "1"]
    assert [row["seed_values"] for row in rows] == ["0 1", "0 1", "0 1", "0"]
    assert [row["failed"] for row in rows] == ["0", "0", "1", "1"]
    assert float(rows[0]["student_mean_test_acc_mean"]) == pytest.approx(0.86)
    assert float(rows[0]["best_student_test_acc_mean"]) == pytest.approx(0.88)
    assert float(rows[0]["ensemble_test_acc_std"]) == pytest.approx(0.014142, abs=1e-6)
    assert rows[3]["student_mean_test_acc_std"] == ""
    assert float(rows[0]["wall_time_s_mean"]) == pytest.approx(11.0)


def test_markdown_lists_failed_jobs(sweep_dir):
    text = markdown_text(collect_report(sweep_dir))

    assert "| cohort.size | loss | cohort size | seeds | failed |" in text
    assert "| 2 | dml | 2 | 2 | 0 | 0.8600 ± 0.0141 | 0.8800 ± 0.0283 | 0.9100 ± 0.0141 |" in text
    assert "Common overrides: dataset=digits." in text
    assert "## Failed jobs" in text
    assert f"| 7 | dataset=digits cohort.size=3 loss=dml seed=2 | {NON_FINITE_ERROR} |" in text
    assert "| 8 | dataset=digits cohort.size=3 loss=independent seed=1 | no summary.json" in text


def test_plot_series_has_both_losses(sweep_dir):
    series = plot_series(collect_report(sweep_dir))

    assert sorted(series) == [
        "dml, ensemble",
        "dml, student mean",
        "independent, ensemble",
        "independent, student mean",
    ]
    sizes_means = [(size, round(mean, 4)) for size, mean, _ in series["dml, student mean"]]
    assert sizes_means == [(2, 0.86), (3, 0.91)]
    assert [size for size, _, _ in series["independent, ensemble"]] == [2, 3]


def test_plot_series_split_by_other_override(tmp_path):
    for num, lr in enumerate(("0.1", "0.01")):
        overrides = ["cohort=two_lenets", f"optimizer.lr={lr}", "seed=0"]
        summary = make_summary("dml", 0, [(0.9, 0.8), (0.8, 0.7)], 0.85)
        write_job(tmp_path, num, overrides, summary=summary)

    series = plot_series(collect_report(tmp_path))

    assert sorted(series) == [
        "dml optimizer.lr=0.01, ensemble",
        "dml optimizer.lr=0.01, student mean",
        "dml optimizer.lr=0.1, ensemble",
        "dml optimizer.lr=0.1, student mean",
    ]


def test_jobs_sorted_by_number(tmp_path):
    for num in (10, 2, 1):
        summary = make_summary("dml", num, [(0.9, 0.5)], 0.5)
        write_job(tmp_path, num, [f"seed={num}", f"trainer.epochs={num}"], summary=summary)

    report = collect_report(tmp_path)

    assert [job.job for job in report.jobs] == ["1", "2", "10"]
    assert [row.overrides["trainer.epochs"] for row in report.rows] == ["1", "2", "10"]


def test_invalid_summary_counts_as_failed(tmp_path):
    job_dir = write_job(tmp_path, 0, ["seed=0"])
    (job_dir / "summary.json").write_text('{"students": [')

    job = collect_report(tmp_path).jobs[0]

    assert job.status == "failed"
    assert job.error.startswith("invalid summary.json: JSONDecodeError")


def test_console_table_shows_settings(sweep_dir, capsys):
    main([str(sweep_dir)])
    stdout = capsys.readouterr().out

    assert "cohort.size" in stdout
    assert "0.8600 ± 0.0141" in stdout
    assert f"failed job 7 (dataset=digits cohort.size=3 loss=dml seed=2): {NON_FINITE_ERROR}" in (
        stdout
    )
    assert "incomplete job 8" in stdout
    assert f"Wrote report.csv, report.md, report.png to {sweep_dir}" in stdout


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("missing", "not found"),
        ("empty", "No jobs found"),
        ("run", "is a single run folder, not a sweep dir"),
        ("outputs", "is not a sweep dir but contains sweep dirs"),
    ],
)
def test_bad_folder_gives_one_line(tmp_path, capsys, folder, expected):
    (tmp_path / "empty").mkdir()
    write_job(tmp_path, "run", ["seed=0"], summary=make_summary("dml", 0, [(0.9, 0.8)], 0.8))
    sweep = tmp_path / "outputs" / "multirun" / "2024-01-01" / "12-00-00-000000"
    write_job(sweep, 0, ["seed=0"])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / folder)])

    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dml-report: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / folder / "report.csv").exists()


def test_callback_writes_report(sweep_dir, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})

    ReportCallback().on_multirun_end(config=config)

    assert len(read_csv(sweep_dir / "report.csv")) == 4
    assert "0.8600 ± 0.0141" in capsys.readouterr().out


def test_callback_logs_failure_without_raising(tmp_path, caplog):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})

    with caplog.at_level(logging.WARNING, logger="dml_cli.report"):
        ReportCallback().on_multirun_end(config=config)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(f"Failed to write the sweep report for {tmp_path}")
    assert "No jobs found" in warnings[0].getMessage()

"""The installed `dml-train` console script, run in a subprocess from a temporary folder."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

DML_TRAIN = shutil.which("dml-train")
FAST = ["dataset=digits", "trainer.epochs=2", "cohort=two_lenets"]


def run_cli(args, cwd, env_extra=None, timeout=300):
    assert DML_TRAIN is not None, "dml-train is not installed: run the README's install command"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run(
        [DML_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def single_run_dir(cwd):
    runs = [path for path in (cwd / "outputs").glob("*/*") if path.parent.name != "multirun"]
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("single")
    result = run_cli(FAST, cwd)
    assert result.returncode == 0, result.stderr
    return cwd, single_run_dir(cwd), result


def test_run_writes_expected_files(digits_run):
    _, run_dir, _ = digits_run

    for name in ("metrics.csv", "summary.json", "train.log", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    for student in ("student_0", "student_1"):
        for which in ("best", "last"):
            assert (run_dir / "checkpoints" / f"{student}_{which}.pt").is_file()
    assert (run_dir / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_dir.parent.parent.name == "outputs"


def test_metrics_csv_has_row_per_student_epoch(digits_run):
    _, run_dir, _ = digits_run

    rows = read_metrics(run_dir / "metrics.csv")

    assert [(row["epoch"], row["student"]) for row in rows] == [
        (str(epoch), student)
        for epoch in (1, 2)
        for student in ("student_0", "student_1", "ensemble")
    ]
    student_row = rows[0]
    assert student_row["arch"] == "lenet5"
    total = float(student_row["train_loss"])
    parts = float(student_row["train_ce_loss"]) + float(student_row["train_kl_loss"])
    assert total == pytest.approx(parts, rel=1e-4)
    assert 0 <= float(student_row["val_acc"]) <= 1
    assert float(student_row["lr"]) == 0.05
    assert rows[2]["train_loss"] == ""
    assert 0 <= float(rows[2]["val_acc"]) <= 1


def test_summary_reports_students_and_ensemble(digits_run):
    _, run_dir, _ = digits_run

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.csv")

    assert summary["version"]
    assert summary["wall_time_s"] > 0
    assert [s["name"] for s in summary["students"]] == ["student_0", "student_1"]
    for student in summary["students"]:
        val_accs = [float(r["val_acc"]) for r in rows if r["student"] == student["name"]]
        assert student["arch"] == "lenet5"
        assert student["num_params"] > 1000
        assert student["best_val_acc"] == pytest.approx(max(val_accs), abs=1e-6)
        assert student["best_epoch"] == val_accs.index(max(val_accs)) + 1
        assert 0 <= student["test_acc"] <= 1
    assert set(summary["ensemble"]) == {"val_acc", "test_acc"}


def test_checkpoints_load_weights_only(digits_run):
    _, run_dir, _ = digits_run

    checkpoint = torch.load(
        run_dir / "checkpoints" / "student_1_best.pt", map_location="cpu", weights_only=True
    )

    assert checkpoint["arch"] == "lenet5"
    assert checkpoint["name"] == "student_1"
    assert checkpoint["arch_args"] == {}
    assert checkpoint["num_classes"] == 10
    assert checkpoint["init_seed"] == 1
    assert any(key.endswith("weight") for key in checkpoint["state_dict"])


def test_console_shows_rows_and_table(digits_run):
    _, run_dir, result = digits_run

    assert "best val acc student_0" in result.stdout
    assert "ensemble" in result.stdout
    log = (run_dir / "train.log").read_text()
    assert "best val acc student_0" in log
    assert "init seed 1" in log


def test_same_seed_same_metrics(digits_run, tmp_path):
    _, first_dir, _ = digits_run

    result = run_cli(FAST, tmp_path)

    assert result.returncode == 0, result.stderr
    second = read_metrics(single_run_dir(tmp_path) / "metrics.csv")
    first = read_metrics(first_dir / "metrics.csv")
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in first]
    assert strip == [{k: v for k, v in row.items() if k != "time_s"} for row in second]


def test_multirun_writes_numbered_jobs(tmp_path):
    result = run_cli(
        ["-m", "dataset=digits", "trainer.epochs=1", "cohort=two_lenets", "seed=0,1"], tmp_path
    )

    assert result.returncode == 0, result.stderr
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    sweep_dir = sweeps[0]
    assert (sweep_dir / "multirun.yaml").is_file()
    for job in ("0", "1"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        overrides = yaml.safe_load((sweep_dir / job / ".hydra" / "overrides.yaml").read_text())
        assert summary["seed"] == int(job)
        assert f"seed={job}" in overrides


def test_help_and_cfg_job(tmp_path):
    help_result = run_cli(["--help"], tmp_path)
    cfg_result = run_cli(["--cfg", "job", "cohort=four_lenets"], tmp_path)

    assert help_result.returncode == 0
    assert help_result.stdout.startswith("dml-train: train a cohort")
    assert "cohort: four_lenets, homogeneous, lenet_mlp" in help_result.stdout
    assert "dataset: cifar10, cifar100, digits" in help_result.stdout
    assert cfg_result.returncode == 0
    assert yaml.safe_load(cfg_result.stdout)["cohort"]["name"] == "four_lenets"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cohort.students.0.arch=lenet7"], "lenet7"),
        (["cohort.students=[]"], "cohort.students"),
        (["loss.temperature=0"], "loss.temperature=0"),
        (["loss.mimicry_weight=-1"], "loss.mimicry_weight=-1"),
        (["loss.update=parallel"], "loss.update"),
        (["trainer.batch_size=0"], "trainer.batch_size=0"),
        (["dataset=mnist", "dataset.download=false"], "dataset=digits"),
        (["cohort=three_lenet"], "Available options in 'cohort': four_lenets"),
        (["trainer.epoch=3"], "trainer.epoch"),
        (["+trainer.epoch=3"], "Unknown key trainer.epoch"),
        (["optimizer.lr=-1"], "optimizer.lr=-1"),
        (["loss.temperature=inf"], "loss.temperature=inf"),
        (["resume=no-such-run"], "no such run folder"),
    ],
)
def test_user_errors_give_one_line(tmp_path, args, expected):
    result = run_cli(["dataset=digits", "trainer.epochs=1", *args], tmp_path)

    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dml-train: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_config_errors_write_no_run_folder(tmp_path):
    for args in (["cohort=three_lenet"], ["loss.temperature=0"], ["+trainer.epoch=3"]):
        result = run_cli(["dataset=digits", *args], tmp_path)

        assert result.returncode == 2
        assert not (tmp_path / "outputs").exists(), args


def test_resume_of_plain_folder_rejected(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()

    result = run_cli([f"resume={plain}"], tmp_path)

    assert result.returncode == 2
    assert "not a dml-train run folder" in result.stderr
    assert list(plain.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_error(tmp_path):
    result = run_cli(["dataset=digits", "device=cuda"], tmp_path)

    assert result.returncode == 2
    assert "device=cuda" in result.stderr
    assert "device=cpu" in result.stderr


def test_missing_dataset_names_root_and_files(tmp_path):
    empty = tmp_path / "no-data"
    result = run_cli(
        ["dataset=mnist", f"dataset.root={empty}", "dataset.download=false"], tmp_path
    )

    assert result.returncode == 2
    assert str(empty) in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr
    run_dir = single_run_dir(tmp_path)
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.csv").exists()


def test_full_error_shows_traceback(tmp_path):
    result = run_cli(["dataset=digits", "loss.temperature=0"], tmp_path, {"HYDRA_FULL_ERROR": "1"})

    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "ConfigError" in result.stderr


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dml_cli.train", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "three_lenets" in result.stdout

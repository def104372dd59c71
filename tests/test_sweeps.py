"""Multiruns of the installed `dml-train`: the sweep report, launchers, Optuna and run folders."""

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import submitit
import yaml
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from PIL import Image

from dml_cli.config import config_dir
from dml_cli.report import collect_report, plot_series

DML_TRAIN = shutil.which("dml-train")
DML_REPORT = shutil.which("dml-report")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_script(script, args, cwd, timeout=300):
    assert script is not None, "the console scripts are not installed: pip install -e '.[dev]'"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def only_sweep_dir(cwd):
    sweep_dirs = list((cwd / "outputs" / "multirun").glob("*/*"))
    assert len(sweep_dirs) == 1, sweep_dirs
    return sweep_dirs[0]


def job_dirs(sweep_dir):
    return sorted(
        (path for path in sweep_dir.iterdir() if path.name.isdigit()), key=lambda p: int(p.name)
    )


def read_csv(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def compose_train(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def cohort_size_sweep(tmp_path_factory):
    """The acceptance sweep on digits with one epoch: 4 cohort sizes x 2 seeds x 2 losses."""
    cwd = tmp_path_factory.mktemp("cohort_size_sweep")
    args = [
        "-m",
        "dataset=digits",
        "trainer.epochs=1",
        "device=cpu",
        "cohort=homogeneous",
        "cohort.size=1,2,3,4",
        "seed=0,1",
        "loss=dml,independent",
    ]
    result = run_script(DML_TRAIN, args, cwd)
    assert result.returncode == 0, result.stderr
    return only_sweep_dir(cwd), cwd, result


def test_sweep_runs_every_job(cohort_size_sweep):
    sweep_dir, _, _ = cohort_size_sweep

    assert (sweep_dir / "multirun.yaml").is_file()
    jobs = job_dirs(sweep_dir)
    assert [job.name for job in jobs] == [str(num) for num in range(16)]
    for job in jobs:
        assert (job / "summary.json").is_file(), job
        assert not (job / "failed.json").exists(), job


def test_sweep_callback_prints_report(cohort_size_sweep):
    sweep_dir, cwd, result = cohort_size_sweep

    for name in ("report.csv", "report.md", "report.png"):
        assert (sweep_dir / name).is_file(), name
    assert "16 jobs in 8 settings: 16 finished, 0 failed or incomplete." in result.stdout
    # The sweep dir is relative to the working folder, as hydra.sweep.dir gives it.
    relative_dir = sweep_dir.relative_to(cwd)
    assert f"Wrote report.csv, report.md, report.png to {relative_dir}" in result.stdout


def test_dml_report_rows_match_summaries(cohort_size_sweep):
    sweep_dir, _, _ = cohort_size_sweep
    for name in ("report.csv", "report.md", "report.png"):
        (sweep_dir / name).unlink()

    result = run_script(DML_REPORT, [str(sweep_dir)], sweep_dir.parent)

    assert result.returncode == 0, result.stderr
    rows = read_csv(sweep_dir / "report.csv")
    assert len(rows) == 8
    assert [(row["cohort.size"], row["loss"]) for row in rows] == [
        (size, loss) for size in "1234" for loss in ("dml", "independent")
    ]
    assert [row["cohort_size"] for row in rows] == [size for size in "1234" for _ in range(2)]
    assert all(row["seeds"] == "2" and row["seed_values"] == "0 1" for row in rows)
    assert all(row["failed"] == "0" for row in rows)
    # The first setting (cohort.size=1, loss=dml) is jobs 0 and 2.
    accs = [
        json.loads((sweep_dir / num / "summary.json").read_text())["ensemble"]["test_acc"]
        for num in ("0", "2")
    ]
    assert float(rows[0]["ensemble_test_acc_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-6)
    markdown = (sweep_dir / "report.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 2 + 8  # header, separator and one line per setting
    assert "Common overrides: dataset=digits trainer.epochs=1 device=cpu cohort=homogeneous." in (
        markdown
    )


def test_report_plot_has_both_curves(cohort_size_sweep):
    sweep_dir, _, _ = cohort_size_sweep

    series = plot_series(collect_report(sweep_dir))

    for loss in ("dml", "independent"):
        for curve in ("student mean", "ensemble"):
            points = series[f"{loss}, {curve}"]
            assert [size for size, _, _ in points] == [1, 2, 3, 4]
            assert all(0.0 <= mean <= 1.0 for _, mean, _ in points)
    assert (sweep_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(sweep_dir / "report.png") as image:
        width, height = image.size
    assert width > 300
    assert height > 200


def missing_mnist_sweep(tmp_path):
    """Overrides of a two-job sweep whose first job finds no MNIST files when it loads them.

    Preflight cannot see a missing dataset, so that job fails when it runs.
    """
    root = tmp_path / "no-data"
    return [
        "dataset=mnist,synthetic",
        # Hydra's basic sweeper writes a bool back as False, so the job's overrides match this.
        "dataset.download=False",
        f"dataset.root={root}",
        "trainer.epochs=1",
        "cohort=homogeneous",
        "cohort.size=1",
    ]


def test_failed_job_recorded_sweep_continues(tmp_path):
    args = missing_mnist_sweep(tmp_path)
    result = run_script(DML_TRAIN, ["-m", *args], tmp_path)

    assert result.returncode == 1
    sweep_dir = only_sweep_dir(tmp_path)
    failed = json.loads((sweep_dir / "0" / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert f"Dataset mnist not found in {tmp_path / 'no-data'}" in failed["error"]
    assert (sweep_dir / "1" / "summary.json").is_file()
    rows = read_csv(sweep_dir / "report.csv")
    assert [(row["dataset"], row["seeds"], row["failed"]) for row in rows] == [
        ("mnist", "0", "1"),
        ("synthetic", "1", "0"),
    ]
    markdown = (sweep_dir / "report.md").read_text()
    overrides = " ".join(["dataset=mnist", *args[1:]])
    assert f"| 0 | {overrides} | {failed['error']} |" in markdown
    assert f"failed job 0 ({overrides}): {failed['error']}" in result.stdout


def test_joblib_launcher_runs_two_jobs(tmp_path):
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "dataset=digits",
        "trainer.epochs=1",
        "cohort=two_lenets",
        "seed=0,1",
    ]
    result = run_script(DML_TRAIN, args, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    sweep_dir = only_sweep_dir(tmp_path)
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 2
    for seed, job in enumerate(jobs):
        assert json.loads((job / "summary.json").read_text())["seed"] == seed
        hydra_cfg = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["launcher"]["_target_"].endswith("joblib_launcher.JoblibLauncher")
    rows = read_csv(sweep_dir / "report.csv")
    assert [(row["seeds"], row["seed_values"]) for row in rows] == [("2", "0 1")]


def test_joblib_failed_job_exits_nonzero(tmp_path):
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    args += missing_mnist_sweep(tmp_path)

    result = run_script(DML_TRAIN, args, tmp_path)

    assert result.returncode == 1
    sweep_dir = only_sweep_dir(tmp_path)
    assert (sweep_dir / "0" / "failed.json").is_file()
    assert (sweep_dir / "1" / "summary.json").is_file()


def test_optuna_search_runs_trials(tmp_path):
    args = ["-m", "+search=digits_optuna", "trainer.epochs=1", "hydra.sweeper.n_trials=3"]
    result = run_script(DML_TRAIN, args, tmp_path)

    assert result.returncode == 0, result.stderr
    sweep_dir = only_sweep_dir(tmp_path)
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 3
    val_accs = []
    for job in jobs:
        overrides = dict(
            line.split("=", 1)
            for line in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        assert 1.0 <= float(overrides["loss.temperature"]) <= 6.0
        assert 0.005 <= float(overrides["optimizer.lr"]) <= 0.2
        summary = json.loads((job / "summary.json").read_text())
        assert summary["dataset"] == "digits"
        assert summary["cohort"] == "two_lenets"
        val_accs.append(summary["student_mean"]["val_acc"])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    # The sweeper maximises the students' mean val accuracy that dml-train returns.
    assert results["best_value"] == pytest.approx(max(val_accs))
    assert set(results["best_params"]) == {"loss.temperature", "optimizer.lr"}
    assert len(read_csv(sweep_dir / "report.csv")) == 3


def test_optuna_search_config_composes():
    cfg = compose_train(["+search=digits_optuna"])

    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize"
    assert sweeper.storage is None
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert dict(sweeper.params) == {
        "loss.temperature": "interval(1.0, 6.0)",
        "optimizer.lr": "tag(log, interval(0.005, 0.2))",
    }
    assert cfg.dataset.name == "digits"
    assert cfg.cohort.name == "two_lenets"
    assert cfg.loss.name == "dml"


def test_joblib_launcher_config_composes():
    cfg = compose_train(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])

    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    )
    assert launcher.n_jobs == 2


@pytest.mark.parametrize("option", ["slurm", "submitit_slurm"])
def test_slurm_launcher_config_composes(option):
    cfg = compose_train([f"hydra/launcher={option}", "hydra.launcher.partition=gpu"])

    launcher = cfg.hydra.launcher
    assert (
        launcher._target_
        == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.partition == "gpu"
    if option == "slurm":
        assert launcher.timeout_min == 240
        assert launcher.gpus_per_node == 1
        assert launcher.cpus_per_task == 8
        assert launcher.mem_gb == 32
        assert launcher.array_parallelism == 32


def test_slurm_launcher_writes_sbatch_script(tmp_path, monkeypatch):
    # submitit looks for srun on PATH, and map_array is replaced, so nothing is submitted.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted = {}

    def fake_map_array(executor, function, *job_args):
        submitted["executor"] = executor
        submitted["job_overrides"] = job_args[0]
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    sweep_dir = tmp_path / "sweep"
    cfg = compose_train(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={sweep_dir}"]
    )

    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)

    assert submitted["job_overrides"] == (["seed=0"], ["seed=1"])
    script = submitted["executor"]._executor._make_submission_file_text("dml-train", "0")
    for line in (
        "--partition=gpu",
        "--time=240",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=32GB",
    ):
        assert f"#SBATCH {line}\n" in script, line
    assert Path(script.split("--output=")[1].split("/.submitit/")[0]) == sweep_dir


def test_report_callback_declared():
    cfg = compose_train([])

    callback = instantiate(cfg.hydra.callbacks.report)

    assert isinstance(callback, Callback)
    assert type(callback).__module__ == "dml_cli.report"


def test_simultaneous_runs_get_own_folders(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [DML_TRAIN, "dataset=digits", "trainer.epochs=0", "cohort=two_lenets", "device=cpu"]
    processes = [
        subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()

    run_dirs = [
        path for path in (tmp_path / "outputs").glob("*/*") if path.parent.name != "multirun"
    ]
    assert len(run_dirs) == 3, run_dirs
    for run_dir in run_dirs:
        assert (run_dir / "summary.json").is_file(), run_dir

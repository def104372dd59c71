"""Config validation: each bad value is one line naming the key, the value and the valid range."""

import csv
import logging
import os
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir

from dml_cli import train
from dml_cli.config import config_dir, validate_config
from dml_cli.errors import ConfigError

DML_TRAIN = shutil.which("dml-train")

# (overrides, texts the one-line error must contain: the key, the value and the valid range)
INVALID = {
    "unknown_arch": (
        ["cohort=two_lenets", "cohort.students.1.arch=lenet6"],
        ["cohort.students[1].arch", "'lenet6'", "student_1", "lenet5", "resnet32"],
    ),
    "empty_cohort": (["cohort.students=[]"], ["cohort.students", "empty", "at least one"]),
    "zero_temperature": (["loss.temperature=0"], ["loss.temperature=0.0", "> 0"]),
    "negative_temperature": (["loss.temperature=-2"], ["loss.temperature=-2.0", "> 0"]),
    "negative_mimicry_weight": (
        ["loss.mimicry_weight=-0.5"],
        ["loss.mimicry_weight=-0.5", ">= 0"],
    ),
    "zero_batch_size": (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
    "negative_epochs": (["trainer.epochs=-1"], ["trainer.epochs=-1", ">= 0"]),
    "digits_val_size": (
        ["dataset=digits", "dataset.val_size=1437"],
        ["dataset.val_size=1437", "1437-image train split of digits", "[1, 1436]"],
    ),
    "mnist_val_size": (
        ["dataset=mnist", "dataset.val_size=60000"],
        ["dataset.val_size=60000", "60000-image train split of mnist", "[1, 59999]"],
    ),
    "synthetic_val_size": (
        ["dataset=synthetic", "dataset.num_train=100", "dataset.val_size=100"],
        ["dataset.val_size=100", "100-image train split of synthetic", "[1, 99]"],
    ),
    "unknown_update": (
        ["loss.update=parallel"],
        ["loss.update='parallel'", "simultaneous", "sequential"],
    ),
    "unknown_mimicry": (["loss.mimicry=mean"], ["loss.mimicry='mean'", "pairwise", "ensemble"]),
    "zero_step_size": (
        ["scheduler=step", "scheduler.step_size=0"],
        ["scheduler.step_size=0", ">= 1"],
    ),
    "negative_step_size": (
        ["scheduler=step", "scheduler.step_size=-3"],
        ["scheduler.step_size=-3", ">= 1"],
    ),
    "float_step_size": (
        ["scheduler=step", "scheduler.step_size=1.5"],
        ["scheduler.step_size=1.5", "integer"],
    ),
    "zero_t_max": (["scheduler=cosine", "scheduler.T_max=0"], ["scheduler.T_max=0", ">= 1"]),
    "zero_gamma": (["scheduler=step", "scheduler.gamma=0"], ["scheduler.gamma=0", "> 0"]),
    "negative_gamma": (
        ["scheduler=step", "scheduler.gamma=-0.1"],
        ["scheduler.gamma=-0.1", "> 0"],
    ),
    "negative_eta_min": (
        ["scheduler=cosine", "scheduler.eta_min=-0.01"],
        ["scheduler.eta_min=-0.01", ">= 0"],
    ),
    "zero_milestone": (
        [
            "scheduler=step",
            "scheduler._target_=torch.optim.lr_scheduler.MultiStepLR",
            "~scheduler.step_size",
            "+scheduler.milestones=[0,2]",
        ],
        ["scheduler.milestones=[0, 2]", "integers >= 1"],
    ),
}
# These cases also run through the real console script, started all at once because each start
# costs seconds of imports. tests/test_cli.py runs the other cases through it.
CLI_CASES = ["negative_epochs", "digits_val_size", "unknown_mimicry"]
FULL_ERROR_CASE = "zero_temperature"


def compose_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("train", overrides=list(overrides))


def cli_env(full_error=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return env


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_value_names_key(case):
    overrides, expected = INVALID[case]
    cfg = compose_cfg(overrides)

    with pytest.raises(ConfigError) as error:
        validate_config(cfg)

    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_valid_config_passes():
    validate_config(compose_cfg(["dataset=digits", "dataset.val_size=1436"]))
    validate_config(compose_cfg(["dataset=synthetic", "loss.mimicry_weight=0"]))


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run every CLI case at once, each in its own folder, and collect the results."""
    assert DML_TRAIN is not None, "dml-train is not installed"
    cases = [(case, False) for case in CLI_CASES] + [(FULL_ERROR_CASE, True)]
    processes = {}
    for case, full_error in cases:
        cwd = tmp_path_factory.mktemp(case)
        processes[case, full_error] = (
            cwd,
            subprocess.Popen(
                [DML_TRAIN, *INVALID[case][0], "hydra.run.dir=run"],
                cwd=cwd,
                env=cli_env(full_error),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for key, (cwd, process) in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[key] = (cwd, process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects_invalid_value(cli_results, case):
    cwd, returncode, stdout, stderr = cli_results[case, False]

    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dml-train: error: ")
    for text in INVALID[case][1]:
        assert text in lines[0]
    assert "Traceback" not in stdout + stderr
    # Validation runs before Hydra creates the run folder, so nothing was written at all.
    assert not (cwd / "run").exists()


def test_full_error_shows_traceback(cli_results):
    _, returncode, _, stderr = cli_results[FULL_ERROR_CASE, True]

    assert returncode != 0
    assert "Traceback" in stderr
    assert "ConfigError: Invalid loss.temperature=0.0: it must be finite and > 0." in stderr


def test_batch_larger_than_train_split(tmp_path, caplog):
    # 64 images less a val split of 6 leave 58 train images, fewer than one batch of 128.
    cfg = compose_cfg(
        [
            "dataset=synthetic",
            "dataset.num_train=64",
            "dataset.num_test=32",
            "dataset.shape=[1,8,8]",
            "cohort=two_lenets",
            "device=cpu",
            "trainer.batch_size=128",
            "trainer.epochs=2",
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.WARNING, logger="dml_cli.train"):
            summary = train.train(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [
        "trainer.batch_size=128 is larger than the 58-image train split: each epoch trains on "
        "one partial batch of 58 images."
    ]
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["student"] != "ensemble"]
    assert len(rows) == 4
    for row in rows:
        assert float(row["train_loss"]) > 1.0
        assert float(row["train_acc"]) > 0.0
    assert summary["epochs"] == 2

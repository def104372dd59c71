"""Preflight of dml-train command lines: a mistake stops the program before any folder is written.

Most tests call `check_command_line` in this process from an empty working folder. Tests run as
root, for which os.access reports every folder writable, so the tests of unwritable folders
make os.access report them as a user without write permission would see them.
"""

import os
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from dml_cli import preflight
from dml_cli.config import config_dir
from dml_cli.errors import CheckpointError, ConfigError
from dml_cli.preflight import check_command_line, check_search_config, expand_sweep

DML_TRAIN = shutil.which("dml-train")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def deny_write(monkeypatch, *folders):
    """Make os.access report `folders` as not writable, as it does for a user without access."""
    real_access = os.access
    denied = {os.fspath(folder) for folder in folders}

    def access(path, mode, *args, **kwargs):
        if os.fspath(path) in denied and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def record_validated(monkeypatch):
    """Record (optimizer.lr, seed) of every config that preflight validates."""
    checked = []
    validate_config = preflight.validate_config

    def record(cfg):
        checked.append((cfg.optimizer.lr, cfg.seed))
        validate_config(cfg)

    monkeypatch.setattr(preflight, "validate_config", record)
    return checked


def make_run_folder(run_dir):
    """Create the files that make `run_dir` look like a dml-train run folder to preflight."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "checkpoints").mkdir()


def error_of(args, error_type=ConfigError):
    with pytest.raises(error_type) as error:
        check_command_line(args)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_sweep_job_error_names_overrides(workdir):
    message = error_of(["-m", "optimizer.lr=0.1,-1", "dataset=digits"])

    assert message == (
        "Sweep job optimizer.lr=-1 dataset=digits is invalid, so no job was started. "
        "Invalid optimizer.lr=-1: it must be a finite number > 0."
    )
    assert list(workdir.iterdir()) == []


def test_sweep_group_typo_names_job(workdir):
    message = error_of(["--multirun", "cohort=two_lenets,three_lenet", "dataset=digits"])

    assert message.startswith("Sweep job cohort=three_lenet dataset=digits is invalid")
    assert "Available options in 'cohort': four_lenets, homogeneous" in message
    assert list(workdir.iterdir()) == []


def test_sweep_resume_job_checks_folder(workdir):
    make_run_folder(workdir / "run")

    message = error_of(["-m", "resume=run,typo"], CheckpointError)

    assert message.startswith("Sweep job resume=typo is invalid, so no job was started.")
    assert f"Invalid resume={workdir / 'typo'}: no such run folder." in message
    assert sorted(path.name for path in workdir.iterdir()) == ["run"]


def test_valid_sweep_checks_every_job(workdir, monkeypatch):
    checked = record_validated(monkeypatch)

    check_command_line(["-m", "optimizer.lr=0.1,0.2", "seed=0,1", "dataset=digits"])

    assert checked == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    assert list(workdir.iterdir()) == []


def test_sweep_expansion_matches_basic_sweeper():
    overrides = [
        "seed=range(0,3)",
        "optimizer.lr=0.1,0.2",
        "dataset=digits",
        "cohort=glob(two_*)",
        "seed=5,6",
        "+trainer.compile=true",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = parser.parse_overrides(overrides)
        expected = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        num_jobs, jobs = expand_sweep(parsed)
        jobs = list(jobs)

    assert jobs == expected
    assert num_jobs == len(jobs) == 2 * 2 * 2
    assert jobs[0] == [
        "seed=5",
        "optimizer.lr=0.1",
        "dataset=digits",
        "cohort=two_lenets",
        "+trainer.compile=True",
    ]


def test_large_sweep_checks_first_jobs(workdir, monkeypatch, caplog):
    monkeypatch.setattr(preflight, "MAX_CHECKED_JOBS", 3)
    checked = record_validated(monkeypatch)

    # Jobs 3 to 5 have optimizer.lr=-1, beyond the three jobs checked.
    check_command_line(["-m", "optimizer.lr=0.1,-1", "seed=range(0,3)", "dataset=digits"])

    assert checked == [(0.1, 0), (0.1, 1), (0.1, 2)]
    assert "Checked the configs of the first 3 of 6 sweep jobs before the sweep" in caplog.text


def test_basic_sweeper_rejects_interval_sweep(workdir):
    message = error_of(["-m", "optimizer.lr=interval(0.01,0.1)"])

    assert message.startswith("Invalid override optimizer.lr=interval(0.01,0.1): the basic")
    assert "hydra/sweeper=optuna" in message
    assert list(workdir.iterdir()) == []


def test_sweep_over_hydra_setting_rejected(workdir):
    message = error_of(["-m", "hydra.job.chdir=true,false", "seed=0,1"])

    assert "Invalid override hydra.job.chdir=true,false" in message
    assert "cannot sweep over a hydra setting" in message


def test_search_sweep_checks_shared_values(workdir):
    message = error_of(["-m", "+search=digits_optuna", "trainer.epochs=-1"])

    assert message == "Invalid trainer.epochs=-1: it must be >= 0."
    assert list(workdir.iterdir()) == []


def test_search_sweep_leaves_swept_keys(workdir):
    overrides = ["+search=digits_optuna"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        base = compose("train", overrides=overrides, return_hydra_config=True)
    # A search config may leave a value that the sweeper sets for each trial as ???.
    base.optimizer.lr = "???"

    check_search_config(base, parsed)

    base.optimizer.lr = 0.05
    base.trainer.epochs = -1
    with pytest.raises(ConfigError, match="trainer.epochs=-1"):
        check_search_config(base, parsed)


def test_run_dir_under_file_rejected(workdir):
    (workdir / "blocker").write_text("")

    message = error_of(["dataset=digits", "hydra.run.dir=blocker/run"])

    assert message == (
        f"Cannot create hydra.run.dir=blocker/run: {workdir / 'blocker'} is a file, not a "
        "folder. Set hydra.run.dir to a writable folder, or start dml-train in a writable folder."
    )
    assert sorted(path.name for path in workdir.iterdir()) == ["blocker"]


def test_unwritable_run_dir_parent_rejected(workdir, monkeypatch):
    deny_write(monkeypatch, workdir)

    default = error_of(["dataset=digits"])
    absolute = error_of(["dataset=digits", f"hydra.run.dir={workdir}/runs/one"])

    assert default.startswith("Cannot create hydra.run.dir=outputs/")
    assert default.endswith(
        f"{workdir} is not writable. Set hydra.run.dir to a writable folder, or start dml-train "
        "in a writable folder."
    )
    assert absolute == (
        f"Cannot create hydra.run.dir={workdir}/runs/one: {workdir} is not writable. Set "
        "hydra.run.dir to a writable folder."
    )
    assert list(workdir.iterdir()) == []


def test_unwritable_sweep_dir_rejected(workdir, monkeypatch):
    deny_write(monkeypatch, workdir)

    message = error_of(["-m", "seed=0,1", "dataset=digits"])

    assert message.startswith("Cannot create hydra.sweep.dir=outputs/multirun/")
    assert f"{workdir} is not writable" in message


@pytest.mark.parametrize("denied", ["checkpoints", "."])
def test_unwritable_resume_folder_rejected(workdir, monkeypatch, denied):
    run_dir = workdir / "run"
    make_run_folder(run_dir)
    check_command_line([f"resume={run_dir}"])
    folder = run_dir / denied
    deny_write(monkeypatch, folder)

    message = error_of([f"resume={run_dir}"], CheckpointError)

    assert message == (
        f"Cannot resume {run_dir}: {folder} is not writable, so the run could not save its "
        "checkpoints. Make it writable, or resume a writable copy of the run folder."
    )


def test_other_flags_skip_checks(workdir):
    check_command_line(["--cfg", "job", "optimizer.lr=-1"])
    check_command_line(["-m", "--info", "optimizer.lr=0.1,-1"])
    check_command_line(["-c", "job", "hydra.run.dir=/proc/1/run"])


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Start both console-script cases at once, because each start costs seconds of imports."""
    assert DML_TRAIN is not None, "dml-train is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cases = {
        "sweep": ["-m", "optimizer.lr=0.1,-1", "dataset=digits", "trainer.epochs=1"],
        "run_dir": ["dataset=digits", "trainer.epochs=1", "hydra.run.dir=blocker/run"],
    }
    processes = {}
    for case, args in cases.items():
        cwd = tmp_path_factory.mktemp(case)
        (cwd / "blocker").write_text("")
        processes[case] = (
            cwd,
            subprocess.Popen(
                [DML_TRAIN, *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    results = {}
    for case, (cwd, process) in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = cwd, process.returncode, stdout, stderr
    return results


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "sweep",
            "Sweep job optimizer.lr=-1 dataset=digits trainer.epochs=1 is invalid, so no job was "
            "started. Invalid optimizer.lr=-1: it must be a finite number > 0.",
        ),
        ("run_dir", "Cannot create hydra.run.dir=blocker/run: "),
    ],
    ids=["sweep", "run_dir"],
)
def test_cli_mistake_gives_one_line(cli_results, case, expected):
    cwd, returncode, stdout, stderr = cli_results[case]

    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dml-train: error: {expected}")
    assert "Traceback" not in stdout + stderr
    assert sorted(path.name for path in cwd.iterdir()) == ["blocker"]


def test_missing_key_suggests_plus_override(workdir):
    with pytest.raises(ConfigError) as caught:
        check_command_line(["dataset=digits", "cohort.students.0.arch_args={width: 3}"])

    message = str(caught.value)
    assert "\n" not in message
    assert "Could not override 'cohort.students.0.arch_args'" in message
    assert message.endswith("with a leading +: +cohort.students.0.arch_args={width: 3}")
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("marker", [".hydra/config.yaml", "checkpoints/"])
def test_used_run_dir_rejected(workdir, marker):
    run_dir = workdir / "outputs" / "rc"
    if marker == "checkpoints/":
        (run_dir / "checkpoints").mkdir(parents=True)
    else:
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    before = sorted(path.relative_to(workdir) for path in workdir.rglob("*"))

    message = error_of(["dataset=digits", "trainer.epochs=1", "hydra.run.dir=outputs/rc"])

    assert message.startswith("Invalid hydra.run.dir=outputs/rc: ")
    assert f"{run_dir} already contains a dml-train run" in message
    assert f"resume={run_dir}" in message
    assert "choose another hydra.run.dir" in message
    assert sorted(path.relative_to(workdir) for path in workdir.rglob("*")) == before


def test_empty_existing_run_dir_accepted(workdir):
    (workdir / "outputs" / "empty").mkdir(parents=True)

    check_command_line(["dataset=digits", "trainer.epochs=1", "hydra.run.dir=outputs/empty"])


def test_missing_cuda_rejected_before_start(workdir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    single = error_of(["dataset=digits", "device=cuda", "hydra.run.dir=run"])
    sweep = error_of(["-m", "dataset=digits", "device=cuda", "seed=1,2"])

    assert single.startswith("device=cuda was requested but CUDA is not available")
    assert single.endswith("use device=cpu or device=auto.")
    assert sweep.startswith("Sweep job dataset=digits device=cuda seed=1 is invalid")
    assert sweep.endswith("use device=cpu or device=auto.")
    assert list(workdir.iterdir()) == []


def test_resume_on_missing_cuda_rejected(workdir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = workdir / "run"
    make_run_folder(run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\ndevice:\n  type: cuda\n")

    saved = error_of([f"resume={run_dir}"])
    overridden = error_of([f"resume={run_dir}", "device=cuda"])
    check_command_line([f"resume={run_dir}", "device=cpu"])

    assert saved.startswith("device=cuda was requested but CUDA is not available")
    assert overridden.startswith("device=cuda was requested but CUDA is not available")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epoch=3", "Could not override 'trainer.epoch'. Did you mean trainer.epochs?"),
        ("sed=2", "Could not override 'sed'. Did you mean seed?"),
        ("datset=mnist", "Could not override 'datset'. Did you mean dataset?"),
    ],
)
def test_misspelt_key_suggests_close_key(workdir, override, expected):
    message = error_of(["dataset=digits", override])

    assert message == expected
    assert list(workdir.iterdir()) == []

"""Resume, signals, failed writes, non-finite losses, safe loading and determinism of dml-train.

Most runs call `dml_cli.train.train` in this process on a tiny synthetic dataset. The signal
tests and the tests of untrusted or missing run folders run the installed `dml-train`.
"""

import builtins
import csv
import errno
import os
import shutil
import signal
import subprocess
import time
import types

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dml_cli import checkpoints, train
from dml_cli.checkpoints import (
    STUDENT_FORMAT,
    TRAIN_STATE_FORMAT,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
)
from dml_cli.config import config_dir
from dml_cli.engine import DMLTrainer, NonFiniteLossError, TrainingInterrupted
from dml_cli.errors import CheckpointError, ConfigError, DMLError
from dml_cli.preflight import check_command_line
from dml_cli.recorder import RunRecorder
from dml_cli.resume import prepare_resume, resume_config
from dml_cli.signals import TrainingAborted, stop_on_signals

DML_TRAIN = shutil.which("dml-train")
STUDENTS = ("student_0", "student_1")
# 230 train images after the val split, so 8 steps an epoch at batch size 32.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=256",
    "dataset.num_test=64",
    "dataset.shape=[1,8,8]",
    "cohort=two_lenets",
    "device=cpu",
    "trainer.batch_size=32",
    "trainer.deterministic=true",
]
STEPS_PER_EPOCH = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_restored_flags():
    # These students are tiny, so one thread is fastest, and far faster than several threads
    # on a busy machine. trainer.deterministic=true switches on a process-wide torch flag.
    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled)


def compose_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("train", overrides=list(overrides))


def start_run(run_dir, overrides):
    """Train like dml-train: save the composed config where Hydra would, then train."""
    cfg = compose_cfg(TINY + list(overrides))
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return train.train(cfg, run_dir)


def resume_run(run_dir, overrides=()):
    overrides = [f"resume={run_dir}", *overrides]
    current = compose_cfg(overrides)
    run_dir, cfg, state = prepare_resume(run_dir, current, overrides)
    return train.train(cfg, run_dir, resume_state=state)


def metrics_without_time(run_dir):
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        del row["time_s"]
    return rows


def assert_same_weights(state_a, state_b):
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def assert_same_checkpoints(run_a, run_b):
    for name in STUDENTS:
        for which in ("last", "best"):
            a = load_checkpoint(run_a / "checkpoints" / f"{name}_{which}.pt", STUDENT_FORMAT)
            b = load_checkpoint(run_b / "checkpoints" / f"{name}_{which}.pt", STUDENT_FORMAT)
            assert (a["epoch"], a["val_acc"]) == (b["epoch"], b["val_acc"]), (name, which)
            assert_same_weights(a["state_dict"], b["state_dict"])


def interrupt_at_step(monkeypatch, step, signal_number=signal.SIGINT, count=1):
    """Make the recorder send `signal_number` to this process `count` times after `step`."""
    on_step = RunRecorder.on_step

    def send_signal(self, trainer):
        on_step(self, trainer)
        if trainer.step == step:
            for _ in range(count):
                os.kill(os.getpid(), signal_number)

    monkeypatch.setattr(RunRecorder, "on_step", send_signal)


def temporary_files(run_dir):
    return sorted(path.name for path in run_dir.rglob("*.tmp"))


def without_full_error():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def wait_for(path, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, "dml-train ended before the signal was sent"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# Steps of 8 images make each epoch long enough (hundreds of steps) that the signal, sent once
# the first epoch's training state exists, lands inside a later epoch.
CLI_RUN = [
    "dataset=synthetic",
    "dataset.num_train=2048",
    "dataset.num_test=64",
    "dataset.shape=[1,8,8]",
    "cohort=two_lenets",
    "device=cpu",
    "trainer.batch_size=8",
    "trainer.epochs=3",
]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    start_run(run_dir, ["trainer.epochs=4"])
    return run_dir


def test_resume_matches_straight_training(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    start_run(run_dir, ["trainer.epochs=2"])

    resume_run(run_dir, ["trainer.epochs=4"])

    assert metrics_without_time(run_dir) == metrics_without_time(straight_run)
    assert_same_checkpoints(run_dir, straight_run)
    resumed = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    straight = load_checkpoint(straight_run / "checkpoints" / "train_state.pt")
    assert resumed["trainer"]["step"] == straight["trainer"]["step"] == 4 * STEPS_PER_EPOCH
    for a, b in zip(resumed["trainer"]["students"], straight["trainer"]["students"], strict=True):
        assert_same_weights(a, b)


def test_signal_mid_epoch_resumes_exactly(straight_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 3)

    with pytest.raises(TrainingInterrupted) as stop:
        start_run(run_dir, ["trainer.epochs=4"])
    monkeypatch.undo()
    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    resume_run(run_dir)

    assert stop.value.signal_number == signal.SIGINT
    assert state["trainer"]["step"] == STEPS_PER_EPOCH + 3
    assert state["trainer"]["epoch_state"]["batches_done"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert metrics_without_time(run_dir) == metrics_without_time(straight_run)
    assert_same_checkpoints(run_dir, straight_run)


def test_second_signal_aborts_keeping_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 2, count=2)

    with pytest.raises(TrainingAborted):
        start_run(run_dir, ["trainer.epochs=3"])

    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    assert state["trainer"]["epoch"] == 1
    assert state["trainer"]["step"] == STEPS_PER_EPOCH
    assert temporary_files(run_dir) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_best_checkpoint_survives_resume(tmp_path):
    run_dir = tmp_path / "run"
    start_run(run_dir, ["trainer.epochs=2"])
    path = run_dir / "checkpoints" / "train_state.pt"
    state = load_checkpoint(path, TRAIN_STATE_FORMAT)
    # No later epoch can beat a val accuracy of 1.0, so no best checkpoint may change.
    state["trainer"]["best_val_acc"] = [1.0, 1.0]
    atomic_torch_save(path, state)
    best_before = {
        name: (run_dir / "checkpoints" / f"{name}_best.pt").read_bytes() for name in STUDENTS
    }

    summary = resume_run(run_dir, ["trainer.epochs=3"])

    for name in STUDENTS:
        assert (run_dir / "checkpoints" / f"{name}_best.pt").read_bytes() == best_before[name]
    assert [student["best_epoch"] for student in summary["students"]] == [
        state["trainer"]["best_epoch"][0],
        state["trainer"]["best_epoch"][1],
    ]
    final = load_checkpoint(path, TRAIN_STATE_FORMAT)
    assert final["trainer"]["epoch"] == 3
    assert final["trainer"]["best_val_acc"] == [1.0, 1.0]
    assert final["epochs"] == 3


def test_same_seed_same_metrics(straight_run, tmp_path):
    run_dir = tmp_path / "run"

    start_run(run_dir, ["trainer.epochs=4"])

    assert torch.are_deterministic_algorithms_enabled()
    assert metrics_without_time(run_dir) == metrics_without_time(straight_run)
    assert_same_checkpoints(run_dir, straight_run)


@pytest.fixture(scope="module")
def saved_state():
    saved = compose_cfg(TINY + ["trainer.epochs=4"])
    return saved, {"format": TRAIN_STATE_FORMAT, "trainer": {"epoch": 2}, "epochs": 4}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.batch_size=16", "trainer.batch_size"),
        ("loss.temperature=2.0", "loss.temperature"),
        ("cohort=three_lenets", "cohort"),
        ("seed=1", "seed"),
        ("dataset.num_train=512", "dataset.num_train"),
        ("optimizer=adam", "optimizer"),
        ("trainer.epochs=3", "trainer.epochs"),
    ],
)
def test_resume_rejects_changing_override(saved_state, override, key):
    saved, state = saved_state
    overrides = ["resume=run", override]
    current = compose_cfg(TINY + overrides)

    with pytest.raises(ConfigError, match=key) as error:
        resume_config(saved, current, overrides, state)
    assert "\n" not in str(error.value)


def test_resume_accepts_allowed_overrides(saved_state):
    saved, state = saved_state
    overrides = [
        "resume=run",
        "trainer.epochs=6",
        "device=auto",
        "trainer.checkpoint_every_steps=5",
        "cohort=two_lenets",
        "loss.temperature=1.0",
    ]
    current = compose_cfg(TINY + overrides)

    cfg = resume_config(saved, current, overrides, state)

    assert cfg.trainer.epochs == 6
    assert cfg.device.type == "auto"
    assert cfg.trainer.checkpoint_every_steps == 5
    assert cfg.trainer.batch_size == saved.trainer.batch_size
    assert saved.trainer.epochs == 4


def test_resume_keeps_raised_epoch_target(saved_state):
    saved, _ = saved_state
    state = {"format": TRAIN_STATE_FORMAT, "trainer": {"epoch": 5}, "epochs": 8}

    cfg = resume_config(saved, compose_cfg(["resume=run"]), ["resume=run"], state)

    assert cfg.trainer.epochs == 8


class WritesMarkerOnLoad:
    """Unpickling this object opens (and so creates) a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_crafted_checkpoint_is_rejected(tmp_path):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    start_run(run_dir, ["trainer.epochs=1"])
    path = run_dir / "checkpoints" / "train_state.pt"
    payload = {"format": TRAIN_STATE_FORMAT, "trainer": WritesMarkerOnLoad(marker)}
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="could run code") as error:
        load_checkpoint(path, TRAIN_STATE_FORMAT)
    with pytest.raises(CheckpointError, match="train_state.pt"):
        prepare_resume(run_dir, compose_cfg([f"resume={run_dir}"]), [f"resume={run_dir}"])

    assert not marker.exists()
    assert "\n" not in str(error.value)


def test_corrupt_train_state_stops_resume(tmp_path, corrupt_tensor_data):
    run_dir = tmp_path / "run"
    start_run(run_dir, ["trainer.epochs=1"])
    path = run_dir / "checkpoints" / "train_state.pt"
    corrupt_tensor_data(path)

    with pytest.raises(CheckpointError, match="does not match the digest") as error:
        prepare_resume(run_dir, compose_cfg([f"resume={run_dir}"]), [f"resume={run_dir}"])

    assert f"Checkpoint {path} is corrupt" in str(error.value)


def test_resume_rejects_foreign_target(tmp_path):
    assert DML_TRAIN is not None, "dml-train is not installed"
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    cfg = compose_cfg(TINY)
    cfg.optimizer = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")

    result = subprocess.run(
        [DML_TRAIN, f"resume={run_dir}"],
        cwd=tmp_path,
        env=without_full_error(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "optimizer._target_='builtins.open'" in lines[0]
    assert not marker.exists()
    # Preflight reads the saved config before Hydra starts, so no job log is written either.
    assert sorted(path.name for path in run_dir.iterdir()) == [".hydra"]


def test_resume_of_missing_run_leaves_nothing(tmp_path):
    assert DML_TRAIN is not None, "dml-train is not installed"

    result = subprocess.run(
        [DML_TRAIN, "resume=outputs/typo"],
        cwd=tmp_path,
        env=without_full_error(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"Invalid resume={tmp_path / 'outputs' / 'typo'}: no such run folder" in lines[0]
    assert not (tmp_path / "outputs").exists()


def fail_halfway_open(target_name, fail_from_call):
    """Return an `open` whose writes to a temporary file of `target_name` stop halfway."""
    calls = []

    class HalfWriter:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            data = memoryview(data)
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    def fake_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        if f".{target_name}." in os.fspath(path) and "w" in mode:
            calls.append(path)
            if len(calls) >= fail_from_call:
                return HalfWriter(file)
        return file

    return fake_open


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # The first write of train_state.pt (epoch 1) succeeds and the second (epoch 2) fails.
    monkeypatch.setattr(checkpoints, "open", fail_halfway_open("train_state.pt", 2), raising=False)

    with pytest.raises(DMLError) as error:
        start_run(run_dir, ["trainer.epochs=3"])

    message = str(error.value)
    assert "\n" not in message
    assert str(run_dir / "checkpoints" / "train_state.pt") in message
    assert os.strerror(errno.ENOSPC) in message
    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    assert state["trainer"]["epoch"] == 1
    assert temporary_files(run_dir) == []


def test_failed_text_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "epoch,student\n1,student_0\n")
    monkeypatch.setattr(checkpoints, "open", fail_halfway_open("metrics.csv", 1), raising=False)

    with pytest.raises(DMLError, match="metrics.csv: No space left on device"):
        atomic_write_text(path, "epoch,student\n1,student_0\n2,student_0\n")

    assert path.read_text() == "epoch,student\n1,student_0\n"
    assert temporary_files(tmp_path) == []


def test_interrupted_write_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "{}\n")

    def write_then_interrupt(file):
        file.write(b'{"epochs": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(path, write_then_interrupt)

    assert path.read_text() == "{}\n"
    assert list(tmp_path.iterdir()) == [path]


def test_non_finite_loss_stops_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first_bad_step = STEPS_PER_EPOCH + 2
    build_trainer = train.build_trainer

    def build_with_nan(*args, **kwargs):
        trainer, specs = build_trainer(*args, **kwargs)

        def nan_logits(module, inputs, logits):
            if module.training and trainer.step + 1 >= first_bad_step:
                return logits * float("nan")
            return logits

        trainer.students[1].register_forward_hook(nan_logits)
        return trainer, specs

    monkeypatch.setattr(train, "build_trainer", build_with_nan)

    with pytest.raises(NonFiniteLossError) as error:
        start_run(
            run_dir,
            ["trainer.epochs=3", "trainer.checkpoint_every_steps=1", "trainer.log_every_steps=4"],
        )

    message = str(error.value)
    assert "\n" not in message
    assert f"student_1 at epoch=2 step={first_bad_step}" in message
    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    assert state["trainer"]["step"] == first_bad_step - 1
    for weights in state["trainer"]["students"]:
        assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
    last = load_checkpoint(run_dir / "checkpoints" / "student_1_last.pt", STUDENT_FORMAT)
    assert last["epoch"] == 1


AGAIN_ADVICE = {
    "SIGINT": "Press Ctrl-C again to stop at once.",
    "SIGTERM": "Send SIGTERM again to stop at once.",
}


@pytest.mark.parametrize("signal_number", sorted(AGAIN_ADVICE))
def test_stop_message_fits_signal(signal_number, caplog):
    trainer = types.SimpleNamespace(stop_signal=None)
    number = getattr(signal, signal_number)

    with stop_on_signals(trainer):
        signal.getsignal(number)(number, None)

    assert trainer.stop_signal == number
    assert f"Received {signal_number}: stopping after the current step" in caplog.text
    assert AGAIN_ADVICE[signal_number] in caplog.text
    for other, advice in AGAIN_ADVICE.items():
        if other != signal_number:
            assert advice not in caplog.text


def run_files(run_dir):
    """Map each file of `run_dir` to its size and modification time."""
    return {
        path.relative_to(run_dir): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in run_dir.rglob("*")
        if path.is_file()
    }


def test_resume_of_finished_run_rejected(tmp_path):
    run_dir = tmp_path / "run"
    start_run(run_dir, ["trainer.epochs=1"])
    before = run_files(run_dir)

    with pytest.raises(ConfigError) as preflight_error:
        check_command_line([f"resume={run_dir}"])
    with pytest.raises(ConfigError) as resume_error:
        resume_run(run_dir)
    with pytest.raises(ConfigError):
        check_command_line([f"resume={run_dir}", "trainer.epochs=1"])
    check_command_line([f"resume={run_dir}", "trainer.epochs=2"])

    message = str(preflight_error.value)
    assert message == (
        f"Cannot resume {run_dir}: the run already finished its 1 epoch. To train on, pass "
        f"resume={run_dir} trainer.epochs=M with M > 1."
    )
    assert str(resume_error.value) == message
    assert run_files(run_dir) == before


def test_signal_in_last_validation_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    evaluate = DMLTrainer.evaluate

    def evaluate_then_signal(self, loader):
        if self.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, loader)

    monkeypatch.setattr(DMLTrainer, "evaluate", evaluate_then_signal)
    with pytest.raises(TrainingInterrupted):
        start_run(run_dir, ["trainer.epochs=2"])
    monkeypatch.undo()
    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)

    assert state["trainer"]["epoch"] == 2
    assert not (run_dir / "summary.json").exists()
    check_command_line([f"resume={run_dir}"])
    summary = resume_run(run_dir)
    assert summary["epochs"] == 2
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "plots" / "curves.png").is_file()
    with pytest.raises(ConfigError):
        check_command_line([f"resume={run_dir}"])


@pytest.mark.parametrize(("signal_number", "expected_code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_real_signal_leaves_resumable_run(tmp_path, signal_number, expected_code):
    assert DML_TRAIN is not None, "dml-train is not installed"
    run_dir = tmp_path / "outputs" / "run"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as err:
        process = subprocess.Popen(
            [DML_TRAIN, *CLI_RUN, "hydra.run.dir=outputs/run"],
            cwd=tmp_path,
            env=without_full_error(),
            stdout=stdout,
            stderr=err,
        )
        try:
            wait_for(run_dir / "checkpoints" / "train_state.pt", process)
            process.send_signal(getattr(signal, signal_number))
            returncode = process.wait(timeout=120)
        finally:
            process.kill()
    output = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
    saved_config = (run_dir / ".hydra" / "config.yaml").read_text()

    assert returncode == expected_code, output
    assert "Traceback" not in output
    assert AGAIN_ADVICE[signal_number] in output
    assert f"Resume with: dml-train resume={run_dir}" in output
    state = load_checkpoint(run_dir / "checkpoints" / "train_state.pt", TRAIN_STATE_FORMAT)
    assert state["trainer"]["step"] > 0
    if signal_number == "SIGTERM":
        return

    result = subprocess.run(
        [DML_TRAIN, f"resume={run_dir.relative_to(tmp_path)}"],
        cwd=tmp_path,
        env=without_full_error(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert f"Resuming {run_dir} after step={state['trainer']['step']} (" in result.stdout
    assert [row["epoch"] for row in metrics_without_time(run_dir)] == [
        str(epoch) for epoch in (1, 2, 3) for _ in range(3)
    ]
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved_config
    assert [path.name for path in (tmp_path / "outputs").iterdir()] == ["run"]

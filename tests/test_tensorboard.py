"""logger=tensorboard: tags, values and steps read back from the event files, missing extra."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dml_cli import DML
from dml_cli.config import config_dir
from dml_cli.engine import DMLTrainer
from dml_cli.errors import ConfigError
from dml_cli.loggers import TensorBoardLogger, build_loggers

DML_TRAIN = shutil.which("dml-train")
EPOCH_TAGS = ("train/loss", "train/ce_loss", "train/kl_loss", "train/acc", "val/loss", "val/acc")


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny, so intra-op threads only add synchronisation on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_train(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("train", overrides=list(overrides))


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def make_batches(num_batches=4, batch_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 6, generator=generator),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(num_batches)
    ]


def test_csv_logger_builds_no_callbacks(tmp_path):
    cfg = compose_train()

    assert cfg.logger.tensorboard is False
    assert build_loggers(cfg, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_scalars_match_history(tmp_path):
    cfg = compose_train("logger=tensorboard")
    loggers = build_loggers(cfg, tmp_path)
    assert len(loggers) == 1
    assert isinstance(loggers[0], TensorBoardLogger)
    assert loggers[0].flush_secs == cfg.logger.flush_secs

    torch.manual_seed(0)
    students = [nn.Linear(6, 3), nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))]
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.1) for s in students]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in optimizers]
    trainer = DMLTrainer(students, optimizers, schedulers, log_every_steps=3)
    batches = make_batches()
    trainer.fit(batches, batches, epochs=3, callbacks=loggers)

    scalars = read_scalars(tmp_path / "tensorboard")
    for name in ("student_0", "student_1"):
        rows = [row for row in trainer.history if row["student"] == name]
        for tag in EPOCH_TAGS:
            column = tag.replace("/", "_")
            points = scalars[f"{tag}/{name}"]
            assert [step for step, _ in points] == [4, 8, 12], tag
            assert [value for _, value in points] == pytest.approx(
                [row[column] for row in rows], rel=1e-6
            ), tag
        assert [value for _, value in scalars[f"lr/{name}"]] == pytest.approx([0.1, 0.05, 0.025])
        running_steps = [step for step, _ in scalars[f"train/running_loss/{name}"]]
        assert running_steps == [3, 6, 9, 12]
        assert all(value > 0 for _, value in scalars[f"train/running_loss/{name}"])
    ensemble = [row for row in trainer.history if row["student"] == "ensemble"]
    assert [value for _, value in scalars["val/acc/ensemble"]] == pytest.approx(
        [row["val_acc"] for row in ensemble], rel=1e-6
    )
    assert "train/loss/ensemble" not in scalars
    assert "lr/ensemble" not in scalars
    assert loggers[0].writer is None


def make_linear_trainer():
    students = [nn.Linear(6, 3), nn.Linear(6, 3)]
    return DMLTrainer(students, [torch.optim.SGD(s.parameters(), lr=0.1) for s in students])


def test_resumed_run_replaces_later_events(tmp_path):
    # A run interrupted after its epoch-1 checkpoint wrote events up to step 12; the resumed
    # run restarts from step 4, so its own events must replace those at steps 8 and 12.
    torch.manual_seed(0)
    batches = make_batches()
    interrupted = make_linear_trainer()
    interrupted.fit(batches, batches, epochs=1)
    checkpoint = interrupted.state_dict()
    interrupted.fit(batches, batches, epochs=3, callbacks=[TensorBoardLogger(tmp_path)])

    resumed = make_linear_trainer()
    resumed.load_state_dict(checkpoint)
    resumed.fit(batches, batches, epochs=3, callbacks=[TensorBoardLogger(tmp_path)])

    points = read_scalars(tmp_path)["val/acc/student_0"]
    assert [step for step, _ in points] == [8, 12]
    expected = [row["val_acc"] for row in resumed.history if row["student"] == "student_0"]
    assert [value for _, value in points] == pytest.approx(expected[1:], rel=1e-6)


def test_missing_tensorboard_names_pip_extra(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as when not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = compose_train("logger=tensorboard")

    with pytest.raises(ConfigError, match=r"pip install -e \"\.\[tensorboard\]\""):
        build_loggers(cfg, tmp_path)


@pytest.mark.parametrize("flush_secs", [0, -5, "often"])
def test_invalid_flush_secs_raises(tmp_path, flush_secs):
    cfg = compose_train("logger=tensorboard", f"logger.flush_secs={flush_secs}")

    with pytest.raises(ConfigError, match="logger.flush_secs"):
        build_loggers(cfg, tmp_path)


def test_api_tensorboard_option_writes_events(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(32, 1, 8, 8)
    labels = torch.randint(0, 10, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    students = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(2)]
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.1) for s in students]
    dml = DML(students, loader, loader, optimizers, device="cpu", output_dir=tmp_path)

    dml.train_students(epochs=2, plot_losses=False, save_model=False, tensorboard=True)

    scalars = read_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["val/acc/student_1"]] == [4, 8]
    assert [step for step, _ in scalars["val/acc/ensemble"]] == [4, 8]


def run_dml_train(args, cwd, pythonpath=None):
    assert DML_TRAIN is not None, "dml-train is not installed: run pip install -e ."
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [DML_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_tensorboard_run_writes_events(tmp_path):
    args = ["dataset=digits", "cohort=two_lenets", "trainer.epochs=2", "device=cpu"]
    result = run_dml_train([*args, "logger=tensorboard", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr

    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # digits at the default batch size: 1,293 train images make 21 steps an epoch.
    for name in ("student_0", "student_1", "ensemble"):
        points = scalars[f"val/acc/{name}"]
        assert [step for step, _ in points] == [21, 42]
        expected = [float(row["val_acc"]) for row in rows if row["student"] == name]
        assert [value for _, value in points] == pytest.approx(expected, abs=1e-5)
    for name in ("student_0", "student_1"):
        assert f"lr/{name}" in scalars
        assert f"train/loss/{name}" in scalars
        steps = [step for step, _ in scalars[f"train/running_loss/{name}"]]
        assert steps == sorted(set(steps))
        assert steps[0] == 20


def test_cli_without_tensorboard_prints_one_line(tmp_path):
    blocker = tmp_path / "blocker" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("tensorboard blocked by the test")\n')
    args = ["dataset=digits", "cohort=two_lenets", "trainer.epochs=1", "device=cpu"]

    result = run_dml_train([*args, "logger=tensorboard"], tmp_path, pythonpath=blocker.parent)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'pip install -e ".[tensorboard]"' in lines[0]
    assert "Traceback" not in result.stdout + result.stderr

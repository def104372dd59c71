"""The Python API: the notebook workflow end to end, equality with dml-train, argument checks."""

import csv
import os
import shutil
import subprocess

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dml_cli
from dml_cli import DML
from dml_cli.build import build_optimizers, build_schedulers, build_students, student_specs
from dml_cli.checkpoints import STUDENT_FORMAT, load_checkpoint
from dml_cli.config import config_dir
from dml_cli.data import load_dataset
from dml_cli.engine import DMLTrainer
from dml_cli.train import make_loaders, seed_everything

DML_TRAIN = shutil.which("dml-train")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head, for 1x8x8 digits."""

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, images):
        return self.head(self.features(images))


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, images):
        return self.layers(images)


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny, so intra-op threads bring no speed-up, and on a busy machine their
    # synchronisation made the notebook example over 50 times slower (2.4 s against 160 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_students() -> list[nn.Module]:
    return [SmallCNN(width=16), DigitsMLP(), SmallCNN(width=8)]


def fresh_student(index: int) -> nn.Module:
    return make_students()[index]


def digits_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_index, test_index = train_test_split(
        list(range(len(labels))), test_size=0.2, stratify=digits.target, random_state=0
    )
    train = TensorDataset(images[train_index], labels[train_index])
    test = TensorDataset(images[test_index], labels[test_index])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(test, batch_size=256),
    )


def sgd(students, lr=0.05):
    return [torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9) for s in students]


def tiny_cohort(cohort_size=2):
    students = [DigitsMLP(hidden=16) for _ in range(cohort_size)]
    return students, sgd(students)


def tiny_loader(num_samples=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_samples, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=16)


def test_notebook_example_passes_90_percent(tmp_path, capsys):
    torch.manual_seed(0)
    loader_train, loader_test = digits_loaders()
    students = make_students()
    dml = DML(
        students, loader_train, loader_test, sgd(students), device="cpu", output_dir=tmp_path
    )

    history = dml.train_students(epochs=10, plot_losses=True, save_model=True)
    metrics = dml.evaluate()

    assert list(history) == ["student_0", "student_1", "student_2", "ensemble"]
    for rows in history.values():
        assert [row["epoch"] for row in rows] == list(range(1, 11))
    assert set(history["ensemble"][0]) == {"epoch", "student", "val_loss", "val_acc", "time_s"}
    for name in dml.names:
        assert metrics["students"][name]["acc"] > 0.90, name
        assert history[name][-1]["val_acc"] == pytest.approx(metrics["students"][name]["acc"])
    assert metrics["ensemble"]["acc"] > 0.90

    printed = capsys.readouterr().out
    for name in [*dml.names, "ensemble", "SmallCNN", "DigitsMLP"]:
        assert name in printed
    assert f"{metrics['students']['student_0']['acc']:.4f}" in printed

    png = tmp_path / "plots" / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.width > 600
        assert image.height > 200

    for index, name in enumerate(dml.names):
        last = load_checkpoint(tmp_path / "checkpoints" / f"{name}_last.pt", STUDENT_FORMAT)
        best = load_checkpoint(tmp_path / "checkpoints" / f"{name}_best.pt", STUDENT_FORMAT)
        assert last["arch"] == type(students[index]).__name__
        assert last["epoch"] == 10
        assert best["val_acc"] == max(row["val_acc"] for row in history[name])
        student = fresh_student(index)
        student.load_state_dict(last["state_dict"])
        for key, value in dml.students[index].state_dict().items():
            assert torch.equal(student.state_dict()[key], value), (name, key)
        best_student = fresh_student(index)
        best_student.load_state_dict(best["state_dict"])


def test_api_equals_cli_after_one_epoch(tmp_path):
    overrides = ["dataset=digits", "cohort=lenet_mlp", "trainer.epochs=1", "device=cpu", "seed=3"]
    assert DML_TRAIN is not None, "dml-train is not installed: run pip install -e ."
    # One thread on both sides, so that both sum in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [DML_TRAIN, *overrides, "hydra.run.dir=cli_run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr

    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose("train", overrides=overrides)
    seed_everything(cfg.seed, deterministic=False)
    data = load_dataset(cfg.dataset)
    specs = student_specs(cfg.cohort, cfg.seed)
    students = build_students(
        specs,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    )
    initial = [{k: v.clone() for k, v in s.state_dict().items()} for s in students]
    optimizers = build_optimizers(cfg.optimizer, specs, students)
    loader_train, loader_val, _ = make_loaders(cfg, data, torch.device("cpu"), False)
    dml = DML(
        students,
        loader_train,
        loader_val,
        optimizers,
        build_schedulers(cfg.scheduler, optimizers),
        device="cpu",
        temperature=cfg.loss.temperature,
        mimicry_weight=cfg.loss.mimicry_weight,
        update=cfg.loss["update"],
        mimicry=cfg.loss.mimicry,
        output_dir=tmp_path / "api_run",
    )
    history = dml.train_students(epochs=1, plot_losses=False, save_model=False)

    checkpoints = tmp_path / "cli_run" / "checkpoints"
    for index, spec in enumerate(specs):
        cli = load_checkpoint(checkpoints / f"{spec.name}_last.pt", STUDENT_FORMAT)
        api_state = dml.students[index].state_dict()
        assert cli["state_dict"].keys() == api_state.keys()
        for key, value in api_state.items():
            assert torch.equal(cli["state_dict"][key], value), (spec.name, key)
            if value.is_floating_point():
                assert not torch.equal(initial[index][key], value), (spec.name, key)
    with open(tmp_path / "cli_run" / "metrics.csv", newline="") as file:
        cli_rows = {row["student"]: row for row in csv.DictReader(file)}
    for name, rows in history.items():
        assert float(cli_rows[name]["val_acc"]) == pytest.approx(rows[0]["val_acc"], abs=1e-6)


def test_api_equals_bare_trainer_with_shuffle(tmp_path):
    # The API reads a val batch before training. It must not move torch's global generator,
    # which a shuffling DataLoader draws its order from.
    loader_train, loader_val = digits_loaders(batch_size=64)

    torch.manual_seed(7)
    students = [DigitsMLP(hidden=32), SmallCNN(width=4)]
    trainer = DMLTrainer(students, sgd(students), temperature=2.0)
    trainer.fit(loader_train, loader_val, epochs=2)

    torch.manual_seed(7)
    api_students = [DigitsMLP(hidden=32), SmallCNN(width=4)]
    dml = DML(
        api_students,
        loader_train,
        loader_val,
        sgd(api_students),
        device="cpu",
        temperature=2.0,
        output_dir=tmp_path,
    )
    dml.train_students(epochs=2, plot_losses=False, save_model=False)

    for student, api_student in zip(students, api_students, strict=True):
        for key, value in student.state_dict().items():
            assert torch.equal(api_student.state_dict()[key], value), key


def test_torchvision_dataset_with_transform(tmp_path):
    transform = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.5,), (0.5,))]
    )
    dataset = torchvision.datasets.FakeData(
        size=48, image_size=(1, 8, 8), num_classes=10, transform=transform
    )
    loader = DataLoader(dataset, batch_size=16, shuffle=True)
    students, optimizers = tiny_cohort()
    dml = DML(students, loader, loader, optimizers, device="cpu", output_dir=tmp_path)

    history = dml.train_students(epochs=2, plot_losses=False, save_model=False)

    for name in dml.names:
        assert len(history[name]) == 2
        assert history[name][1]["train_loss"] > 0
        assert 0.0 <= history[name][1]["val_acc"] <= 1.0
    assert dml.trainer.step == 2 * 3
    assert (tmp_path / "metrics.csv").is_file()
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "plots").exists()


def test_evaluate_counts_correct_predictions(tmp_path):
    torch.manual_seed(0)
    students, optimizers = tiny_cohort(3)
    loader = tiny_loader()
    dml = DML(students, loader, loader, optimizers, device="cpu", output_dir=tmp_path)

    metrics = dml.evaluate()

    images = torch.cat([batch[0] for batch in loader])
    labels = torch.cat([batch[1] for batch in loader])
    with torch.no_grad():
        probs = [torch.softmax(student.eval()(images), dim=-1) for student in students]
    for name, student_probs in zip(dml.names, probs, strict=True):
        expected = (student_probs.argmax(dim=-1) == labels).double().mean().item()
        assert metrics["students"][name]["acc"] == pytest.approx(expected)
    ensemble = torch.stack(probs).mean(dim=0).argmax(dim=-1)
    assert metrics["ensemble"]["acc"] == pytest.approx((ensemble == labels).double().mean())


def test_train_students_continues_in_same_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    students, optimizers = tiny_cohort()
    loader = tiny_loader()
    dml = DML(students, loader, loader, optimizers, device="cpu")

    dml.train_students(epochs=1, plot_losses=False)
    run_dir = dml.run_dir
    history = dml.train_students(epochs=2)

    assert dml.run_dir == run_dir
    assert run_dir.parts[0] == "outputs"
    assert [row["epoch"] for row in history["student_0"]] == [1, 2, 3]
    assert dml.trainer.step == 3 * 3
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "student_0_last.pt", STUDENT_FORMAT)
    assert checkpoint["epoch"] == 3
    assert checkpoint["num_classes"] == 10
    assert checkpoint["in_channels"] == 1
    assert checkpoint["image_size"] == 8
    assert (run_dir / "plots" / "curves.png").is_file()


def test_get_parameters_counts_each_student(tmp_path):
    students = [DigitsMLP(hidden=16), SmallCNN(width=4)]
    students[1].head.weight.requires_grad_(False)
    dml = DML(students, tiny_loader(), tiny_loader(), sgd(students), device="cpu")

    counts = dml.get_parameters()

    assert counts == {
        "student_0": 64 * 16 + 16 + 16 * 10 + 10,
        "student_1": (1 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + 10,
    }


def test_package_exports_dml_class():
    assert dml_cli.DML is DML
    assert "DML" in dml_cli.__all__


def _swapped_optimizers():
    students, optimizers = tiny_cohort()
    return students, optimizers[::-1]


@pytest.mark.parametrize(
    ("make_arguments", "message"),
    [
        (lambda: ([], []), "cohort is empty"),
        (lambda: ([DigitsMLP(), "mlp"], sgd([DigitsMLP(), DigitsMLP()])), "not a torch.nn.Module"),
        (lambda: (tiny_cohort(3)[0], tiny_cohort(2)[1]), "Got 2 optimizers for 3 students"),
        (lambda: (DigitsMLP(), sgd([DigitsMLP()])), "single DigitsMLP"),
        (lambda: ([DigitsMLP()], sgd([DigitsMLP()])), "not student 0's"),
        (_swapped_optimizers, "not student 0's"),
    ],
)
def test_invalid_cohort_raises_value_error(make_arguments, message):
    students, optimizers = make_arguments()
    with pytest.raises(ValueError, match=message):
        DML(students, tiny_loader(), tiny_loader(), optimizers, device="cpu")


def test_invalid_schedulers_raise_value_error():
    students, optimizers = tiny_cohort()
    step_lr = torch.optim.lr_scheduler.StepLR
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizers[1])
    cases = [
        ([step_lr(optimizers[0], 1)], "Got 1 schedulers for 2 students"),
        ([None, step_lr(optimizers[0], 1)], "Scheduler 1 does not drive optimizer 1"),
        ([None, plateau], "ReduceLROnPlateau"),
    ]
    for schedulers, message in cases:
        with pytest.raises(ValueError, match=message):
            DML(students, tiny_loader(), tiny_loader(), optimizers, schedulers, device="cpu")


def test_invalid_settings_raise_value_error():
    students, optimizers = tiny_cohort()
    loader = tiny_loader()
    cases = [
        ({"temperature": 0}, r"temperature=0 \(loss.temperature\)"),
        ({"mimicry_weight": -1.0}, r"mimicry_weight=-1.0 \(loss.mimicry_weight\)"),
        ({"update": "async"}, r"update='async' \(loss.update\)"),
        ({"mimicry": "mean"}, r"mimicry='mean' \(loss.mimicry\)"),
        ({"names": ["a", "a"]}, "names must be unique"),
        ({"names": ["a", "ensemble"]}, "'ensemble' is the name of"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            DML(students, loader, loader, optimizers, device="cpu", **settings)
    with pytest.raises(ValueError, match=r"Invalid device='banana': pass 'auto', 'cpu'"):
        DML(students, loader, loader, optimizers, device="banana")
    with pytest.raises(ValueError, match="loader_train is a int"):
        DML(students, 3, loader, optimizers, device="cpu")


def test_bad_batches_and_epochs_raise(tmp_path):
    students, optimizers = tiny_cohort()
    dict_batches = [{"image": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2)}]
    dml = DML(students, dict_batches, dict_batches, optimizers, device="cpu", output_dir=tmp_path)
    with pytest.raises(ValueError, match="yields a dict, expected"):
        dml.train_students(epochs=1)
    for epochs in (-1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid epochs"):
            dml.train_students(epochs=epochs)

"""`dml-eval` on a real digits run: reproduction of summary.json, hand-built cohorts, errors.

One `dml-train` run is made per module. Tests that change a run work on a copy of it. Error cases
go through `run_job`, the function behind the console script, and a few cases run the installed
`dml-eval` in a subprocess.
"""

import contextlib
import csv
import json
import math
import os
import pickle
import shutil
import subprocess

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dml_cli.checkpoints import STUDENT_FORMAT, save_checkpoint
from dml_cli.config import config_dir
from dml_cli.data import load_dataset
from dml_cli.errors import CheckpointError
from dml_cli.evaluate import evaluate_run, run_job, write_results
from dml_cli.models import build_student

DML_TRAIN = shutil.which("dml-train")
DML_EVAL = shutil.which("dml-eval")
STUDENTS = ("student_0", "student_1", "student_2")
EPOCHS = 2


def run_cli(program, args, cwd):
    assert program is not None, "the console scripts are not installed: run `make install`"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Train three LeNets on digits for two epochs; return the run folder."""
    cwd = tmp_path_factory.mktemp("train")
    result = run_cli(DML_TRAIN, ["dataset=digits", f"trainer.epochs={EPOCHS}"], cwd)
    assert result.returncode == 0, result.stderr
    runs = list((cwd / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def summary(digits_run):
    return json.loads((digits_run / "summary.json").read_text())


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the digits run that a test may change."""
    return shutil.copytree(digits_run, tmp_path / "run")


@pytest.fixture(scope="module")
def eval_cfg():
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("eval", overrides=["device=cpu"])


def cfg_for(eval_cfg, **values):
    return OmegaConf.merge(eval_cfg, values)


def tree_bytes(folder):
    """Map each file under folder, outside eval/, to its content."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] != "eval"
    }


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def edit_run_config(run_dir, edit):
    path = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))


def assert_rejected(capsys, monkeypatch, cfg, run_dir, *fragments):
    """run_job must exit with code 2, one error line naming each fragment, and write nothing."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("dml-eval: error: ")
    for fragment in fragments:
        assert str(fragment) in stderr
    if run_dir is not None:
        assert not (run_dir / "eval").exists()


# Reproduction of the run's own numbers.


@pytest.mark.parametrize("batch_size", [7, 512])
def test_reproduces_summary_test_accuracies(digits_run, summary, batch_size):
    result = evaluate_run(digits_run, device="cpu", batch_size=batch_size)

    assert [student["name"] for student in result["students"]] == list(STUDENTS)
    for student, expected in zip(result["students"], summary["students"], strict=True):
        assert student["acc"] == expected["test_acc"], student["name"]
        assert student["num_params"] == expected["num_params"]
        assert student["epoch"] == expected["best_epoch"]
    assert result["ensemble"]["acc"] == summary["ensemble"]["test_acc"]
    assert result["student_mean"]["acc"] == pytest.approx(summary["student_mean"]["test_acc"])
    assert result["num_samples"] == 360
    assert result["batch_size"] == batch_size


def test_metrics_same_for_batch_sizes(digits_run):
    small = evaluate_run(digits_run, device="cpu", batch_size=7)
    large = evaluate_run(digits_run, device="cpu", batch_size=512)

    # Accuracy and agreement count predictions, so they match exactly. NLL, ECE and KL may
    # differ in the last bits of the float32 logits.
    assert small["agreement"] == large["agreement"]
    for key in ("acc", "top5"):
        assert small["ensemble"][key] == large["ensemble"][key]
    for key in ("nll", "ece"):
        assert small["ensemble"][key] == pytest.approx(large["ensemble"][key], rel=1e-6)
        for first, second in zip(small["students"], large["students"], strict=True):
            assert first[key] == pytest.approx(second[key], rel=1e-6)
    for pair, value in small["kl"].items():
        assert value == pytest.approx(large["kl"][pair], rel=1e-6, abs=1e-9)


def test_val_split_reproduces_best_val(digits_run, summary):
    result = evaluate_run(digits_run, device="cpu", split="val")

    assert result["split"] == "val"
    assert result["num_samples"] == 144
    for student, expected in zip(result["students"], summary["students"], strict=True):
        assert student["acc"] == expected["best_val_acc"], student["name"]
    assert result["ensemble"]["acc"] == summary["ensemble"]["val_acc"]


def test_last_checkpoint_matches_last_epoch(digits_run):
    rows = read_csv(digits_run / "metrics.csv")
    last_val_acc = {
        row["student"]: float(row["val_acc"]) for row in rows if row["epoch"] == str(EPOCHS)
    }

    result = evaluate_run(digits_run, device="cpu", split="val", checkpoint="last")

    assert result["checkpoint"] == "last"
    for student in result["students"]:
        assert student["epoch"] == EPOCHS
        assert student["checkpoint"] == f"checkpoints/{student['name']}_last.pt"
        assert student["acc"] == pytest.approx(last_val_acc[student["name"]], abs=1e-5)
    assert result["ensemble"]["acc"] == pytest.approx(last_val_acc["ensemble"], abs=1e-5)


def test_cli_moved_run_other_cwd(digits_run, summary, tmp_path):
    # A copy at another path is the moved run, because the module's run must stay in place.
    moved = tmp_path / "archive" / "old_run"
    shutil.copytree(digits_run, moved)
    before = tree_bytes(moved)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    result = run_cli(DML_EVAL, ["run_dir=../archive/old_run", "batch_size=7", "device=cpu"], cwd)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "ensemble" in result.stdout
    assert "Pairs of students" in result.stdout
    assert list(cwd.iterdir()) == []
    assert tree_bytes(moved) == before
    assert sorted(path.name for path in (moved / "eval").iterdir()) == [
        "test-best.csv",
        "test-best.json",
    ]
    written = json.loads((moved / "eval" / "test-best.json").read_text())
    assert written["run_dir"] == str(moved)
    for student, expected in zip(written["students"], summary["students"], strict=True):
        assert student["acc"] == expected["test_acc"]
    assert written["ensemble"]["acc"] == summary["ensemble"]["test_acc"]

    rows = read_csv(moved / "eval" / "test-best.csv")
    assert [row["name"] for row in rows] == [
        *STUDENTS,
        "ensemble",
        "mean",
        "std",
        "student_0/student_1",
        "student_0/student_2",
        "student_1/student_2",
    ]
    for row, student in zip(rows, written["students"], strict=False):
        assert row["kind"] == "student"
        assert float(row["acc"]) == student["acc"]
        assert float(row["nll"]) == student["nll"]
    assert float(rows[3]["ece"]) == written["ensemble"]["ece"]
    assert float(rows[6]["agreement"]) == written["agreement"]["student_0/student_1"]
    assert float(rows[6]["kl_reverse"]) == written["kl"]["student_1||student_0"]


def test_cli_help_lists_options(tmp_path):
    result = run_cli(DML_EVAL, ["--help"], tmp_path)

    assert result.returncode == 0, result.stderr
    for text in ("run_dir: ???", "checkpoint: best", "split: test", "batch_size: null", "root:"):
        assert text in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_run_job_writes_only_eval_files(run_copy, eval_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(run_copy)

    run_job(cfg_for(eval_cfg, run_dir="run", split="val", checkpoint="last"))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert tree_bytes(run_copy) == before
    assert sorted(path.name for path in (run_copy / "eval").iterdir()) == [
        "val-last.csv",
        "val-last.json",
    ]


# A hand-built cohort: each student's last layer is zeroed and its bias set, so every image gets
# the same probs and each metric has a closed form in the label counts.

LOG_9 = math.log(9.0)


def constant_logits(favoured_class):
    """Logits ln 9 for one class and 0 for the nine others: probs 1/2 and 1/18 each."""
    logits = torch.zeros(10)
    logits[favoured_class] = LOG_9
    return logits


def make_constant_student(run_dir, name, favoured_class):
    path = run_dir / "checkpoints" / f"{name}_best.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["classifier.5.weight"].zero_()
    payload["state_dict"]["classifier.5.bias"].copy_(constant_logits(favoured_class))
    save_checkpoint(path, payload)


def test_hand_built_cohort_metrics(run_copy):
    for name, favoured_class in zip(STUDENTS, (0, 1, 0), strict=True):
        make_constant_student(run_copy, name, favoured_class)
    labels = load_dataset(OmegaConf.load(run_copy / ".hydra" / "config.yaml").dataset).test_labels
    total = len(labels)
    count_0 = int((labels == 0).sum())
    count_1 = int((labels == 1).sum())
    rest = total - count_0 - count_1

    json_path, _ = write_results(evaluate_run(run_copy, device="cpu"))
    result = json.loads(json_path.read_text())

    students = {student["name"]: student for student in result["students"]}
    student_0 = students["student_0"]
    assert student_0["acc"] == pytest.approx(count_0 / total)
    assert student_0["nll"] == pytest.approx(
        (count_0 * math.log(2) + (total - count_0) * math.log(18)) / total
    )
    # Every confidence is 1/2, all in one bin, so ECE = |accuracy - 1/2|.
    assert student_0["ece"] == pytest.approx(abs(count_0 / total - 0.5))
    assert students["student_1"]["acc"] == pytest.approx(count_1 / total)
    assert students["student_1"]["ece"] == pytest.approx(abs(count_1 / total - 0.5))

    # Ensemble probs: class 0 (1/2 + 1/18 + 1/2) / 3 = 19/54, class 1 11/54, the rest 3/54.
    ensemble = result["ensemble"]
    assert ensemble["acc"] == pytest.approx(count_0 / total)
    assert ensemble["ece"] == pytest.approx(abs(count_0 / total - 19 / 54))
    expected_nll = (
        count_0 * math.log(54 / 19) + count_1 * math.log(54 / 11) + rest * math.log(18)
    ) / total
    assert ensemble["nll"] == pytest.approx(expected_nll)

    accuracies = [count_0 / total, count_1 / total, count_0 / total]
    mean = sum(accuracies) / 3
    assert result["student_mean"]["acc"] == pytest.approx(mean)
    std = math.sqrt(sum((value - mean) ** 2 for value in accuracies) / 3)
    assert result["student_std"]["acc"] == pytest.approx(std)

    assert result["agreement"] == {
        "student_0/student_1": 0.0,
        "student_0/student_2": 1.0,
        "student_1/student_2": 0.0,
    }
    assert result["agreement_mean"] == pytest.approx(1 / 3)
    # KL(p_0 || p_1) = 1/2 ln(9) - 1/18 ln(9) = (4/9) ln 9 for every image.
    assert result["kl"]["student_0||student_1"] == pytest.approx(4 / 9 * LOG_9)
    assert result["kl"]["student_1||student_0"] == pytest.approx(4 / 9 * LOG_9)
    assert result["kl"]["student_0||student_2"] == pytest.approx(0.0, abs=1e-12)
    assert result["kl_mean"] == pytest.approx(4 * (4 / 9 * LOG_9) / 6)


# Checkpoints across devices.


@contextlib.contextmanager
def storages_tagged_cuda():
    """Make torch.save record every storage as `cuda:0`, as a checkpoint saved on a GPU has."""
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization._package_registry.append(entry)
    torch.serialization._package_registry.sort(key=lambda item: item[0])
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading without CUDA")
def test_cuda_checkpoints_load_on_cpu(run_copy, summary):
    for name in STUDENTS:
        path = run_copy / "checkpoints" / f"{name}_best.pt"
        payload = torch.load(path, weights_only=True)
        with storages_tagged_cuda():
            torch.save(payload, path)
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)

    result = evaluate_run(run_copy, device="cpu")

    assert result["device"] == "cpu"
    for student, expected in zip(result["students"], summary["students"], strict=True):
        assert student["acc"] == expected["test_acc"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoints_evaluate_on_cuda(digits_run, summary):
    result = evaluate_run(digits_run, device="cuda")

    assert result["device"].startswith("cuda")
    # Other kernels may round differently, so allow one changed prediction per student.
    for student, expected in zip(result["students"], summary["students"], strict=True):
        assert student["acc"] == pytest.approx(expected["test_acc"], abs=1.5 / 360)


# Errors: one line on stderr, exit code 2, nothing written.


def test_missing_run_dir_rejected(eval_cfg, capsys, monkeypatch):
    assert_rejected(capsys, monkeypatch, eval_cfg, None, "Missing run_dir")


def test_absent_run_dir_rejected(eval_cfg, tmp_path, capsys, monkeypatch):
    cfg = cfg_for(eval_cfg, run_dir=str(tmp_path / "no_such_run"))

    assert_rejected(capsys, monkeypatch, cfg, None, "Run folder not found", tmp_path)


def test_folder_without_config_rejected(eval_cfg, tmp_path, capsys, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    cfg = cfg_for(eval_cfg, run_dir=str(tmp_path))

    assert_rejected(capsys, monkeypatch, cfg, tmp_path, "not a dml-train run", ".hydra")


def test_missing_checkpoint_named(run_copy, eval_cfg, capsys, monkeypatch):
    path = run_copy / "checkpoints" / "student_1_best.pt"
    path.unlink()
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(capsys, monkeypatch, cfg, run_copy, "not found", path)


def test_truncated_checkpoint_named(run_copy, eval_cfg, capsys, monkeypatch):
    path = run_copy / "checkpoints" / "student_2_last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy), checkpoint="last")

    assert_rejected(capsys, monkeypatch, cfg, run_copy, "truncated or corrupt", path)


def test_flipped_weight_bytes_rejected(
    run_copy, eval_cfg, capsys, monkeypatch, corrupt_tensor_data
):
    path = run_copy / "checkpoints" / "student_0_best.pt"
    corrupt_tensor_data(path)
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(
        capsys, monkeypatch, cfg, run_copy, f"Checkpoint {path} is corrupt", "does not match"
    )


def test_other_arch_weights_rejected(run_copy, eval_cfg, capsys, monkeypatch):
    path = run_copy / "checkpoints" / "student_0_best.pt"
    payload = torch.load(path, weights_only=True)
    resnet = build_student("resnet20", in_channels=1, image_size=8, num_classes=10)
    payload["state_dict"] = resnet.state_dict()
    save_checkpoint(path, payload)
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(
        capsys, monkeypatch, cfg, run_copy, "does not fit arch 'lenet5'", path, "missing keys"
    )


def test_checkpoint_of_other_student_rejected(run_copy, eval_cfg, capsys, monkeypatch):
    path = run_copy / "checkpoints" / "student_0_best.pt"
    shutil.copyfile(run_copy / "checkpoints" / "student_1_best.pt", path)
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(capsys, monkeypatch, cfg, run_copy, path, "name='student_1'")


def test_absent_data_rejected(run_copy, eval_cfg, tmp_path, capsys, monkeypatch):
    empty_root = tmp_path / "empty_data"
    empty_root.mkdir()

    def point_at_mnist(config):
        config["dataset"].update(name="mnist", root=str(empty_root), download=True)

    edit_run_config(run_copy, point_at_mnist)
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(capsys, monkeypatch, cfg, run_copy, "mnist", "not found", empty_root)


def test_dataset_root_override_applies(run_copy, eval_cfg, tmp_path, capsys, monkeypatch):
    edit_run_config(run_copy, lambda config: config["dataset"].update(name="mnist"))
    override_root = tmp_path / "moved_data"
    override_root.mkdir()
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy), dataset={"root": str(override_root)})

    assert_rejected(capsys, monkeypatch, cfg, run_copy, override_root)


def test_unknown_target_rejected(run_copy, eval_cfg, capsys, monkeypatch):
    def unsafe_optimizer(config):
        config["optimizer"]["_target_"] = "os.system"

    edit_run_config(run_copy, unsafe_optimizer)
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy))

    assert_rejected(capsys, monkeypatch, cfg, run_copy, "optimizer._target_='os.system'")


class MakeMarker:
    """A pickled object that creates a folder when a full unpickler rebuilds it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_cli_rejects_code_in_checkpoint(run_copy, tmp_path):
    path = run_copy / "checkpoints" / "student_0_best.pt"
    marker = tmp_path / "marker"
    torch.save({"format": STUDENT_FORMAT, "state_dict": MakeMarker(marker)}, path)
    # The same payload does run code under a full unpickler.
    probe = tmp_path / "probe.pt"
    probe_marker = tmp_path / "probe_marker"
    torch.save({"state_dict": MakeMarker(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.is_dir()

    result = run_cli(DML_EVAL, [f"run_dir={run_copy}", "device=cpu"], tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Rejected checkpoint" in result.stderr
    assert str(path) in result.stderr
    assert not marker.exists()
    assert not (run_copy / "eval").exists()


class RunsShellCommand:
    """A pickled object that runs a shell command when a full unpickler rebuilds it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_rejects_raw_pickle_quietly(run_copy, tmp_path):
    path = run_copy / "checkpoints" / "student_1_best.pt"
    marker = tmp_path / "marker"
    with open(path, "wb") as file:
        pickle.dump(RunsShellCommand(marker), file, protocol=4)

    result = run_cli(DML_EVAL, [f"run_dir={run_copy}", "device=cpu"], tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"dml-eval: error: Rejected checkpoint {path}: ")
    assert "not a PyTorch checkpoint" in result.stderr
    assert not marker.exists()
    assert not (run_copy / "eval").exists()


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("chekpoint=last", ["no key 'chekpoint'", "did you mean checkpoint?", "Valid keys:"]),
        ("foo=1", ["no key 'foo'", "run_dir, checkpoint, split", "device=auto|cpu|cuda"]),
        ("device=banana", ["device/banana", "auto, cpu, cuda"]),
    ],
)
def test_cli_composition_error_one_line(run_copy, tmp_path, override, fragments):
    result = run_cli(DML_EVAL, [f"run_dir={run_copy}", override], tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("dml-eval: error: ")
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (run_copy / "eval").exists()
    assert list(tmp_path.iterdir()) == [run_copy]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"checkpoint": "middle"}, "checkpoint='middle'"),
        ({"split": "train"}, "split='train'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"precision": "8"}, "precision='8'"),
        ({"device": {"type": "tpu"}}, "device='tpu'"),
    ],
)
def test_invalid_option_rejected(run_copy, eval_cfg, capsys, monkeypatch, values, fragment):
    cfg = cfg_for(eval_cfg, run_dir=str(run_copy), **values)

    assert_rejected(capsys, monkeypatch, cfg, run_copy, fragment)


def test_full_error_raises_traceback(eval_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    cfg = cfg_for(eval_cfg, run_dir=str(tmp_path / "no_such_run"))

    with pytest.raises(CheckpointError, match="Run folder not found"):
        run_job(cfg)

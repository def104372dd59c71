"""arch_args and optimizer arguments are checked before any data loads or any file is written."""

import os
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir

from dml_cli import data, torchvision_datasets
from dml_cli.config import config_dir
from dml_cli.dry_build import DataShape, check_cohort_build, config_shape
from dml_cli.errors import ConfigError
from dml_cli.preflight import check_command_line

DML_TRAIN = shutil.which("dml-train")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "digits", "synthetic")
COHORTS = ("two_lenets", "three_lenets", "four_lenets", "homogeneous", "lenet_mlp", "two_resnet32")

# (overrides, texts the one-line error must contain: the key, the value and the fix)
INVALID = {
    "lenet5_unknown_arch_arg": (
        ["dataset=digits", "+cohort.students.0.arch_args={width: -3}"],
        [
            "Invalid cohort.students[0].arch_args={'width': -3} for student_0",
            "dataset digits (1x8x8 images, 10 classes)",
            "arch_args.width is not accepted by arch 'lenet5'; remove it",
        ],
    ),
    "mlp_negative_hidden_size": (
        ["cohort=lenet_mlp", "cohort.students.1.arch_args.hidden_sizes=[-3]"],
        [
            "Invalid cohort.students[1].arch_args={'hidden_sizes': [-3]} for student_1",
            "dataset mnist (1x28x28 images, 10 classes)",
            "use a list of positive integers",
        ],
    ),
    "generated_cohort_dropout": (
        [
            "dataset=cifar100",
            "cohort=homogeneous",
            "cohort.arch=mlp",
            "+cohort.arch_args.dropout=1.5",
        ],
        [
            "Invalid cohort.arch_args={'dropout': 1.5} for student_0",
            "dataset cifar100 (3x32x32 images, 100 classes)",
            "arch_args.dropout=1.5 is invalid; use a number in [0, 1)",
        ],
    ),
    "torchvision_images_too_small": (
        ["dataset=digits", "cohort.students.1.arch=alexnet"],
        [
            "Invalid cohort.students[1].arch='alexnet' for student_1",
            "torchvision arch 'alexnet' failed on 1x8x8 images",
            "resize the images, change arch_args or choose another arch",
        ],
    ),
    "torchvision_unknown_arch_arg": (
        [
            "dataset=cifar10",
            "cohort.students.2.arch=resnet18",
            "+cohort.students.2.arch_args={depth_multiplier: 2}",
        ],
        [
            "Invalid cohort.students[2].arch_args={'depth_multiplier': 2} for student_2",
            "arch_args.depth_multiplier is not accepted by torchvision arch 'resnet18'",
        ],
    ),
    "synthetic_image_too_small": (
        ["dataset=synthetic", "dataset.shape=[1,3,3]"],
        [
            "Invalid cohort.students[0].arch='lenet5' for student_0",
            "dataset synthetic (1x3x3 images, 10 classes)",
            "image_size=3 is too small for arch 'lenet5'; it needs image_size >= 4",
        ],
    ),
    "negative_momentum": (
        ["optimizer.momentum=-1"],
        [
            "Invalid optimizer.momentum=-1: torch.optim.SGD rejected it",
            "Invalid momentum value: -1",
            "remove optimizer.momentum to use its default",
        ],
    ),
    "adam_beta_above_one": (
        ["optimizer=adam", "optimizer.betas=[2,0.9]"],
        [
            "Invalid optimizer.betas=[2, 0.9]: torch.optim.Adam rejected it",
            "Invalid beta parameter at index 0: 2",
        ],
    ),
    "negative_weight_decay": (
        ["optimizer=adamw", "optimizer.weight_decay=-1"],
        [
            "Invalid optimizer.weight_decay=-1: torch.optim.AdamW rejected it",
            "Invalid weight_decay value: -1",
        ],
    ),
    "nesterov_without_momentum": (
        ["optimizer.momentum=0"],
        [
            "Invalid optimizer.nesterov=True: torch.optim.SGD rejected it",
            "Nesterov momentum requires a momentum and zero dampening",
        ],
    ),
    "unknown_optimizer_key": (
        ["+optimizer.momentom=0.9"],
        [
            "Invalid optimizer.momentom=0.9: torch.optim.SGD rejected it",
            "unexpected keyword argument 'momentom'",
            "remove optimizer.momentom",
        ],
    ),
    "fused_with_foreach": (
        ["+optimizer.foreach=true"],
        ["Invalid optimizer.foreach=True", "`fused` and `foreach` cannot be `True` together"],
    ),
    "student_optimizer_override": (
        ["cohort=two_lenets", "+cohort.students.1.optimizer={momentum: -0.5}"],
        [
            "Invalid cohort.students[1].optimizer.momentum=-0.5 for student_1",
            "Invalid momentum value: -0.5",
        ],
    ),
}


def compose_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def no_data_access(monkeypatch, tmp_path):
    """Fail the test if anything loads a dataset, and run it in an empty folder."""

    def fail(*args, **kwargs):
        raise AssertionError("the check loaded or looked up a dataset")

    for name in ("load_dataset", "_load_digits", "_make_synthetic"):
        monkeypatch.setattr(data, name, fail)
    monkeypatch.setattr(torchvision_datasets, "_torchvision_class", fail)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_build_argument_names_key(no_data_access, case):
    overrides, expected = INVALID[case]

    with pytest.raises(ConfigError) as error:
        check_command_line(overrides)

    message = str(error.value)
    assert "\n" not in message
    for text in expected:
        assert text in message
    assert list(no_data_access.iterdir()) == []


@pytest.mark.parametrize("dataset", DATASETS)
def test_shipped_cohorts_pass_check(no_data_access, dataset):
    for cohort in COHORTS:
        check_cohort_build(compose_cfg([f"dataset={dataset}", f"cohort={cohort}"]))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_shipped_optimizers_pass_check(no_data_access, optimizer):
    check_command_line([f"optimizer={optimizer}"])
    check_command_line([f"optimizer={optimizer}", "optimizer.fused=null"])


def test_check_keeps_random_state(no_data_access):
    state = torch.get_rng_state()

    check_command_line(["dataset=digits", "seed=7"])

    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset=digits"],
        ["dataset=synthetic", "dataset.shape=[3,12,12]", "dataset.num_classes=4"],
    ],
)
def test_config_shape_matches_loaded_data(overrides):
    cfg = compose_cfg(overrides)

    splits = data.load_dataset(cfg.dataset)

    loaded = DataShape(splits.in_channels, splits.image_size, splits.num_classes)
    assert config_shape(cfg.dataset) == loaded


def test_config_shape_of_torchvision_datasets():
    shapes = {name: config_shape(compose_cfg([f"dataset={name}"]).dataset) for name in DATASETS}

    assert shapes["mnist"] == DataShape(1, 28, 10)
    assert shapes["fashion_mnist"] == DataShape(1, 28, 10)
    assert shapes["cifar10"] == DataShape(3, 32, 10)
    assert shapes["cifar100"] == DataShape(3, 32, 100)


def test_unknown_dataset_shape_skips_check():
    cfg = compose_cfg(["dataset=digits", "+cohort.students.0.arch_args={width: -3}"])
    cfg.dataset.name = "folder"

    assert config_shape(cfg.dataset) is None
    check_cohort_build(cfg)


def test_meta_unbuildable_arch_passes_check(no_data_access):
    # torchvision's regnet builders read tensor values, which meta tensors do not have.
    check_command_line(["dataset=cifar10", "cohort.students.0.arch=regnet_y_400mf"])


def test_cli_rejects_before_run_folder(tmp_path):
    assert DML_TRAIN is not None, "dml-train is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    overrides, expected = INVALID["lenet5_unknown_arch_arg"]

    result = subprocess.run(
        [DML_TRAIN, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dml-train: error: Invalid cohort.students[0].arch_args=")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()
    assert list(tmp_path.iterdir()) == []

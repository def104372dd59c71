import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dml_cli.build import build_optimizers, build_schedulers, build_students, student_specs
from dml_cli.config import config_dir, validate_config
from dml_cli.errors import ConfigError
from dml_cli.models import count_parameters

CONF = Path(config_dir())
GROUPS = ["dataset", "cohort", "optimizer", "scheduler", "loss", "trainer", "device", "logger"]

# Input shape and class count of each bundled dataset, as load_dataset reports them.
DATASET_SHAPES = {
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "digits": (1, 8, 10),
    "synthetic": (1, 28, 10),
}


def options(group):
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_train(overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=list(overrides))


def test_default_config_matches_documented_defaults():
    cfg = compose_train()

    assert cfg.dataset.name == "mnist"
    assert cfg.dataset.root == "data/"
    assert cfg.dataset.val_size == 0.1
    assert cfg.cohort.name == "three_lenets"
    assert [s.arch for s in cfg.cohort.students] == ["lenet5"] * 3
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler._target_ is None
    assert OmegaConf.to_container(cfg.loss) == {
        "name": "dml",
        "temperature": 1.0,
        "mimicry_weight": 1.0,
        "update": "simultaneous",
        "mimicry": "pairwise",
    }
    assert cfg.trainer.epochs == 5
    assert cfg.device.type == "auto"
    assert cfg.seed == 0
    assert cfg.resume is None


def test_every_group_has_expected_options():
    assert options("dataset") == sorted(DATASET_SHAPES)
    assert set(options("cohort")) >= {
        "two_lenets",
        "three_lenets",
        "four_lenets",
        "lenet_mlp",
        "two_resnet32",
        "homogeneous",
    }
    assert options("optimizer") == ["adam", "adamw", "sgd"]
    assert options("scheduler") == ["cosine", "none", "step"]
    assert options("loss") == ["dml", "independent"]
    assert options("device") == ["auto", "cpu", "cuda"]


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in options(group)]
)
def test_every_option_composes_and_validates(override):
    cfg = compose_train([override])

    OmegaConf.resolve(cfg)
    validate_config(cfg)


def test_digits_trains_longer_unless_told():
    assert compose_train(["dataset=digits"]).trainer.epochs == 20
    assert compose_train(["dataset=digits", "trainer.epochs=3"]).trainer.epochs == 3


def test_independent_loss_turns_mimicry_off():
    cfg = compose_train(["loss=independent"])

    assert cfg.loss.mimicry_weight == 0.0


@pytest.mark.parametrize("dataset", sorted(DATASET_SHAPES))
@pytest.mark.parametrize("cohort", options("cohort"))
def test_every_cohort_builds_for_every_dataset(cohort, dataset):
    in_channels, image_size, num_classes = DATASET_SHAPES[dataset]
    cfg = compose_train([f"cohort={cohort}", f"dataset={dataset}"])
    specs = student_specs(cfg.cohort, seed=0)

    students = build_students(
        specs, in_channels=in_channels, image_size=image_size, num_classes=num_classes
    )

    images = torch.zeros(2, in_channels, image_size, image_size)
    for student in students:
        student.eval()
        with torch.no_grad():
            assert student(images).shape == (2, num_classes)


def test_students_start_from_different_weights():
    cfg = compose_train(["cohort=three_lenets"])
    specs = student_specs(cfg.cohort, seed=5)

    students = build_students(specs, in_channels=1, image_size=28, num_classes=10)

    assert [spec.init_seed for spec in specs] == [5000, 5001, 5002]
    first = [next(student.parameters()) for student in students]
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[1], first[2])
    again = build_students(specs, in_channels=1, image_size=28, num_classes=10)
    assert torch.equal(first[0], next(again[0].parameters()))


def test_homogeneous_cohort_expands_size():
    cfg = compose_train(["cohort=homogeneous", "cohort.arch=mlp", "cohort.size=4"])

    specs = student_specs(cfg.cohort, seed=0)

    assert [spec.name for spec in specs] == [f"student_{i}" for i in range(4)]
    assert {spec.arch for spec in specs} == {"mlp"}


def test_unknown_arch_names_the_key_set():
    generated = compose_train(["cohort=homogeneous", "cohort.arch=resnet18000"])
    listed = compose_train(["cohort=two_lenets", "cohort.students.1.arch=resnet18000"])

    with pytest.raises(ConfigError, match=r"for student_0 \(cohort\.arch\)"):
        student_specs(generated.cohort, seed=0)
    with pytest.raises(ConfigError, match=r"for student_1 \(cohort\.students\[1\]\.arch\)"):
        student_specs(listed.cohort, seed=0)


def test_per_student_optimizer_overrides_apply():
    cfg = compose_train(
        ["cohort=two_lenets", "+cohort.students.1.optimizer={lr: 0.01}", "optimizer.lr=0.2"]
    )
    specs = student_specs(cfg.cohort, seed=0)
    students = build_students(specs, in_channels=1, image_size=28, num_classes=10)

    optimizers = build_optimizers(cfg.optimizer, specs, students)

    assert optimizers[0].param_groups[0]["lr"] == 0.2
    assert optimizers[1].param_groups[0]["lr"] == 0.01
    assert optimizers[0].param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_shipped_optimizers_fused_match_for_loop(optimizer):
    cfg = compose_train([f"optimizer={optimizer}", "cohort=two_lenets"])
    specs = student_specs(cfg.cohort, seed=0)
    students = build_students(specs, in_channels=1, image_size=28, num_classes=10)
    for_loop_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.optimizer), {"fused": None})
    for_loop_cfg.foreach = False
    for_loop_students = [copy.deepcopy(student) for student in students]

    fused = build_optimizers(cfg.optimizer, specs, students)
    for_loop = build_optimizers(for_loop_cfg, specs, for_loop_students)

    assert [o.defaults["fused"] for o in fused] == [True, True]
    assert [o.defaults["fused"] for o in for_loop] == [None, None]
    images = torch.randn(8, 1, 28, 28)
    for cohort, optimizers in ((students, fused), (for_loop_students, for_loop)):
        for _ in range(3):
            for student, opt in zip(cohort, optimizers, strict=True):
                opt.zero_grad()
                student(images).square().mean().backward()
                opt.step()
    for student, reference in zip(students, for_loop_students, strict=True):
        for param, expected in zip(student.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("none", type(None)),
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("step", torch.optim.lr_scheduler.StepLR),
    ],
)
def test_schedulers_build_per_student(scheduler, expected):
    cfg = compose_train([f"scheduler={scheduler}", "cohort=two_lenets"])
    specs = student_specs(cfg.cohort, seed=0)
    students = build_students(specs, in_channels=1, image_size=28, num_classes=10)
    optimizers = build_optimizers(cfg.optimizer, specs, students)

    schedulers = build_schedulers(cfg.scheduler, optimizers)

    assert len(schedulers) == 2
    assert all(isinstance(s, expected) for s in schedulers)


def test_step_scheduler_is_paper_schedule():
    cfg = compose_train(["scheduler=step"])

    assert cfg.scheduler.step_size == 60
    assert cfg.scheduler.gamma == 0.1


def test_lenet_mlp_is_heterogeneous():
    cfg = compose_train(["cohort=lenet_mlp"])
    specs = student_specs(cfg.cohort, seed=0)
    students = build_students(specs, in_channels=1, image_size=28, num_classes=10)

    assert [spec.arch for spec in specs] == ["lenet5", "mlp"]
    assert count_parameters(students[0]) != count_parameters(students[1])

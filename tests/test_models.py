"""Tests for the architecture registry in dml_cli.models."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dml_cli.errors import ConfigError
from dml_cli.models import (
    ARCHS,
    GrayscaleToRGB,
    ZeroPadShortcut,
    build_student,
    count_parameters,
    is_convolutional,
    is_known_arch,
    known_archs,
    use_channels_last,
)

OWN_ARCHS = sorted(ARCHS)

# (in_channels, image_size, num_classes): scikit-learn digits, MNIST, CIFAR-100.
DATA_SHAPES = [(1, 8, 10), (1, 28, 10), (3, 32, 100)]


def _build(arch, in_channels=1, image_size=28, num_classes=10, **arch_args):
    return build_student(
        arch,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        **arch_args,
    )


@pytest.mark.parametrize("arch", OWN_ARCHS)
@pytest.mark.parametrize(("in_channels", "image_size", "num_classes"), DATA_SHAPES)
def test_own_arch_logits_shape(arch, in_channels, image_size, num_classes):
    torch.manual_seed(0)
    student = _build(arch, in_channels, image_size, num_classes)
    images = torch.randn(3, in_channels, image_size, image_size)

    logits = student(images)

    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
def test_gradient_reaches_every_parameter(arch):
    torch.manual_seed(0)
    student = _build(arch, in_channels=1, image_size=28, num_classes=10)
    images = torch.randn(4, 1, 28, 28)
    labels = torch.tensor([0, 3, 7, 9])

    F.cross_entropy(student(images), labels).backward()

    for name, param in student.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("arch", "published"),
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6)],
)
def test_resnet_parameter_count_matches_paper(arch, published):
    student = _build(arch, in_channels=3, image_size=32, num_classes=10)

    assert count_parameters(student) == pytest.approx(published, rel=0.02)


def test_resnet_shortcuts_add_no_parameters():
    student = _build("resnet20", in_channels=3, image_size=32, num_classes=10)
    shortcuts = [module for module in student.modules() if isinstance(module, ZeroPadShortcut)]

    # One shortcut changes the shape at the start of stage 2 and one at the start of stage 3.
    assert len(shortcuts) == 2
    for shortcut in shortcuts:
        assert count_parameters(shortcut, trainable_only=False) == 0


def test_resnet_convs_use_kaiming_init():
    torch.manual_seed(0)
    student = _build("resnet20", in_channels=3, image_size=32, num_classes=10)
    convs = [module for module in student.modules() if isinstance(module, nn.Conv2d)]

    assert len(convs) == 19
    for conv in convs:
        # Kaiming normal with fan_out = out_channels x 3 x 3 and the ReLU gain sqrt(2).
        expected_std = (2 / (conv.out_channels * 9)) ** 0.5
        assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.15)


def test_zero_pad_shortcut_output():
    shortcut = ZeroPadShortcut(stride=2, extra_channels=16)
    features = torch.arange(2 * 16 * 5 * 5, dtype=torch.float32).reshape(2, 16, 5, 5)

    out = shortcut(features)

    assert out.shape == (2, 32, 3, 3)
    assert torch.equal(out[:, :16], features[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_resnet_stem_follows_in_channels():
    gray = _build("resnet20", in_channels=1, image_size=28, num_classes=10)
    color = _build("resnet20", in_channels=3, image_size=28, num_classes=10)

    # Only the first 3x3 conv with 16 filters differs: 2 extra channels x 16 x 3 x 3 weights.
    assert count_parameters(color) - count_parameters(gray) == 2 * 16 * 3 * 3


def test_lenet5_classic_parameter_counts():
    mnist = _build("lenet5", in_channels=1, image_size=28, num_classes=10)
    cifar = _build("lenet5", in_channels=3, image_size=32, num_classes=10)

    # conv1 156 + conv2 2,416 + fc 400->120 48,120 + fc 120->84 10,164 + fc 84->10 850.
    assert count_parameters(mnist) == 61706
    # Same 16x5x5 map without padding, and conv1 has 3 x 6 x 25 + 6 = 456 parameters.
    assert count_parameters(cifar) == 62006


def test_lenet5_digits_keeps_two_by_two_map():
    student = _build("lenet5", in_channels=1, image_size=8, num_classes=10)

    features = student.features(torch.zeros(2, 1, 8, 8))

    assert features.shape == (2, 16, 2, 2)


def test_lenet5_rejects_tiny_images():
    with pytest.raises(ConfigError, match="image_size=3"):
        _build("lenet5", in_channels=1, image_size=3)


def test_mlp_hidden_sizes_and_dropout():
    student = _build("mlp", in_channels=1, image_size=8, hidden_sizes=[32], dropout=0.5)
    dropouts = [module for module in student.modules() if isinstance(module, nn.Dropout)]

    # 64 inputs -> 32 hidden: 64 * 32 + 32, then 32 -> 10 classes: 32 * 10 + 10.
    assert count_parameters(student) == 2080 + 330
    assert len(dropouts) == 1
    assert dropouts[0].p == 0.5


def test_mlp_default_hidden_sizes():
    student = _build("mlp", in_channels=3, image_size=32, num_classes=100)
    widths = [module.out_features for module in student.modules() if isinstance(module, nn.Linear)]

    assert widths == [256, 128, 100]
    assert not any(isinstance(module, nn.Dropout) for module in student.modules())


@pytest.mark.parametrize(
    "arch_args",
    [
        {"hidden_sizes": 64},
        {"hidden_sizes": [64, 0]},
        {"hidden_sizes": "64"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"dropout": "0.5"},
    ],
)
def test_mlp_rejects_invalid_arch_args(arch_args):
    key = next(iter(arch_args))

    with pytest.raises(ConfigError, match=f"arch_args.{key}"):
        _build("mlp", **arch_args)


@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (3, 32)])
def test_torchvision_resnet18_builds(in_channels, image_size):
    torch.manual_seed(0)
    student = _build("resnet18", in_channels=in_channels, image_size=image_size)

    logits = student(torch.randn(2, in_channels, image_size, image_size))

    assert logits.shape == (2, 10)
    assert student.training
    assert isinstance(student, GrayscaleToRGB) == (in_channels == 1)


def test_grayscale_wrapper_prefixes_state_dict():
    torch.manual_seed(0)
    gray = _build("resnet18", in_channels=1, image_size=28)
    torch.manual_seed(0)
    color = _build("resnet18", in_channels=3, image_size=28)

    images = torch.randn(2, 1, 28, 28)
    gray.eval()
    color.eval()

    assert list(gray.state_dict()) == [f"model.{key}" for key in color.state_dict()]
    assert torch.allclose(gray(images), color(images.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="1-channel"):
        gray(images.repeat(1, 3, 1, 1))


def test_torchvision_never_downloads_weights(monkeypatch):
    def fail_download(*args, **kwargs):
        raise AssertionError("build_student tried to download weights")

    # Every torchvision weights enum loads its file through WeightsEnum.get_state_dict.
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fail_download)

    student = _build("mobilenet_v3_small", in_channels=3, image_size=32)

    assert count_parameters(student) > 0


def test_torchvision_rejects_weights_arg():
    with pytest.raises(ConfigError, match="arch_args.weights"):
        _build("resnet18", weights="DEFAULT")


def test_torchvision_rejects_unknown_arch_arg():
    with pytest.raises(ConfigError, match="arch_args.depth_multiplier.*'resnet18'"):
        _build("resnet18", depth_multiplier=2)


def test_torchvision_rejects_other_channel_counts():
    with pytest.raises(ConfigError, match="in_channels=2"):
        _build("resnet18", in_channels=2)


def test_torchvision_small_image_raises_config_error():
    with pytest.raises(ConfigError, match="'alexnet' failed on 3x28x28"):
        _build("alexnet", in_channels=3, image_size=28)


def test_vit_gets_image_size_from_data():
    with pytest.raises(ConfigError, match="image_size=28"):
        _build("vit_b_32", in_channels=3, image_size=28)

    student = _build("vit_b_32", in_channels=3, image_size=32)

    assert student.image_size == 32


def test_googlenet_returns_plain_logits():
    student = _build("googlenet", in_channels=3, image_size=32)

    logits = student(torch.randn(2, 3, 32, 32))

    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 10)
    with pytest.raises(ConfigError, match="arch_args.aux_logits"):
        _build("googlenet", in_channels=3, image_size=32, aux_logits=True)


def test_unknown_arch_names_it():
    with pytest.raises(ConfigError, match="unknown arch 'resnet19'") as excinfo:
        _build("resnet19")

    message = str(excinfo.value)
    for arch in OWN_ARCHS:
        assert arch in message
    assert "torchvision" in message


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
def test_own_arch_rejects_unknown_arch_arg(arch):
    with pytest.raises(ConfigError, match=f"arch_args.width.*'{arch}'"):
        _build(arch, width=2)


def test_mlp_unknown_arch_arg_lists_choices():
    with pytest.raises(ConfigError, match="dropout, hidden_sizes"):
        _build("mlp", hidden=[10])


@pytest.mark.parametrize(
    ("shape_args", "key"),
    [
        ({"in_channels": 0}, "in_channels=0"),
        ({"image_size": -8}, "image_size=-8"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"num_classes": 10.0}, "num_classes=10.0"),
    ],
)
def test_invalid_shape_args_raise(shape_args, key):
    with pytest.raises(ConfigError, match=key):
        _build("lenet5", **shape_args)


def test_count_parameters_tiny_linear():
    layer = nn.Linear(3, 2)

    assert count_parameters(layer) == 8

    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6
    assert count_parameters(layer, trainable_only=False) == 8


def test_count_parameters_counts_shared_once():
    layer = nn.Linear(4, 4, bias=False)
    shared = nn.Sequential(layer, layer)

    assert count_parameters(shared) == 16


@pytest.mark.parametrize(
    "arch", ["lenet5", "mlp", "resnet20", "resnet110", "resnet18", "vit_b_16"]
)
def test_is_known_arch_accepts(arch):
    assert is_known_arch(arch)


@pytest.mark.parametrize(
    "arch",
    ["resnet19", "", "ResNet18", "fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18"],
)
def test_is_known_arch_rejects(arch):
    assert not is_known_arch(arch)


def test_known_archs_sorted_with_note():
    names = known_archs()

    assert names[:-1] == OWN_ARCHS
    assert names[:-1] == sorted(names[:-1])
    assert "torchvision" in names[-1]


def test_is_convolutional_per_arch():
    assert is_convolutional(_build("lenet5"))
    assert is_convolutional(_build("resnet20"))
    assert is_convolutional(_build("resnet18"))
    assert not is_convolutional(_build("mlp"))


def test_channels_last_only_for_all_convolutional_cohorts():
    lenets = [_build("lenet5"), _build("lenet5")]

    assert use_channels_last(True, lenets)
    assert not use_channels_last(False, lenets)
    assert not use_channels_last(True, [_build("lenet5"), _build("mlp")])


@pytest.mark.parametrize("arch", [*OWN_ARCHS, "resnet18"])
def test_seed_controls_initial_weights(arch):
    def initial_weights(seed):
        torch.manual_seed(seed)
        student = _build(arch, in_channels=1, image_size=28)
        return list(student.state_dict().values())

    first = initial_weights(0)
    same = initial_weights(0)
    other = initial_weights(1)

    assert all(torch.equal(a, b) for a, b in zip(first, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))

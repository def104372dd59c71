"""Architecture registry: build one student network from an arch name and the data's shape.

The project's own archs live in `ARCHS`. Any other name is looked up among torchvision's
classification models and built with random weights, never pretrained ones.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dml_cli.errors import ConfigError

log = logging.getLogger(__name__)

# Arguments that build_student passes to every constructor, so arch_args cannot set them.
_SHAPE_ARGS = ("in_channels", "image_size", "num_classes")

# torchvision's googlenet and inception_v3 return a namedtuple with auxiliary logits in train
# mode, and with init_weights unset they warn and then use init_weights=True (torchvision 0.29).
# So they are built without the auxiliary heads and with init_weights=True set explicitly.
_TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, classes.

    LeNet-5 was laid out for 32x32 inputs, which give conv1 a 32x32 input and conv2 a 14x14 one.
    A conv whose input is smaller than that gets padding 2, which keeps its map size. So 28x28
    MNIST ends in the classic 16x5x5 map (61,706 parameters for 10 classes) and 8x8 digits in
    16x2x2.
    """

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ConfigError(
                f"image_size={image_size} is too small for arch 'lenet5'; it needs image_size >= 4"
            )
        conv1_padding = 2 if image_size < 32 else 0
        side = (image_size + 2 * conv1_padding - 4) // 2
        conv2_padding = 2 if side < 14 else 0
        side = (side + 2 * conv2_padding - 4) // 2

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=conv1_padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=conv2_padding),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class MLP(nn.Sequential):
    """Multilayer perceptron on flattened pixels: Linear and ReLU per hidden size, then Linear.

    With dropout > 0, a Dropout layer follows each hidden ReLU.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        is_list = isinstance(hidden_sizes, Sequence) and not isinstance(hidden_sizes, str)
        if not is_list or not all(_is_positive_int(size) for size in hidden_sizes):
            raise ConfigError(
                f"arch_args.hidden_sizes={hidden_sizes} is invalid for arch 'mlp'; "
                "use a list of positive integers such as [256, 128]"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ConfigError(f"arch_args.dropout={dropout!r} is invalid; use a number in [0, 1)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"arch_args.dropout={dropout} is invalid; use a number in [0, 1)")

        hidden_sizes = list(hidden_sizes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut ("option A"): subsample by the stride, then append zero channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features[:, :, :: self.stride, :: self.stride]
        return F.pad(features, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv + batch norm layers, with ReLU after the addition."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(features)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(features))


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016): a 3x3 conv, three stages of 16/32/64 channels, fc.

    Each stage has n BasicBlocks, so depth = 6n + 2. Shortcuts that change the shape are option A
    (ZeroPadShortcut), which adds no parameters, so resnet20/32/56/110 have the published
    0.27M/0.46M/0.85M/1.7M parameters. Global average pooling lets any image size work.
    """

    def __init__(self, *, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(F.relu(self.bn1(self.conv1(images))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        return CifarResNet(depth=depth, in_channels=in_channels, num_classes=num_classes)

    build.__name__ = f"resnet{depth}"
    return build


class GrayscaleToRGB(nn.Module):
    """Wrapper that repeats a 1-channel image to the 3 channels a torchvision model expects.

    It adds no parameters, so its state_dict keys are the wrapped model's keys with the
    prefix "model.".
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != 1:
            raise ValueError(f"expected 1-channel images, got shape {tuple(images.shape)}")
        return self.model(images.expand(-1, 3, -1, -1))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "resnet110": _cifar_resnet(110),
}

_TORCHVISION_NOTE = "any torchvision classification model name such as resnet18"


@functools.cache
def _torchvision_archs() -> frozenset[str]:
    # module=torchvision.models lists only classification models, without the detection,
    # segmentation, video, optical flow and quantized ones.
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def known_archs() -> list[str]:
    """Return the sorted own arch names, then one entry that is a note, not an arch name.

    The note states that any torchvision classification model name is accepted as well.
    """
    return [*sorted(ARCHS), f"({_TORCHVISION_NOTE})"]


def is_known_arch(arch: str) -> bool:
    """Return whether arch is an own arch or a torchvision classification model name."""
    return isinstance(arch, str) and (arch in ARCHS or arch in _torchvision_archs())


def build_student(
    arch: str, *, in_channels: int, image_size: int, num_classes: int, **arch_args: Any
) -> nn.Module:
    """Build one randomly initialized student that maps N,C,H,W images to N,num_classes logits.

    Weights come from torch's global generator, so torch.manual_seed fixes them. A torchvision
    model gets one forward pass on a zero image at build time, so an image that is too small for
    it raises ConfigError here and not in the first training step.

    Raises:
        ConfigError: for an unknown arch, arch_args that the arch does not accept, or shape
            arguments that the arch cannot handle.
    """
    _check_shape_args(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    shape_args = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}

    if isinstance(arch, str) and arch in ARCHS:
        _check_own_arch_args(arch, arch_args)
        model = ARCHS[arch](**shape_args, **arch_args)
    elif is_known_arch(arch):
        model = _build_torchvision(arch, **shape_args, arch_args=arch_args)
    else:
        raise ConfigError(_unknown_arch_message(arch))

    log.debug("built arch=%s with %d trainable parameters", arch, count_parameters(model))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Count the model's parameters, each shared tensor once, by default only trainable ones."""
    return sum(
        param.numel() for param in model.parameters() if param.requires_grad or not trainable_only
    )


def is_convolutional(model: nn.Module) -> bool:
    """Return whether the model contains an nn.Conv2d."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def use_channels_last(enabled: bool, students: list[nn.Module]) -> bool:
    """Return whether to run `students` in channels-last memory format.

    Only when `enabled` (the `trainer.channels_last` setting) and every student is
    convolutional: channels-last speeds up convolutions on CUDA and with oneDNN on the CPU
    (benchmarks/README.md), and it would only add copies to a student without convolutions.
    """
    return bool(enabled) and all(is_convolutional(student) for student in students)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_shape_args(*, in_channels: int, image_size: int, num_classes: int) -> None:
    for name, value in (("in_channels", in_channels), ("image_size", image_size)):
        if not _is_positive_int(value):
            raise ConfigError(f"{name}={value!r} is invalid; use a positive integer")
    if not _is_positive_int(num_classes) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} is invalid; a classifier needs at least 2")


def _check_own_arch_args(arch: str, arch_args: dict[str, Any]) -> None:
    parameters = inspect.signature(ARCHS[arch]).parameters
    accepted = sorted(name for name in parameters if name not in _SHAPE_ARGS)
    for name in arch_args:
        if name not in accepted:
            choices = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"arch_args.{name} is not accepted by arch '{arch}'; "
                f"remove it (arch_args of '{arch}': {choices})"
            )


def _build_torchvision(
    arch: str, *, in_channels: int, image_size: int, num_classes: int, arch_args: dict[str, Any]
) -> nn.Module:
    if in_channels not in (1, 3):
        raise ConfigError(
            f"in_channels={in_channels} is not supported by torchvision arch '{arch}', which "
            f"takes 1 or 3 channels; use one of {', '.join(sorted(ARCHS))} instead"
        )
    if "weights" in arch_args:
        raise ConfigError(
            f"arch_args.weights is not supported for arch '{arch}': students always start from "
            "random weights, so remove the key"
        )
    if arch in _TORCHVISION_DEFAULTS and arch_args.get("aux_logits"):
        raise ConfigError(
            f"arch_args.aux_logits=true is not supported for arch '{arch}' because a student "
            "must return one logits tensor; remove the key"
        )

    kwargs = {
        **_TORCHVISION_DEFAULTS.get(arch, {}),
        **_torchvision_size_args(arch, image_size),
        **arch_args,
    }
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        # Raised for a keyword that the model class lacks, or one that the builder fixes itself.
        rejected = re.search(
            r"(unexpected|multiple values for) keyword argument '(\w+)'", str(err)
        )
        if rejected is None:
            raise
        raise ConfigError(
            f"arch_args.{rejected[2]} is not accepted by torchvision arch '{arch}'; remove it "
            f"or use another keyword of torchvision.models.{arch}"
        ) from err
    except (ValueError, AssertionError) as err:
        # torchvision constructors validate their arguments with ValueError or torch._assert.
        raise ConfigError(
            f"building torchvision arch '{arch}' with image_size={image_size} and "
            f"arch_args={arch_args} failed: {_first_line(err)}; change arch_args, resize the "
            "images or choose another arch"
        ) from err

    if in_channels == 1:
        model = GrayscaleToRGB(model)
    _check_forward(model, arch, in_channels=in_channels, image_size=image_size)
    return model


def _torchvision_size_args(arch: str, image_size: int) -> dict[str, Any]:
    # vit and maxvit build position embeddings or attention windows for one fixed input size,
    # 224 by default, so they get the data's size.
    if arch.startswith("vit_"):
        return {"image_size": image_size}
    if arch.startswith("maxvit_"):
        return {"input_size": (image_size, image_size)}
    return {}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_forward(model: nn.Module, arch: str, *, in_channels: int, image_size: int) -> None:
    # NOTE: most torchvision models were designed for 224x224 ImageNet images. With torchvision
    # 0.29, alexnet, inception_v3 and maxvit_t fail at 32x32, and vgg, densenet and convnext at
    # 28x28 as well. Others run but shrink the map to 1x1 early (resnet18 in its last stage).
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ConfigError(
            f"torchvision arch '{arch}' failed on {in_channels}x{image_size}x{image_size} images: "
            f"{_first_line(err)}; resize the images, change arch_args or choose another arch"
        ) from err
    finally:
        model.train(was_training)


def _unknown_arch_message(arch: object) -> str:
    message = f"unknown arch {arch!r}"
    if isinstance(arch, str):
        candidates = [*ARCHS, *_torchvision_archs()]
        close = difflib.get_close_matches(arch, candidates, n=3)
        if close:
            message += f" (did you mean {', '.join(close)}?)"
    return (
        f"{message}; use one of {', '.join(sorted(ARCHS))} or {_TORCHVISION_NOTE} "
        "(see torchvision.models.list_models())"
    )

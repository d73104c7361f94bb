"""Checkpoints in timm's Hugging Face format: ``config.json`` + ``model.safetensors`` (+ README.md).

Loading never unpickles: only safetensors weights are read, and a folder that offers pickled
weights alone (``.bin``, ``.pth``, ``.pt``, ``.ckpt``, ``.pkl``) is refused. Plain timm loads the
same folders with ``timm.create_model("local-dir:<folder>", pretrained=True)``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn

from chestxray.ckpt_config import KEY as META_KEY  # noqa: F401 (re-exported)
from chestxray.ckpt_config import CkptMeta, ensemble_of
from chestxray.ckpt_config import read_config  # noqa: F401 (re-exported; torch-free, for the registry)
from chestxray.hub import resolve
from chestxray.labels import name_set
from chestxray.layout import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, weights_dir  # noqa: F401 (re-exports)
from chestxray.models import ARCHS, create_model
from chestxray.transforms import GRAY_MEAN, GRAY_STD, Preprocess

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
#: ``pretrained_cfg`` fields timm carries over from the architecture's ImageNet weights (where they came
#: from, which paper): they do not describe weights trained here, so a saved config leaves them out.
FOREIGN_PROVENANCE = ("origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "hf_hub_filename", "url",
                      "file", "source")


def list_shipped() -> list[str]:
    """Names of the shipped checkpoints: sub-folders of :func:`weights_dir` with weights and config.

    ``<name>.tmp`` is a release still being written (it is renamed when complete): never listed.
    """
    root = weights_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.suffix != ".tmp" and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


@dataclass
class Checkpoint:
    """A loaded model with everything its config prescribes."""

    model: nn.Module = field(repr=False)
    arch: str
    labels: list[str]
    preprocess: Preprocess
    thresholds: dict[str, float]
    config: dict[str, Any] = field(repr=False)
    path: Path
    meta: CkptMeta = field(default_factory=CkptMeta, repr=False)

    @property
    def name(self) -> str:
        """Display name: the folder's name."""
        return self.path.name


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, *, arch: str, labels: list[str],
                    img_size: int, mean: tuple[float, ...] = GRAY_MEAN, std: tuple[float, ...] = GRAY_STD,
                    thresholds: dict[str, float] | None = None, meta: CkptMeta | Mapping[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Writes ``config.json`` (timm's layout plus our ``chestxray`` block) and ``model.safetensors``.

    Args:
        model: the trained timm model.
        out_dir: destination folder (created).
        arch: timm architecture name.
        labels: label names, in logit order.
        img_size: input side used in training.
        mean, std: normalisation used in training.
        thresholds: per-label operating thresholds (label -> probability).
        meta: the rest of the ``chestxray`` block (training facts, test metrics, ...): a
            :class:`~chestxray.ckpt_config.CkptMeta` or its dict form; ``labels`` and
            ``thresholds`` fill in its label set and thresholds.
        half: store weights as float16 (halves the size; loading casts back to float32).
    """
    from timm.models import save_for_hf  # local import: timm's hub helpers pull in huggingface_hub

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(not p.is_contiguous() for p in model.parameters()):  # channels_last training: timm's saver refuses
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    if len(labels) != model.get_classifier().out_features:
        raise CheckpointError(f"{len(labels)} labels for a head with {model.get_classifier().out_features} outputs")
    in_chans = _first_conv_in_chans(model) or 1
    data_config = {"input_size": (in_chans, img_size, img_size), "mean": tuple(mean), "std": tuple(std),
                   "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"}
    block = copy.deepcopy(meta) if isinstance(meta, CkptMeta) else CkptMeta.from_dict(meta)
    block.label_set = block.label_set or name_set(labels) or "custom"
    block.thresholds = {**block.thresholds, **(thresholds or {})}
    # The weights are ours, not the ImageNet tag timm would carry over.
    model_config = {"label_names": list(labels), "pretrained_cfg": {"tag": "chestxray", "license": "apache-2.0"}}
    save_for_hf(model, str(out), model_config=model_config, safe_serialization=True, data_config=data_config)
    config_path = out / CONFIG_FILE
    config_path.write_text(json.dumps(block.apply(own_provenance(json.loads(config_path.read_text()))), indent=2))
    state = model.state_dict()
    safetensors.torch.save_file(half_state(state) if half else {k: v.contiguous() for k, v in state.items()},
                                str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def own_provenance(config: dict[str, Any]) -> dict[str, Any]:
    """Drops :data:`FOREIGN_PROVENANCE` from a config's ``pretrained_cfg`` (in place) and returns the config."""
    for key in FOREIGN_PROVENANCE:
        config.get("pretrained_cfg", {}).pop(key, None)
    return config


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight matrices and kernels as float16 (half the size; loading casts back to float32).

    1-D tensors (BatchNorm statistics and affine terms, biases) stay float32: they are a tiny share of
    the bytes, and a BatchNorm variance rounded to float16 moved probabilities by up to 0.05.
    """
    return {k: (v.half() if v.is_floating_point() and v.ndim > 1 else v).contiguous() for k, v in state.items()}


def _first_conv_in_chans(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return path
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickled:
        raise CheckpointError(f"refusing pickled weights ({', '.join(pickled)}): only {WEIGHTS_FILE} is loaded")
    raise CheckpointError(f"no {WEIGHTS_FILE} in {folder}")


def load_folder(folder: str | os.PathLike, device: str | torch.device = "cpu", weights: bool = True) -> Checkpoint:
    """Loads a checkpoint folder (safetensors only) and checks config against weights.

    ``weights=False`` reads the config alone and leaves the model randomly initialised: for work whose logits
    are already computed (e.g. a cross-validation's pooled evaluation), never for predicting.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    cfg = read_config(folder)
    if (ens := ensemble_of(cfg)) is not None:
        raise CheckpointError(f"{folder.name} is an ensemble of {', '.join(ens.members)}, not one checkpoint: load "
                              "it with chestxray.ensemble.load_model (the command line and the app do)")
    arch, labels = cfg["architecture"], list(cfg["label_names"])
    if arch not in ARCHS:
        raise CheckpointError(f"{folder.name}: unsupported architecture {arch!r} in {CONFIG_FILE}")
    args = dict(cfg.get("model_args", {}))
    args.pop("num_classes", None)
    in_chans = args.pop("in_chans", cfg["pretrained_cfg"]["input_size"][0])
    img_size = int(cfg["pretrained_cfg"]["input_size"][-1])
    args.pop("img_size", None)
    model = create_model(arch, len(labels), in_chans=in_chans, img_size=img_size, **args)
    if weights:
        _load_weights(model, folder, labels)
    model.eval().to(device)
    meta = CkptMeta.from_config(cfg)
    thresholds = {k: v for k, v in meta.thresholds.items() if k in labels}
    return Checkpoint(model=model, arch=arch, labels=labels, preprocess=Preprocess.from_config(cfg["pretrained_cfg"]),
                      thresholds=thresholds, config=cfg, path=folder, meta=meta)


def _load_weights(model: nn.Module, folder: Path, labels: list[str]) -> None:
    """Loads ``folder``'s safetensors weights into ``model``, or says in one line why they do not fit."""
    weights = _weights_file(folder)
    try:
        state = safetensors.torch.load_file(str(weights), device="cpu")
    except Exception:  # noqa: BLE001 - any parse failure is a corrupt or foreign file
        raise CheckpointError(f"{weights.name} in {folder.name} is not a valid safetensors file") from None
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as err:
        head = model.get_classifier().weight.shape
        got = state.get(_classifier_key(model), None)
        detail = (f"config lists {len(labels)} labels, weights have {got.shape[0]} outputs"
                  if got is not None and got.shape[0] != head[0] else str(err).splitlines()[0][:200])
        raise CheckpointError(f"{folder.name}: config.json does not match the weights ({detail})") from None


def _classifier_key(model: nn.Module) -> str:
    name = model.pretrained_cfg.get("classifier", "fc")
    return f"{name}.weight"


def load_checkpoint(ref: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Loads a model reference: a shipped name, a local folder or ``hf-hub:org/name``.

    Hub references download into the huggingface_hub cache and fall back to ``weights/``
    (see :func:`chestxray.hub.resolve`).
    """
    return load_folder(resolve(str(ref)), device=device)


def init_from_checkpoint(model: nn.Module, ref: str | os.PathLike) -> str:
    """Copies a released checkpoint's backbone into ``model`` (same architecture, any label set).

    Every tensor whose name and shape match is copied; the classifier is not (its labels differ or
    it is to be relearnt), so it keeps its fresh initialisation. Used to start a model for one
    label set from a model trained on chest films for another (e.g. the six-label model from the
    NIH-14 one): keep that run's split (``split_from``), or its test patients leak into training.

    Returns:
        A one-line report for the log and the model card.
    """
    src = load_checkpoint(ref)
    # Same layers, activations included (a transplanted efficientnet uses ReLU6, a fresh one SiLU).
    if [type(m) for m in src.model.modules()] != [type(m) for m in model.modules()]:
        raise CheckpointError(f"init_from: {src.name} ({src.arch}, {src.config.get('model_args', {})}) is not "
                              f"built like the model being trained")
    head = _classifier_key(model).rsplit(".", 1)[0] + "."
    own = model.state_dict()
    take = {k: v for k, v in src.model.state_dict().items()
            if not k.startswith(head) and k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in take and not k.startswith(head)]
    if missing:
        raise CheckpointError(f"init_from: {src.name} lacks {len(missing)} backbone tensors (e.g. {missing[0]})")
    model.load_state_dict(take, strict=False)
    return (f"{src.name} (chest X-ray {src.arch}, labels {src.meta.label_set or len(src.labels)}): "
            f"{len(take)}/{len(own)} tensors, all but the classifier")

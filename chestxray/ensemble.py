"""An ensemble of loaded models: one read of the film, each member's forward, their outputs averaged.

:class:`EnsemblePredictor` stands in for a :class:`~chestxray.predictor.Predictor` wherever the app, the HTTP
API, the report and the command line use one: ``analyze`` decodes the film once, runs every member's own
preprocessing and forward pass (:meth:`Predictor.infer <chestxray.predictor.Predictor.infer>`: its calibrated
probabilities and its all-label Grad-CAM), and returns one :class:`~chestxray.predictor.Analysis` whose
probabilities are the mean of the members' calibrated probabilities and whose maps are the mean of the members'
maps, each first brought to the finest member grid. The members are the registry's own loaded models (no
second copy in memory), so the ensemble holds no weights; its folder holds a ``config.json`` naming them
(:class:`chestxray.ckpt_config.Ensemble`), the operating thresholds chosen on the mean, its card and its
evidence (:mod:`chestxray.ensemble_release` builds it).

Why the mean of *calibrated* probabilities: every member's probabilities are already on one stated scale
(adult NIH films at NIH's prevalence, after its temperature and prior shift), so their mean is on that
scale too; raw sigmoids of differently trained models are not comparable numbers.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chestxray.cam import FAST_METHODS, cam_at, upsample
from chestxray.ckpt_config import CkptMeta, Ensemble, read_config
from chestxray.gate import assess_without_gate
from chestxray.hub import resolve
from chestxray.imaging import XrayImage
from chestxray.layout import CheckpointError
from chestxray.predictor import Analysis, Predictor, as_pixels, as_xray, display_image
from chestxray.transforms import Preprocess


@dataclass(frozen=True)
class PackedPreprocess:
    """The members' distinct preprocessings of one film, each flattened and laid side by side in one row
    (N x sum of C*H*W): what batched prediction stacks and moves as one tensor when the members prepare films
    differently (e.g. 260 and 320 px). :meth:`unpack` gives each preprocessing its own N x C x H x W input back,
    so every member still sees exactly its own product path."""

    parts: tuple[Preprocess, ...]

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.cat([p(img).flatten(1) for p in self.parts], dim=1)

    def unpack(self, x: torch.Tensor) -> dict[Preprocess, torch.Tensor]:
        """``{preprocessing: its N x C x H x W input}`` from a packed batch."""
        chunks = x.split([math.prod(p.input_size) for p in self.parts], dim=1)
        return {p: c.reshape(-1, *p.input_size) for p, c in zip(self.parts, chunks)}


@dataclass
class EnsembleCheckpoint:
    """An ensemble folder as read from its ``config.json`` (the fields of a
    :class:`~chestxray.checkpoint.Checkpoint` that the registry, evaluation and localization read)."""

    path: Path
    config: dict[str, Any] = field(repr=False)
    meta: CkptMeta = field(repr=False)
    labels: list[str]
    thresholds: dict[str, float]

    @property
    def name(self) -> str:
        """Display name: the folder's name."""
        return self.path.name

    @property
    def spec(self) -> Ensemble:
        """The recipe: members, how they are combined, whose gate."""
        assert self.meta.ensemble is not None
        return self.meta.ensemble

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "EnsembleCheckpoint":
        """Reads an ensemble folder; a folder of one model is refused with one line."""
        folder = Path(folder)
        cfg = read_config(folder)
        meta = CkptMeta.from_config(cfg)
        if meta.ensemble is None:
            raise CheckpointError(f"{folder.name} is not an ensemble (its {folder.name}/config.json names no members)")
        labels = [str(k) for k in cfg["label_names"]]
        return cls(folder, cfg, meta, labels, {k: v for k, v in meta.thresholds.items() if k in labels})


class EnsemblePredictor:
    """The members' mean, used like a :class:`~chestxray.predictor.Predictor`. Thread-safe as its members are.

    Args:
        members: loaded predictors with the same labels in the same order (the gate member first, by default).
        ckpt: the ensemble folder (thresholds, name, card); None: thresholds of 0.5 (while they are chosen).
    """

    #: What evaluation reports as the architecture.
    arch = "ensemble"

    def __init__(self, members: Sequence[Predictor], ckpt: EnsembleCheckpoint | None = None):
        if len(members) < 2:
            raise CheckpointError(f"an ensemble needs at least two members, got {len(members)}")
        self.members = list(members)
        self.labels = list(self.members[0].labels)
        for m in self.members[1:]:
            if list(m.labels) != self.labels:
                raise CheckpointError(f"ensemble members disagree on their labels: {self.members[0].name} has "
                                      f"{len(self.labels)}, {m.name} {len(m.labels)} (or another order)")
        if ckpt is not None and ckpt.labels != self.labels:
            raise CheckpointError(f"{ckpt.name}: config.json's labels are not its members' labels")
        if ckpt is not None and len(ckpt.spec.members) != len(self.members):
            raise CheckpointError(f"{ckpt.name} has {len(ckpt.spec.members)} members, {len(self.members)} were given")
        self.ckpt = ckpt
        #: On the scale of the mean probability (chosen there): nothing maps them.
        self.thresholds = {k: float(ckpt.thresholds.get(k, 0.5)) if ckpt else 0.5 for k in self.labels}
        # Members are named in the config, in order (a member from a pinned Hub snapshot has another folder name).
        self._gate_member = self.members[ckpt.spec.members.index(ckpt.spec.gate_member) if ckpt else 0]
        #: The input gate of one member (see :attr:`gate_member`): its verdict reads that member's features.
        self.gate = self._gate_member.gate
        self.device = self.members[0].device
        self.temperatures: dict[str, float] = {}  # the members hold theirs; the mean is not rescaled
        self.shifts: dict[str, float] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, members: Sequence[Predictor]) -> "EnsemblePredictor":
        """The ensemble of ``folder`` over already loaded ``members`` (in the config's order)."""
        return cls(members, EnsembleCheckpoint.read(folder))

    # -- what callers read of a Predictor ----------------------------------------------------------
    @property
    def name(self) -> str:
        """The ensemble folder's name."""
        return self.ckpt.name if self.ckpt else "ensemble"

    @property
    def gate_member(self) -> Predictor:
        """The member whose input gate (and pooled features) check the films."""
        return self._gate_member

    @property
    def calibrated(self) -> bool:
        """Whether the averaged probabilities are calibrated ones (every member's are)."""
        return all(m.calibrated for m in self.members)

    @property
    def reference(self) -> str | None:
        """The population the probabilities refer to: the members' common one (None when they differ)."""
        refs = {m.reference for m in self.members}
        return refs.pop() if len(refs) == 1 else None

    @property
    def preprocess(self) -> Preprocess | PackedPreprocess:
        """What batched prediction feeds :meth:`infer`: the members' one preprocessing, or, when they prepare films
        differently, all of their inputs packed in one row (:class:`PackedPreprocess`)."""
        kinds = tuple(dict.fromkeys(m.preprocess for m in self.members))
        return kinds[0] if len(kinds) == 1 else PackedPreprocess(kinds)

    @property
    def split_files(self) -> list[Path]:
        """Every member's ``splits.csv``: a film is held out from the ensemble only when it is from each member."""
        return [f for m in self.members for f in m.split_files]

    # -- inference ----------------------------------------------------------------------------------
    def combine(self, outputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The members' ``infer`` outputs as one: (mean probabilities B x K, mean maps B x K x h x w on the finest
        member grid, the gate member's pooled features B x C)."""
        probs = torch.stack([p.float().cpu() for p, _, _ in outputs]).mean(dim=0)
        grid = (max(c.shape[-2] for _, c, _ in outputs), max(c.shape[-1] for _, c, _ in outputs))
        cams = torch.stack([c.float().cpu() if tuple(c.shape[-2:]) == grid else torch.from_numpy(upsample(c, grid))
                            for _, c, _ in outputs]).mean(dim=0)
        embedding = outputs[self.members.index(self._gate_member)][2].float().cpu()
        return probs, cams, embedding

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass of every member on a batch prepared by :attr:`preprocess` (batched prediction)."""
        pre = self.preprocess
        if isinstance(pre, PackedPreprocess):
            inputs = pre.unpack(x)
            return self.combine([m.infer(inputs[m.preprocess].to(m.device)) for m in self.members])
        return self.combine([m.infer(x.to(m.device)) for m in self.members])

    def _outputs(self, pixels: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every member's ``infer`` on its own input of the same decoded films (each distinct preprocessing once)."""
        inputs: dict[Preprocess, torch.Tensor] = {}
        outputs = []
        for m in self.members:
            if m.preprocess not in inputs:
                inputs[m.preprocess] = torch.cat([m.preprocess(p) for p in pixels])
            outputs.append(m.infer(inputs[m.preprocess].to(m.device)))
        return outputs

    def member_probabilities(self, images: list) -> np.ndarray:
        """Every member's calibrated probabilities of several images: M x N x K (their mean: :meth:`predict_batch`)."""
        return np.stack([p.float().cpu().numpy() for p, _, _ in self._outputs([as_pixels(im) for im in images])])

    def predict_batch(self, images: list) -> np.ndarray:
        """Probabilities (N x K): the mean of the members' calibrated probabilities."""
        return self.combine(self._outputs([as_pixels(im) for im in images]))[0].numpy()

    def predict(self, image) -> dict[str, float]:
        """{label: probability} for one image."""
        return dict(zip(self.labels, map(float, self.predict_batch([image])[0])))

    def embed(self, images: list) -> np.ndarray:
        """The gate member's pooled features (what the input gate models)."""
        return self._gate_member.embed(images)

    def analyze(self, image, xray: XrayImage | None = None, *, source=None) -> Analysis:
        """The mean probabilities and maps of every label, each member run once, checked by the gate member's gate.

        Args:
            image: an XrayImage, a float HxW array in [0,1], a path or bytes (decoded once for all members).
            xray: the decoded file ``image`` came from, when ``image`` is a bare array (for the gate's rules).
            source: ignored, as in :meth:`Predictor.analyze <chestxray.predictor.Predictor.analyze>`.
        """
        if source is not None:
            warnings.warn("analyze(source=...) is no longer needed: the XrayImage carries what the gate reads",
                          DeprecationWarning, stacklevel=2)
        read = as_xray(image)
        xray = read if read is not None else xray
        pixels = as_pixels(read if read is not None else image)
        probs, cams, embedding = (t[0].numpy() for t in self.combine(self._outputs([pixels])))
        verdict = (self.gate.assess(xray, pixels, embedding) if self.gate is not None
                   else assess_without_gate(xray, pixels))
        return Analysis(self.labels, probs, cams, display_image(pixels), dict(self.thresholds), embedding,
                        warnings=list(verdict.reasons), gate=verdict, calibrated=self.calibrated,
                        reference=self.reference)

    def explain(self, image, label: str, method: str = "gradcam") -> np.ndarray:
        """One label's map by ``method``: the members' maps averaged at the first member's input size (H x W, [0,1])."""
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not in this model's labels")
        size = self.members[0].preprocess.size
        pixels = as_pixels(image)
        if method in FAST_METHODS:
            return cam_at(self.analyze(pixels).cams[self.labels.index(label)], size)
        maps = [m.explain(pixels, label, method) for m in self.members]
        return np.mean([x if x.shape == size else upsample(x, size) for x in maps], axis=0).astype(np.float32)


def member_folder(name: str) -> Path:
    """A member's checkpoint folder: its name as a shipped name (the ``models.yaml`` names are the shipped folders'
    names) or a folder, resolved as ``--model`` resolves one model."""
    try:
        return resolve(name)
    except CheckpointError as err:
        raise CheckpointError(f"ensemble member {name!r} is not installed ({err})") from None


def load_model(ref: str | os.PathLike, device: str | torch.device | None = None) -> Predictor | EnsemblePredictor:
    """Loads a model reference (shipped name, folder or ``hf-hub:``): a :class:`Predictor`, or, for an ensemble
    folder, an :class:`EnsemblePredictor` over its members, each loaded once (the app's registry builds its own
    from the models it has loaded: :meth:`chestxray.registry.ModelRegistry.get`)."""
    folder = resolve(str(ref))
    cfg = read_config(folder)
    meta = CkptMeta.from_config(cfg)
    if meta.ensemble is None:
        return Predictor.load(folder, device=device)
    members = [Predictor.load(member_folder(m), device=device) for m in meta.ensemble.members]
    return EnsemblePredictor.from_folder(folder, members)

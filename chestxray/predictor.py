"""The predictor: load a checkpoint once, then predict probabilities and explain them.

``analyze`` is the product's hot path: one forward pass gives the probability of every label
(sigmoid of the logits) and the Grad-CAM of every label (see :mod:`chestxray.cam`), so switching
label or opacity in the app never runs the model again.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chestxray.boxes import BOX_THRESHOLD, Box, cam_boxes, draw_boxes
from chestxray.cam import FAST_METHODS, add_colorbar, all_label_cams, cam_at, method_cam, overlay, scale_map
from chestxray.checkpoint import Checkpoint, load_checkpoint
from chestxray.ckpt_config import map_threshold
from chestxray.gate import GATE_FILE, Gate, GateResult, assess_without_gate
from chestxray.imaging import XrayImage, read_image
from chestxray.models import arch_spec, classifier_weight, features_and_logits
from chestxray.transforms import resize_gray

log = logging.getLogger(__name__)

#: Longest side of the image kept for display and overlays (the model sees its own input size).
DISPLAY_MAX = 768


def as_pixels(image) -> np.ndarray:
    """Accepts an XrayImage, a float HxW array in [0,1], a path or bytes; returns float32 HxW."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = read_image(image if not isinstance(image, bytearray) else bytes(image))
    pixels = getattr(image, "pixels", image)
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32, copy=False)


def as_xray(image) -> XrayImage | None:
    """The decoded file with its metadata: reads a path or bytes, passes an XrayImage through,
    and returns None for a bare array (which has no metadata)."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        return read_image(image if not isinstance(image, bytearray) else bytes(image))
    return image if isinstance(image, XrayImage) else None


def display_image(pixels: np.ndarray, max_side: int = DISPLAY_MAX) -> np.ndarray:
    """Downscales (never upscales) a gray image for display, keeping its aspect ratio."""
    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return pixels
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize_gray(pixels, size)[0, 0].numpy()


@dataclass
class Analysis:
    """Probabilities and all-label CAMs of one image, from one forward pass."""

    labels: list[str]
    probs: np.ndarray  # K
    cams: np.ndarray  # K x h x w, each in [0,1], at feature resolution
    image: np.ndarray  # display image H x W in [0,1]
    thresholds: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None  # C, globally pooled final features (for the input gate)
    warnings: list[str] = field(default_factory=list)  # e.g. "does not look like a frontal chest X-ray"
    gate: GateResult | None = None  # the input gate's verdict (chestxray.gate); None when not assessed
    calibrated: bool = False  # probabilities recalibrated by the checkpoint's config (thresholds mapped)
    reference: str | None = None  # the population the probabilities refer to (Predictor.reference)

    def prob_dict(self) -> dict[str, float]:
        """{label: probability}, in the checkpoint's label order."""
        return {k: float(p) for k, p in zip(self.labels, self.probs)}

    def threshold(self, label: str) -> float:
        """The label's operating threshold (0.5 when the checkpoint has none)."""
        return float(self.thresholds.get(label, 0.5))

    def positives(self) -> list[str]:
        """Labels at or above their operating threshold, most probable first."""
        pos = [k for k, p in zip(self.labels, self.probs) if p >= self.threshold(k)]
        return sorted(pos, key=lambda k: -self.probs[self.labels.index(k)])

    def top_label(self) -> str:
        """The most probable label."""
        return self.labels[int(np.argmax(self.probs))]

    def cam(self, label: str) -> np.ndarray:
        """The label's map at display resolution."""
        return cam_at(self.cams[self.labels.index(label)], self.image.shape)

    def boxes(self, label: str, cam: np.ndarray | None = None, threshold: float = BOX_THRESHOLD) -> list[Box]:
        """The label's map as boxes in display-image pixels (see :func:`chestxray.boxes.cam_boxes`).

        Args:
            label: the label.
            cam: a [0,1] map of this label from another method instead of the stored one.
            threshold: the cut, relative to the map's maximum.
        """
        m = self.cam(label) if cam is None else cam
        if m.shape != self.image.shape:  # another method's map comes at the model's input size
            m = cam_at(m, self.image.shape)
        return cam_boxes(m, threshold)

    def overlay(self, label: str, alpha: float = 0.4, scale: str = "minmax", cam: np.ndarray | None = None,
                colorbar: bool = False, boxes: bool = False) -> np.ndarray:
        """RGB uint8 overlay of the label's map on the display image: the one rendering path of every map.

        Args:
            label: the label.
            alpha: opacity at map value 1.
            scale: ``"minmax"`` (the map's own range) or ``"probability"`` (times the label's
                probability, so a low-probability label is faint); see :data:`chestxray.cam.SCALES`.
            cam: a [0,1] map of this label from another method (e.g. Grad-CAM++) instead of the stored one.
            colorbar: append the colour key on the right (the image gets wider).
            boxes: outline the map's regions (:meth:`boxes`), drawn from the same map: no model call.
        """
        m = self.cam(label) if cam is None else cam
        rgb = overlay(self.image, scale_map(m, scale, self.prob_dict()[label]), alpha)
        if boxes:
            rgb = draw_boxes(rgb, self.boxes(label, m))
        return add_colorbar(rgb) if colorbar else rgb


class Predictor:
    """A loaded checkpoint ready for inference. Thread-safe; keep one per model."""

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device | None = None):
        self.ckpt = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = checkpoint.model.to(self.device).eval()
        if not arch_spec(checkpoint.arch).nhwc:
            # NHWC memory layout: one forward pass on 1 CPU thread is ~20% faster for the efficientnets,
            # ~15% for mobilenetv2 (same outputs to float rounding); Swin is channels-last by design.
            self.model = self.model.to(memory_format=torch.channels_last)
        self.labels = list(checkpoint.labels)
        #: Per-label temperatures from the config (chestxray.calibration); empty: raw sigmoid(logit).
        self.temperatures = {k: t for k, t in checkpoint.meta.temperatures.items() if k in self.labels}
        #: Per-label prior shifts to the reference population (:attr:`reference`); empty: none.
        self.shifts = {k: b for k, b in checkpoint.meta.shifts.items() if k in self.labels}
        # Thresholds on the scale of the probabilities reported: mapped by T and b, so the same films are flagged.
        self.thresholds = {k: map_threshold(checkpoint.thresholds.get(k, 0.5), self.temperatures.get(k, 1.0),
                                            self.shifts.get(k, 0.0)) for k in self.labels}
        self._temp = (torch.tensor([self.temperatures.get(k, 1.0) for k in self.labels], device=self.device)
                      if self.temperatures or self.shifts else None)
        self._shift = (torch.tensor([self.shifts.get(k, 0.0) for k in self.labels], device=self.device)
                       if self.shifts else None)
        self.preprocess = checkpoint.preprocess
        self._weight, _ = classifier_weight(self.model)
        self._cam_lock = threading.Lock()  # pytorch-grad-cam hooks are per-model, not thread-safe
        self.gate = self._load_gate()

    def _load_gate(self) -> Gate | None:
        """The input gate fitted for this checkpoint (``gate.safetensors`` in its folder), or None."""
        path = Path(self.ckpt.path) / GATE_FILE
        if not path.is_file():
            return None
        try:
            gate = Gate.load(path)
        except ValueError as err:
            log.warning("input gate not used: %s", err)
            return None
        if not gate.matches(self):
            log.warning("input gate not used: %s was fitted for other weights than %s", GATE_FILE, self.name)
            return None
        return gate

    @classmethod
    def load(cls, ref: str | os.PathLike, device: str | torch.device | None = None) -> "Predictor":
        """Loads a model reference (shipped name, folder or ``hf-hub:``) once."""
        return cls(load_checkpoint(ref), device=device)

    @property
    def name(self) -> str:
        """The checkpoint's display name."""
        return self.ckpt.name

    @property
    def calibrated(self) -> bool:
        """Whether probabilities are recalibrated (the config holds temperatures or prior shifts)."""
        return self._temp is not None

    @property
    def reference(self) -> str | None:
        """The population the probabilities refer to (e.g. adult NIH films at NIH's prevalence), when the
        config shifts them there; None: the training mix's own scale."""
        return self.ckpt.meta.reference if self.shifts else None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``sigmoid(logits / T + b)`` per label with the config's temperatures and prior shifts; plain
        ``sigmoid`` without."""
        if self._temp is None:
            return torch.sigmoid(logits)
        z = logits / self._temp.to(logits.device)
        return torch.sigmoid(z if self._shift is None else z + self._shift.to(logits.device))

    @property
    def arch(self) -> str:
        """timm architecture name."""
        return self.ckpt.arch

    @property
    def split_files(self) -> list[Path]:
        """The ``splits.csv`` that says which films trained, selected and tested these weights (an ensemble
        has one per member: a film is held out from it only when it is held out from every member)."""
        return [Path(self.ckpt.path) / "splits.csv"]

    @property
    def classifier_weight(self) -> torch.Tensor:
        """The classifier's weight matrix (K x C): the all-label CAM weights; it also ties a gate to this model."""
        return self._weight

    def _input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.preprocess(pixels).to(self.device)

    @torch.inference_mode()
    def embed(self, images: list) -> np.ndarray:
        """Globally pooled final features (N x C, float32) of several images: what
        :attr:`Analysis.embedding` holds for one, and what the input gate models."""
        x = torch.cat([self._input(as_pixels(im)) for im in images])
        feats, _ = features_and_logits(self.model, x, self.arch)
        return feats.float().mean(dim=(2, 3)).cpu().numpy()

    def predict_batch(self, images: list) -> np.ndarray:
        """Probabilities (N x K) for several images at once (temperature-scaled when the config says so)."""
        return self.probabilities(torch.from_numpy(self.predict_logits(images))).numpy()

    @torch.inference_mode()
    def predict_logits(self, images: list) -> np.ndarray:
        """Raw logits (N x K, float32) for several images: before any temperature."""
        x = torch.cat([self._input(as_pixels(im)) for im in images])
        return self.model(x).float().cpu().numpy()

    def predict(self, image) -> dict[str, float]:
        """{label: probability} for one image (sigmoid of each label's logit)."""
        return dict(zip(self.labels, map(float, self.predict_batch([image])[0])))

    @torch.inference_mode()
    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass of a preprocessed batch: (probabilities B x K, every label's Grad-CAM B x K x h x w
        at feature resolution, pooled embedding B x C for the input gate)."""
        feats, logits = features_and_logits(self.model, x, self.arch)
        feats = feats.float()
        return self.probabilities(logits), all_label_cams(feats, self._weight.float()), feats.mean(dim=(2, 3))

    @torch.inference_mode()
    def analyze(self, image, xray: XrayImage | None = None, *, source=None) -> Analysis:
        """Probabilities and Grad-CAM of every label from one forward pass, checked by the input gate.

        Args:
            image: an XrayImage, a float HxW array in [0,1], a path or bytes.
            xray: the decoded file ``image`` came from, when ``image`` is a bare array (its DICOM
                metadata and colour fraction feed the gate's rules); taken from ``image`` itself otherwise.
            source: ignored; accepted for compatibility. (It used to let the gate re-open the
                original file to check its colour; :func:`~chestxray.imaging.read_image` now
                records that in the XrayImage.)

        The gate's one-line messages go to ``Analysis.warnings`` (metadata and colour rules always
        apply; the appearance check needs the checkpoint's ``gate.safetensors``).
        """
        if source is not None:
            warnings.warn("analyze(source=...) is no longer needed: the XrayImage carries what the gate reads",
                          DeprecationWarning, stacklevel=3)  # 3: past torch's inference_mode wrapper
        read = as_xray(image)
        xray = read if read is not None else xray
        pixels = as_pixels(read if read is not None else image)
        probs, cams, embedding = (t[0].float().cpu().numpy() for t in self.infer(self._input(pixels)))
        verdict = (self.gate.assess(xray, pixels, embedding) if self.gate is not None
                   else assess_without_gate(xray, pixels))
        return Analysis(self.labels, probs, cams, display_image(pixels), dict(self.thresholds), embedding,
                        warnings=list(verdict.reasons), gate=verdict, calibrated=self.calibrated,
                        reference=self.reference)

    def explain(self, image, label: str, method: str = "gradcam") -> np.ndarray:
        """The map of one label's logit by ``method``, at the model's input resolution (H x W, [0,1])."""
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not in this model's labels")
        pixels = as_pixels(image)
        if method in FAST_METHODS:
            a = self.analyze(pixels)
            return cam_at(a.cams[self.labels.index(label)], self.preprocess.size)
        with self._cam_lock:
            return method_cam(self.model, self.arch, self._input(pixels), self.labels.index(label), method)

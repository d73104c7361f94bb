"""The input gate at run time: "is this a frontal chest X-ray?", asked before any probability is shown.

A model trained on chest films prints confident probabilities for anything it is given (a photo,
a CT slice, a knee). The gate flags such inputs so that the app can warn or refuse. It needs no
outside data: everything it learns comes from the chest X-rays the model was trained on.

Three kinds of evidence, cheapest first:

1. **File rules**: DICOM metadata (a modality that is not a projection radiograph (MR, CT, US,
   ...), a body part that is not the chest, a lateral or oblique view) and, for plain image files,
   *colour* (a photo): the reader records both at decode time (:class:`~chestxray.imaging.XrayImage`
   ``modality``/``body_part``/``view`` and ``colour_fraction``), so the file is never opened again.
2. **Appearance** (one-class, model-free): a 32x32 "eigen-chest" (probabilistic PCA of contrast-
   normalised thumbnails of chest films) and a Gaussian on a dozen cheap gray-level statistics
   (histogram shape, edges, symmetry, the bright-mediastinum-between-dark-lungs profile, ...).
3. **Feature space** (one-class, per model): the Mahalanobis distance of the classifier's pooled
   embedding (:meth:`Predictor.embed <chestxray.predictor.Predictor.embed>`) to the Gaussian of the
   training chest X-rays' embeddings (PCA + Ledoit-Wolf).

Each one-class component gives a squared distance ``d``; ``z = (log d - median) / scale``; the
gate's score is the largest ``z - offset`` over the components and must not exceed the threshold.
How the Gaussians, the normalisation, the offsets and the threshold are fitted on chest films
alone is :mod:`chestxray.gate_fit` (offline: ``python -m chestxray fit-gate``); this module only
applies a fitted gate.

An aspect ratio beyond :data:`MAX_ASPECT` is a rule of its own. The rules that need no fitting
(metadata, colour, shape) also apply to checkpoints without a gate file (:func:`assess_without_gate`).

No lateral chest films are in the shared data, so lateral views are caught by DICOM metadata
only; whether the appearance score flags a lateral PNG is untested.

Everything is saved in ``gate.safetensors`` beside the checkpoint: arrays as tensors, settings as
JSON in the safetensors metadata (no pickle). The gate is tied to the checkpoint's classifier
weights by a fingerprint; a gate fitted for another model is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from chestxray.imaging import XrayImage
from chestxray.transforms import resize_gray

GATE_FILE = "gate.safetensors"
GATE_VERSION = 2  # 2: per-component offsets (version-1 files load with zero offsets)
MAX_ASPECT = 2.0  # height/width (or width/height) beyond which an image is no chest film
THUMB = 32  # eigen-chest thumbnail side
STATS_SIDE = 64  # side of the squash-resized image the gray statistics are computed on

#: DICOM modalities of projection radiographs (OT = "other", often secondary captures of films).
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "DF", "OT"}
_MODALITY_NAMES = {
    "MR": "an MR image", "CT": "a CT image", "US": "an ultrasound image", "MG": "a mammogram",
    "NM": "a nuclear-medicine image", "PT": "a PET image", "XA": "an angiogram", "RF": "a fluoroscopy image",
    "PX": "a dental panoramic X-ray", "IO": "an intra-oral dental X-ray", "XC": "a photograph",
    "ES": "an endoscopy image", "OP": "an eye photograph", "SM": "a microscopy slide", "GM": "a photograph",
    "OCT": "an OCT scan", "BMD": "a bone densitometry scan", "SC": "a secondary capture",
}
#: Substrings of BodyPartExamined that mean the chest (English and a few common other languages).
CHEST_PARTS = ("CHEST", "THORA", "LUNG", "TORAX", "TORAC", "BRUST", "PECHO", "POUMON", "RIB", "STERN", "HEART")
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "L", "R", "LATERAL LEFT", "LATERAL RIGHT"}
OBLIQUE_VIEWS = {"LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "OBL", "OBLIQUE"}

NOT_MEANINGFUL = "the probabilities below are not meaningful"
APPEARANCE_MSG = (f"This does not look like a frontal chest X-ray (unusual image for this model); "
                  f"{NOT_MEANINGFUL}.")
COLOUR_MSG = f"This is a colour picture, not an X-ray; {NOT_MEANINGFUL}."


# --------------------------------------------------------------------------------------------
# Cheap pixel features
# --------------------------------------------------------------------------------------------

STAT_NAMES = (
    "mean", "std", "skew", "frac_dark", "frac_bright", "entropy", "gradient",
    "lr_symmetry", "ud_symmetry", "border_minus_centre", "mediastinum_contrast", "bottom_minus_top",
    "high_freq", "gray_levels",
)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def pixel_features(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, statistics) of a gray image in [0,1]: both float64, resolution-independent.

    The thumbnail is the 32x32 squash resize, normalised to zero mean and unit variance (so that
    exposure and contrast do not matter); the statistics are listed in :data:`STAT_NAMES`. The
    aspect ratio is not among them (the training films are nearly all square, an artefact of the
    datasets): :data:`MAX_ASPECT` is a rule instead.
    """
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32))
    t128 = resize_gray(t, (128, 128))[0, 0]  # one resize of the (maybe large) film, the rest from it
    s = resize_gray(t128, (STATS_SIDE, STATS_SIDE))[0, 0].double().numpy()
    thumb = resize_gray(t128, (THUMB, THUMB))[0, 0].double().numpy().ravel()
    thumb = (thumb - thumb.mean()) / (thumb.std() + 1e-3)

    mean, std = float(s.mean()), float(s.std())
    skew = float(((s - mean) ** 3).mean() / (std ** 3 + 1e-9)) if std > 1e-6 else 0.0
    hist = np.histogram(s, bins=32, range=(0.0, 1.0))[0] / s.size
    entropy = float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum())
    gy, gx = np.gradient(s)
    grad = float(np.hypot(gx, gy).mean())
    lap = np.abs(4 * s[1:-1, 1:-1] - s[:-2, 1:-1] - s[2:, 1:-1] - s[1:-1, :-2] - s[1:-1, 2:]).mean()
    n = STATS_SIDE
    b = n // 8
    border = np.concatenate([s[:b].ravel(), s[-b:].ravel(), s[b:-b, :b].ravel(), s[b:-b, -b:].ravel()])
    centre = s[n // 4: 3 * n // 4, n // 4: 3 * n // 4]
    rows = s[n // 4: 3 * n // 4]  # the lung fields' rows of a frontal film
    mid = rows[:, 13 * n // 32: 19 * n // 32].mean()
    lungs = 0.5 * (rows[:, 5 * n // 32: 11 * n // 32].mean() + rows[:, 21 * n // 32: 27 * n // 32].mean())
    q = t128.mul(255).round().to(torch.uint8).numpy()
    levels = int((np.bincount(q.ravel(), minlength=256) > 0).sum())
    stats = np.array([
        mean, std, np.clip(skew, -10, 10), float((s < 0.04).mean()), float((s > 0.96).mean()),
        entropy, grad, _corr(s, s[:, ::-1]), _corr(s, s[::-1]), float(border.mean() - centre.mean()),
        float(mid - lungs), float(s[n // 2:].mean() - s[: n // 2].mean()), float(lap / (std + 1e-3)),
        np.log(levels),
    ], dtype=np.float64)
    return thumb, stats



# --------------------------------------------------------------------------------------------
# Metadata rules
# --------------------------------------------------------------------------------------------

def metadata_rules(xray: XrayImage | None) -> list[tuple[str, str]]:
    """``[(rule, user-facing one-line message)]`` from the file's DICOM metadata (empty when plausible).

    Rules: ``modality`` (not a projection radiograph), ``body_part`` (not the chest), ``view``
    (lateral or oblique). Values are the reader's sanitised codes (A-Z, 0-9, at most 16 characters).
    """
    if xray is None:
        return []
    out = []
    modality = (xray.modality or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        what = _MODALITY_NAMES.get(modality, f"not a radiograph (DICOM modality {modality})")
        out.append(("modality", f"The file says this is {what}, not a chest X-ray; this model reads frontal "
                                f"chest X-rays only, so {NOT_MEANINGFUL}."))
    part = (xray.body_part or "").upper()
    if part and not any(c in part for c in CHEST_PARTS):
        out.append(("body_part", f"The file says the body part is {part.lower()}, not the chest; {NOT_MEANINGFUL}."))
    view = (xray.view or "").upper().strip()
    kind = "lateral" if view in LATERAL_VIEWS or view.startswith("LAT") else "oblique" if view in OBLIQUE_VIEWS else ""
    if kind:
        out.append(("view", f"The file says this is a {kind} view; this model was trained on frontal (PA/AP) "
                            f"chest X-rays only, so {NOT_MEANINGFUL}."))
    return out


def metadata_reasons(xray: XrayImage | None) -> list[str]:
    """The messages of :func:`metadata_rules`."""
    return [msg for _, msg in metadata_rules(xray)]


# --------------------------------------------------------------------------------------------
# One-class Gaussian components
# --------------------------------------------------------------------------------------------

@dataclass
class Gaussian:
    """Probabilistic-PCA Gaussian: Mahalanobis distance in the top-k principal subspace
    (Ledoit-Wolf shrunk covariance) plus the residual energy over the mean residual variance.

    Fitted by :func:`chestxray.gate_fit.fit_gaussian`."""

    mu: np.ndarray
    sd: np.ndarray
    basis: np.ndarray  # d x k
    precision: np.ndarray  # k x k
    res_var: float

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared distance of each row of ``x`` (N x d)."""
        z = (np.atleast_2d(np.asarray(x, np.float64)) - self.mu) / self.sd
        y = z @ self.basis
        d = np.einsum("ni,ij,nj->n", y, self.precision, y)
        if self.res_var > 0:
            d = d + ((z - y @ self.basis.T) ** 2).sum(1) / self.res_var
        return np.maximum(d, 1e-12)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The arrays as float64 tensors named ``{prefix}.{field}`` (for safetensors)."""
        return {f"{prefix}.mu": torch.from_numpy(self.mu.copy()), f"{prefix}.sd": torch.from_numpy(self.sd.copy()),
                f"{prefix}.basis": torch.from_numpy(np.ascontiguousarray(self.basis)),
                f"{prefix}.precision": torch.from_numpy(np.ascontiguousarray(self.precision)),
                f"{prefix}.res_var": torch.tensor([self.res_var], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "Gaussian":
        """The inverse of :meth:`tensors`."""
        g = {k: t[f"{prefix}.{k}"].double().numpy() for k in ("mu", "sd", "basis", "precision", "res_var")}
        return cls(g["mu"], g["sd"], g["basis"], g["precision"], float(g["res_var"][0]))


# --------------------------------------------------------------------------------------------
# Gate
# --------------------------------------------------------------------------------------------

@dataclass
class GateResult:
    """The verdict on one image.

    Attributes:
        ok: True when nothing suggests the image is not a frontal chest X-ray.
        reasons: user-facing one-line messages (empty when ok).
        score: the appearance/feature-space outlier score (largest calibrated z of the components,
            see :meth:`Gate.combine`); ``ok`` needs ``score <= threshold``. NaN when no component
            could be scored.
        threshold: the score threshold of this gate.
        components: ``{component: robust z}`` (``thumb``, ``stats``, ``embedding``), before offsets.
        rules: which rules fired (``modality``/``body_part``/``view`` via metadata, ``colour``,
            ``shape`` (aspect ratio beyond :data:`MAX_ASPECT`), ``appearance`` (score)).
    """

    ok: bool
    reasons: list[str]
    score: float
    threshold: float = float("nan")
    components: dict[str, float] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


class Gate:
    """A fitted gate: metadata rules + one-class components + the calibrated threshold."""

    COMPONENTS = ("thumb", "stats", "embedding")

    def __init__(self, models: dict[str, Gaussian], norms: dict[str, tuple[float, float]], threshold: float,
                 meta: dict[str, Any] | None = None, colour_limit: float = 0.1,
                 offsets: dict[str, float] | None = None):
        self.models = models
        self.norms = norms
        self.offsets = {k: float(v) for k, v in (offsets or {}).items()}
        self.threshold = float(threshold)
        self.meta = dict(meta or {})
        self.colour_limit = float(colour_limit)

    # ---- scoring -----------------------------------------------------------------------------
    def component_z(self, thumbs: np.ndarray, stats: np.ndarray,
                    embeddings: np.ndarray | None) -> dict[str, np.ndarray]:
        """{component: robust z (N,)} for batches of features."""
        feats = {"thumb": thumbs, "stats": stats, "embedding": embeddings}
        out = {}
        for name, g in self.models.items():
            x = feats[name]
            if x is None:
                continue
            med, scale = self.norms[name]
            out[name] = (np.log(g.distance(x)) - med) / scale
        return out

    def combine(self, z: dict[str, np.ndarray]) -> np.ndarray:
        """The combined score: the largest ``z - offset`` over the components (each component's
        offset is its own high quantile on validation chest films, so a heavy-tailed component
        cannot raise the bar for the others)."""
        return np.max(np.stack([v - self.offsets.get(k, 0.0) for k, v in z.items()]), axis=0)

    def scores(self, thumbs: np.ndarray, stats: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        """The combined score (N,) of batches of features."""
        return self.combine(self.component_z(thumbs, stats, embeddings))

    def assess(self, xray: XrayImage | None, pixels: np.ndarray | None = None, embedding: np.ndarray | None = None,
               *, colour: float | None = None) -> GateResult:
        """Judges one image.

        Args:
            xray: the decoded file (its DICOM metadata feeds the rules); may be None.
            pixels: the gray image in [0,1]; default ``xray.pixels``.
            embedding: the classifier's pooled features of this image (:attr:`Analysis.embedding`);
                without it, the embedding component is skipped.
            colour: the colour fraction of the original file; default ``xray.colour_fraction``.
        """
        base = assess_without_gate(xray, pixels, colour=colour, colour_limit=self.colour_limit)
        rules, reasons = base.rules, base.reasons
        if pixels is None and xray is not None:
            pixels = xray.pixels
        comps: dict[str, float] = {}
        score = float("nan")
        if pixels is not None:
            thumb, stats = pixel_features(pixels)
            emb = None
            if embedding is not None and "embedding" in self.models:
                emb = np.asarray(embedding, np.float64).reshape(1, -1)
                if emb.shape[1] != self.models["embedding"].mu.shape[0]:
                    emb = None
            z = self.component_z(thumb[None], stats[None], emb)
            comps = {k: float(v[0]) for k, v in z.items()}
            score = float(self.combine(z)[0]) if comps else float("nan")
            if comps and score > self.threshold:
                rules.append("appearance")
                if APPEARANCE_MSG not in reasons and not any(r in rules for r in ("modality", "colour")):
                    reasons.append(APPEARANCE_MSG)  # one message is enough
        return GateResult(ok=not rules, reasons=reasons, score=score, threshold=self.threshold,
                          components=comps, rules=rules)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``gate.safetensors`` (tensors + JSON metadata; no pickle)."""
        import safetensors.torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, g in self.models.items():
            tensors.update(g.tensors(name))
        header = {"version": GATE_VERSION, "threshold": self.threshold, "colour_limit": self.colour_limit,
                  "components": list(self.models), "norms": {k: list(v) for k, v in self.norms.items()},
                  "offsets": self.offsets,
                  "thumb": THUMB, "stats_side": STATS_SIDE, "stat_names": list(STAT_NAMES), **self.meta}
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "gate": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Gate":
        """Reads a ``gate.safetensors`` written by :meth:`save` (raises ValueError on a bad file)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["gate"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - parse failure of a foreign or corrupt file
            raise ValueError(f"{path.name} is not a valid gate file") from None
        if int(header.get("version", 0)) not in (1, GATE_VERSION):
            raise ValueError(f"{path.name}: gate version {header.get('version')} is not supported")
        if header.get("thumb") != THUMB or header.get("stat_names") != list(STAT_NAMES):
            raise ValueError(f"{path.name}: gate features differ from this version of the code; refit it")
        models = {name: Gaussian.from_tensors(tensors, name) for name in header["components"]}
        norms = {k: (float(v[0]), float(v[1])) for k, v in header["norms"].items()}
        meta = {k: v for k, v in header.items()
                if k not in ("version", "threshold", "colour_limit", "components", "norms", "offsets", "thumb",
                             "stats_side", "stat_names")}
        return cls(models, norms, header["threshold"], meta, header.get("colour_limit", 0.1),
                   offsets=header.get("offsets"))

    def matches(self, predictor: HasClassifier) -> bool:
        """Whether this gate was fitted for ``predictor``'s weights (always True without an embedding part)."""
        want = self.meta.get("fingerprint")
        return "embedding" not in self.models or want is None or want == model_fingerprint(predictor)


def assess_without_gate(xray: XrayImage | None, pixels: np.ndarray | None = None, *,
                        colour: float | None = None, colour_limit: float = 0.1) -> GateResult:
    """The rules that need no fitting (metadata, colour, shape) for checkpoints without a gate file.

    ``colour`` defaults to ``xray.colour_fraction`` (recorded when the file was decoded)."""
    if colour is None and xray is not None:
        colour = xray.colour_fraction
    fired = metadata_rules(xray)
    rules, reasons = [r for r, _ in fired], [m for _, m in fired]
    if colour is not None and colour > colour_limit:
        rules.append("colour")
        reasons.append(COLOUR_MSG)
    if pixels is None and xray is not None:
        pixels = xray.pixels
    if pixels is not None:
        h, w = np.shape(pixels)
        if max(h / w, w / h) > MAX_ASPECT:
            rules.append("shape")
            if not any(r in rules for r in ("modality", "colour")):
                reasons.append(APPEARANCE_MSG)
    return GateResult(ok=not rules, reasons=reasons, score=float("nan"), rules=rules)


class HasClassifier(Protocol):
    """What the gate needs of a model (a :class:`~chestxray.predictor.Predictor` has it)."""

    @property
    def classifier_weight(self) -> torch.Tensor: ...


def model_fingerprint(predictor: HasClassifier) -> str:
    """A short hash of the classifier head's weights (ties a gate to the checkpoint it was fitted on).

    Hashed at float16 precision, so a half-precision release of the same weights keeps it."""
    w = predictor.classifier_weight.detach().half().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()[:16]

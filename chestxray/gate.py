"""The input gate: "is this a frontal chest X-ray?", asked before any probability is shown.

A model trained on chest films prints confident probabilities for anything it is given (a photo,
a CT slice, a knee). The gate flags such inputs so that the app can warn or refuse. It needs no
outside data: everything it learns comes from the chest X-rays the model was trained on.

Three kinds of evidence, cheapest first:

1. **File metadata rules** (DICOM only): a modality that is not a projection radiograph (MR, CT,
   US, ...), a body part that is not the chest, a lateral or oblique view. Plain image files carry
   no such metadata. A *colour* file (a photo) is also caught here when the original file is
   available (the reader converts colour to gray, see :func:`colour_fraction`).
2. **Appearance** (one-class, model-free): a 32x32 "eigen-chest" (probabilistic PCA of contrast-
   normalised thumbnails of chest films) and a Gaussian on a dozen cheap gray-level statistics
   (histogram shape, edges, symmetry, the bright-mediastinum-between-dark-lungs profile, ...).
3. **Feature space** (one-class, per model): the Mahalanobis distance of the classifier's pooled
   embedding to the Gaussian of the training chest X-rays' embeddings (PCA + Ledoit-Wolf).

The one-class components are fitted on the training films plus one augmented copy of each
(other exposure, window, processing and collimation: see :func:`augment_chest`). Each gives a
squared distance ``d``; ``z = (log d - median) / scale`` is normalised by out-of-fold distances of
the training films. On *validation* chest films each component's ``1 - target_fa / n`` quantile
(capped so that at least 5 films lie above it) becomes its offset, the gate's score is the
largest ``z - offset``, and the threshold is the ``1 - target_fa`` quantile of the validation
scores. Only chest films set these numbers, never non-chest images, so the few real non-chest
files we have stay an honest test set. (The offsets matter: the embedding component of some
models is heavy-tailed on unseen films, and it must not raise the bar for the others.)

An aspect ratio beyond :data:`MAX_ASPECT` is a rule of its own. The rules that need no fitting
(metadata, colour, shape) also apply to checkpoints without a gate file (:func:`assess_without_gate`).

No lateral chest films are in the shared data, so lateral views are caught by DICOM metadata
only; whether the appearance score flags a lateral PNG is untested.

Everything is saved in ``gate.safetensors`` beside the checkpoint: arrays as tensors, settings as
JSON in the safetensors metadata (no pickle). The gate is tied to the checkpoint's classifier
weights by a fingerprint; a gate fitted for another model is refused.

CLI (run once per shipped model at release time)::

    python -m chestxray.gate fit --model runs/resnet18/best --data-root ../shared/data \\
        --out runs/resnet18/best/gate.safetensors
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chestxray.imaging import ImageReadError, XrayImage, read_image
from chestxray.transforms import resize_gray

log = logging.getLogger(__name__)

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


def colour_fraction(source: str | os.PathLike | bytes | None, chroma: float = 0.1) -> float | None:
    """Fraction of clearly coloured pixels of a plain image file (None for gray files, DICOM or errors).

    Chest X-rays saved as RGB have R = G = B (0.0 here); photos score 0.4-1.0. Cheap: decodes a
    128 px draft of the file.
    """
    if source is None:
        return None
    from PIL import Image

    try:
        data = source if isinstance(source, (bytes, bytearray)) else Path(os.fspath(source)).read_bytes()
        if bytes(data[128:132]) == b"DICM":
            return None
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                return None
            if im.mode in ("RGB", "YCbCr") and im.format == "JPEG":
                im.draft("RGB", (256, 256))
            im = im.convert("RGB")
            im.thumbnail((128, 128))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except Exception:  # noqa: BLE001 - never fail an analysis over a colour check
        return None
    return float(((a.max(axis=2) - a.min(axis=2)) > chroma).mean())


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

def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of the rows of ``x`` (as scikit-learn's ``LedoitWolf``)."""
    x = x - x.mean(0)
    n, p = x.shape
    cov = x.T @ x / n
    x2 = x ** 2
    trace = x2.sum(0) / n
    mu = trace.sum() / p
    delta_ = (cov ** 2).sum()
    beta_ = (x2.T @ x2).sum() / n
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum() + p * mu ** 2) / p
    beta = min(beta, delta)
    shrink = 0.0 if beta == 0 else beta / delta
    return (1 - shrink) * cov + shrink * mu * np.eye(p)


@dataclass
class _Gaussian:
    """Probabilistic-PCA Gaussian: Mahalanobis distance in the top-k principal subspace
    (Ledoit-Wolf shrunk covariance) plus the residual energy over the mean residual variance."""

    mu: np.ndarray
    sd: np.ndarray
    basis: np.ndarray  # d x k
    precision: np.ndarray  # k x k
    res_var: float

    @classmethod
    def fit(cls, x: np.ndarray, k: int) -> "_Gaussian":
        x = np.asarray(x, np.float64)
        mu = x.mean(0)
        sd = x.std(0)
        sd = np.where(sd > 1e-6 * max(float(sd.max()), 1e-12), sd, max(float(sd.max()), 1e-6))  # dead dims
        z = (x - mu) / sd
        k = max(1, min(k, x.shape[1], x.shape[0] - 2))
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        basis = vt[:k].T
        y = z @ basis
        precision = np.linalg.pinv(ledoit_wolf(y), hermitian=True)
        resid = z - y @ basis.T
        dof = x.shape[1] - k
        res_var = float((resid ** 2).sum(1).mean() / dof) if dof > 0 else 0.0
        return cls(mu, sd, basis, precision, max(res_var, 1e-9) if dof > 0 else 0.0)

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared distance of each row of ``x`` (N x d)."""
        z = (np.atleast_2d(np.asarray(x, np.float64)) - self.mu) / self.sd
        y = z @ self.basis
        d = np.einsum("ni,ij,nj->n", y, self.precision, y)
        if self.res_var > 0:
            d = d + ((z - y @ self.basis.T) ** 2).sum(1) / self.res_var
        return np.maximum(d, 1e-12)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mu": torch.from_numpy(self.mu.copy()), f"{prefix}.sd": torch.from_numpy(self.sd.copy()),
                f"{prefix}.basis": torch.from_numpy(np.ascontiguousarray(self.basis)),
                f"{prefix}.precision": torch.from_numpy(np.ascontiguousarray(self.precision)),
                f"{prefix}.res_var": torch.tensor([self.res_var], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "_Gaussian":
        g = {k: t[f"{prefix}.{k}"].double().numpy() for k in ("mu", "sd", "basis", "precision", "res_var")}
        return cls(g["mu"], g["sd"], g["basis"], g["precision"], float(g["res_var"][0]))


def _oof_distances(x: np.ndarray, k: int, groups: np.ndarray | None = None, folds: int = 5,
                   seed: int = 0) -> np.ndarray:
    """Out-of-fold squared distances of the training rows (an unbiased picture of 'typical');
    rows of one group (an image and its augmented copies) share a fold."""
    n = len(x)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(groups)
    folds = max(2, min(folds, len(uniq) // 10))
    fold_of = dict(zip(np.random.default_rng(seed).permutation(uniq).tolist(), np.arange(len(uniq)) % folds))
    fold = np.array([fold_of[g] for g in groups.tolist()])
    out = np.empty(n)
    for f in range(folds):
        held = fold == f
        out[held] = _Gaussian.fit(x[~held], k).distance(x[held])
    return out


def _robust_norm(d: np.ndarray) -> tuple[float, float]:
    ld = np.log(d)
    med = float(np.median(ld))
    q25, q75 = np.percentile(ld, [25, 75])
    return med, float(max((q75 - q25) / 1.349, 1e-3))


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


@dataclass
class GateStats:
    """What :func:`fit_gate` measured (rates on chest films are false alarms of the score alone)."""

    path: Path | None
    n_train: int
    n_val: int
    threshold: float
    target_fa: float
    val_false_alarm: float
    components: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class Gate:
    """A fitted gate: metadata rules + one-class components + the calibrated threshold."""

    COMPONENTS = ("thumb", "stats", "embedding")

    def __init__(self, models: dict[str, _Gaussian], norms: dict[str, tuple[float, float]], threshold: float,
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
            colour: :func:`colour_fraction` of the original file, when available.
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
        models = {name: _Gaussian.from_tensors(tensors, name) for name in header["components"]}
        norms = {k: (float(v[0]), float(v[1])) for k, v in header["norms"].items()}
        meta = {k: v for k, v in header.items()
                if k not in ("version", "threshold", "colour_limit", "components", "norms", "offsets", "thumb",
                             "stats_side", "stat_names")}
        return cls(models, norms, header["threshold"], meta, header.get("colour_limit", 0.1),
                   offsets=header.get("offsets"))

    def matches(self, predictor) -> bool:
        """Whether this gate was fitted for ``predictor``'s weights (always True without an embedding part)."""
        want = self.meta.get("fingerprint")
        return "embedding" not in self.models or want is None or want == model_fingerprint(predictor)


def assess_without_gate(xray: XrayImage | None, pixels: np.ndarray | None = None, *,
                        colour: float | None = None, colour_limit: float = 0.1) -> GateResult:
    """The rules that need no fitting (metadata, colour, shape) for checkpoints without a gate file."""
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


def model_fingerprint(predictor) -> str:
    """A short hash of the classifier head's weights (ties a gate to the checkpoint it was fitted on).

    Hashed at float16 precision, so a half-precision release of the same weights keeps it."""
    w = predictor._weight.detach().half().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------



def augment_chest(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible variant of a chest film: another exposure/window (gamma, black and white points,
    sometimes histogram equalisation) and another collimation (margins cropped). Fitting on these
    teaches the one-class components that such variation is normal, so washed-out, heavily
    processed or tightly cropped films do not raise alarms."""
    x = np.asarray(pixels, np.float32)
    h, w = x.shape
    top, bottom, left, right = (rng.uniform(0, 0.08, 4) * [h, h, w, w]).astype(int)
    x = x[top: h - bottom or None, left: w - right or None]
    lo, hi = rng.uniform(0.0, 0.12), rng.uniform(0.85, 1.0)
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if rng.random() < 0.5 else x
    if rng.random() < 0.3:  # strong processing (as in many exported films): partial equalisation
        hist = np.histogram(x, bins=256, range=(0.0, 1.0))[0].cumsum()
        eq = (hist / hist[-1]).astype(np.float32)[np.minimum((x * 256).astype(np.int32), 255)]
        a = np.float32(rng.uniform(0.3, 1.0))
        x = (1 - a) * x + a * eq
    x = np.power(x, np.float32(np.exp(rng.uniform(-0.6, 0.6))))
    return np.ascontiguousarray(x, dtype=np.float32)


def _pixels_of(item) -> np.ndarray:
    if isinstance(item, XrayImage):
        return item.pixels
    if isinstance(item, (str, os.PathLike, bytes, bytearray)):
        return read_image(bytes(item) if isinstance(item, bytearray) else item).pixels
    arr = np.asarray(item)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr


@torch.inference_mode()
def _embed(predictor, batch: list[np.ndarray]) -> np.ndarray:
    from chestxray.models import features_and_logits

    x = torch.cat([predictor._input(p) for p in batch])
    feats, _ = features_and_logits(predictor.model, x, predictor.arch)
    return feats.float().mean(dim=(2, 3)).cpu().numpy().astype(np.float64)


@dataclass
class Features:
    """Gate features of a set of images (rows aligned)."""

    thumbs: np.ndarray  # N x THUMB*THUMB
    stats: np.ndarray  # N x len(STAT_NAMES)
    embeddings: np.ndarray | None  # N x C (None without a predictor)
    kept: list[int]  # index into the input list of each row's image
    augmented: np.ndarray  # N bool: row is an augmented copy

    def __len__(self) -> int:
        return len(self.kept)


def extract_features(images: Sequence, predictor=None, batch_size: int = 16, augment: int = 0, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> Features:
    """Reads the images once and computes their gate features (plus ``augment`` augmented copies
    of each, see :func:`augment_chest`). Unreadable files are skipped with a logged warning."""
    rng = np.random.default_rng(seed)
    thumbs, stats, embs, kept, aug, pending = [], [], [], [], [], []

    def flush():
        if predictor is not None and pending:
            embs.append(_embed(predictor, pending))
        pending.clear()

    for i, item in enumerate(images):
        try:
            pixels = np.asarray(_pixels_of(item), np.float32)
        except ImageReadError as err:
            log.warning("skipped %s: %s", item if isinstance(item, (str, os.PathLike)) else i, err)
            continue
        for copy in range(1 + augment):
            x = pixels if copy == 0 else augment_chest(pixels, rng)
            t, s = pixel_features(x)
            thumbs.append(t)
            stats.append(s)
            kept.append(i)
            aug.append(copy > 0)
            pending.append(x)
            if len(pending) >= batch_size:
                flush()
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, len(images))
    flush()
    emb = np.concatenate(embs) if embs else None
    return Features(np.array(thumbs).reshape(len(kept), -1), np.array(stats).reshape(len(kept), -1), emb, kept,
                    np.array(aug, dtype=bool))


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(1)


def fit_gate(predictor, train_images: Sequence, val_images: Sequence, out_path: str | os.PathLike | None = None,
             *, target_fa: float = 0.01, k_thumb: int = 24, k_embedding: int = 32, augment: int = 1,
             use_embedding: bool = True, seed: int = 0, meta: dict[str, Any] | None = None,
             train_features: Features | None = None, val_features: Features | None = None) -> tuple[Gate, GateStats]:
    """Fits the gate on chest X-rays only and calibrates its threshold on held-out chest X-rays.

    Args:
        predictor: the :class:`~chestxray.predictor.Predictor` whose embeddings the gate models
            (None: appearance components only).
        train_images: frontal chest X-rays the model was trained on (paths, bytes, XrayImages or
            arrays): the Gaussians are fitted on them (and on ``augment`` augmented copies of each).
        val_images: other frontal chest X-rays (not in ``train_images``, ideally patients the model
            did not see): the threshold is the ``1 - target_fa`` quantile of their scores.
        out_path: where to save ``gate.safetensors`` (None: do not save).
        target_fa: the false-alarm rate aimed at on chest X-rays.
        k_thumb, k_embedding: principal components kept (capped by the number of images).
        train_features, val_features: precomputed :func:`extract_features` results (skip reading).

    Returns:
        (gate, stats).
    """
    emb_pred = predictor if use_embedding else None
    tr = train_features or extract_features(train_images, emb_pred, augment=augment, seed=seed)
    va = val_features or extract_features(val_images, emb_pred)
    n_tr, n_va = int((~tr.augmented).sum()), int((~va.augmented).sum())
    if n_tr < 10 or n_va < 5:
        raise ValueError(f"too few readable images to fit a gate: {n_tr} train, {n_va} val")
    data = {"thumb": (tr.thumbs, va.thumbs, k_thumb), "stats": (tr.stats, va.stats, len(STAT_NAMES))}
    if use_embedding and tr.embeddings is not None and va.embeddings is not None:
        data["embedding"] = (tr.embeddings, va.embeddings, k_embedding)
    groups = np.asarray(tr.kept)
    models, norms = {}, {}
    with _one_blas_thread():  # small matrices: extra BLAS threads only fight the other jobs
        for name, (x, _, k) in data.items():
            kk = min(k, max(2, n_tr // 5))
            models[name] = _Gaussian.fit(x, kk)
            norms[name] = _robust_norm(_oof_distances(x, kk, groups=groups, seed=seed))
    gate = Gate(models, norms, threshold=np.inf)
    val_z = gate.component_z(va.thumbs, va.stats, va.embeddings if "embedding" in models else None)
    # Each component is first calibrated on its own (its 1 - target_fa / n quantile on val becomes
    # 0; at least 5 val films above it, so that small val sets give stable offsets), then the
    # combined score's 1 - target_fa quantile is the threshold.
    q = min(1.0 - target_fa / len(val_z), 1.0 - 5.0 / n_va)
    gate.offsets = {k: float(np.quantile(v, q)) for k, v in val_z.items()}
    val_scores = gate.combine(val_z)
    threshold = float(np.quantile(val_scores, 1.0 - target_fa, method="higher"))
    gate.threshold = threshold
    gate.meta = {"target_fa": target_fa, "n_train": n_tr, "n_train_augmented": int(tr.augmented.sum()),
                 "n_val": n_va, "val_false_alarm": float((val_scores > threshold).mean()), **(meta or {})}
    if predictor is not None:
        gate.meta.update(model=str(predictor.name), arch=str(predictor.arch), fingerprint=model_fingerprint(predictor),
                         embedding_dim=int(tr.embeddings.shape[1]) if "embedding" in models else 0)
    path = gate.save(out_path) if out_path is not None else None
    stats = GateStats(path, n_tr, n_va, threshold, target_fa, gate.meta["val_false_alarm"], list(models),
                      dict(gate.meta))
    return gate, stats


# --------------------------------------------------------------------------------------------
# Evaluation sets and the CLI
# --------------------------------------------------------------------------------------------

#: Real non-chest files in the shared data (file name -> what it is).
NON_CHEST_FILES = {
    "ood/photo_china.jpg": "photo", "ood/photo_flower.jpg": "photo", "ood/photo_grace_hopper.jpg": "photo",
    "ood/ct_abdomen_kcr2019.png": "CT (png)", "ood/mri_brain_matplotlib_s1045.png": "MR (png)",
    "ood/mri_pydicom_MR2.png": "MR (png)", "dicom/kcr2019_anon_apct_abdomen_CT.dcm": "CT (dicom)",
    "dicom/pydicom_MR2_UNCR_mr.dcm": "MR (dicom)", "dicom/pydicom_US1_UNCR_us.dcm": "ultrasound (dicom)",
    "dicom/pydicom_RG3_UNCR_tibia_CR.dcm": "tibia radiograph (dicom)",
}
#: Real chest X-rays outside the training sources' folders (uploads as a user would make them).
EXTRA_CHEST_FILES = ("dicom/pydicom_RG1_UNCR_chest_CR.dcm", "dicom/pydicom_RG1_J2KI_chest_CR_jpeg2000.dcm",
                     "misc/16747_3_1.jpg", "misc/covid-19-pneumonia-58-prior.jpg", "misc/h0001.png",
                     "misc/tb0005.png", "misc/tb0007.png")


def chest_manifest(model_dir: str | os.PathLike, data_root: str | os.PathLike,
                   extra_sources: Sequence[str] = ("tbx11k",), seed: int = 0,
                   manifest: str | os.PathLike | None = None):
    """Chest X-ray manifest with a ``split`` column: ``manifest`` or the run's ``manifest.csv`` (in the
    model folder or its parent: the model's own split), else a patient split of the shared sources;
    sources in ``extra_sources`` that the run did not use get their own patient split."""
    import pandas as pd

    from chestxray.data import SOURCES, load_sources, patient_split
    from chestxray.labels import get_label_set

    labels = get_label_set("nih14")
    folder = Path(model_dir).resolve()
    found = [Path(p) for p in (manifest, folder / "manifest.csv", folder.parent / "manifest.csv")
             if p is not None and Path(p).is_file()]
    if manifest is not None and not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    if found:
        df = pd.read_csv(found[0], usecols=["path", "patient", "source", "split"])
        df["from"] = f"run manifest {found[0]}"  # (the path is printed, not stored in the gate)
    else:
        names = [s for s in SOURCES if s != "nih_full_res"]
        df = load_sources(names, data_root, labels, missing="drop")
        df["split"] = patient_split(df, seed=seed, stratify_by=[])
        df = df[["path", "patient", "source", "split"]].assign(**{"from": "patient split"})
    extra = [s for s in extra_sources if s not in set(df["source"])]
    if extra:
        ex = load_sources(extra, data_root, labels, missing="drop")
        ex["split"] = patient_split(ex, seed=seed, stratify_by=[])
        df = pd.concat([df, ex[["path", "patient", "source", "split"]].assign(**{"from": "gate split"})],
                       ignore_index=True)
    return df


def _sample(df, n: int, seed: int):
    return df if len(df) <= n else df.sample(n=n, random_state=seed)


def evaluate(gate: Gate, predictor, groups: dict[str, Sequence], chest: set[str] | None = None,
             pixels_only: set[str] | None = None) -> list[dict]:
    """Flag rates per group: ``{group: [paths or arrays]}`` -> rows with n, flagged, rate, per-rule counts.

    Groups named in ``chest`` count flags as false alarms, the others as catches. Files are read
    as a user would upload them (metadata and colour rules apply), except for groups named in
    ``pixels_only``: these are judged on their gray pixels alone, as if exported to gray PNG.
    Arrays (float HxW in [0,1]) are judged on their pixels.
    """
    rows = []
    for name, items in groups.items():
        flagged, n, by_rule, files = 0, 0, {}, []
        for i, item in enumerate(items):
            is_file = isinstance(item, (str, os.PathLike))
            try:
                x = read_image(item) if is_file else None
            except ImageReadError:
                continue
            pixels = x.pixels if x is not None else _pixels_of(item)
            emb = _embed(predictor, [pixels])[0] if predictor is not None and "embedding" in gate.models else None
            if not is_file or (pixels_only and name in pixels_only):
                r = gate.assess(None, pixels, emb)
            else:
                r = gate.assess(x, pixels, emb, colour=colour_fraction(item))
            n += 1
            flagged += not r.ok
            for rule in r.rules:
                by_rule[rule] = by_rule.get(rule, 0) + 1
            files.append((Path(item).name if is_file else f"#{i}", r.ok, round(r.score, 2), r.rules))
        rows.append({"group": name, "kind": "chest" if chest and name in chest else "non-chest", "n": n,
                     "flagged": flagged, "rate": flagged / n if n else float("nan"), "rules": by_rule,
                     "files": files})
    return rows


def format_rows(rows: list[dict], show_files: bool = False) -> str:
    """A plain-text table of :func:`evaluate` rows."""
    lines = [f"{'group':34s} {'kind':9s} {'n':>5s} {'flagged':>7s} {'rate':>7s}  metric          by rule"]
    for r in rows:
        metric = "false alarm" if r["kind"] == "chest" else "catch"
        lines.append(f"{r['group']:34s} {r['kind']:9s} {r['n']:5d} {r['flagged']:7d} {r['rate']:7.1%}  "
                     f"{metric:15s} {r['rules']}")
        if show_files:
            lines += [f"    {f:40s} ok={ok!s:5s} score={s:6.2f} {rules}" for f, ok, s, rules in r["files"]]
    return "\n".join(lines)


def fit_from_folder(model_dir: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike | None,
                    *, max_train_per_source: int = 600, max_eval_per_source: int = 300, target_fa: float = 0.01,
                    seed: int = 0, report: bool = True, extra_sources: Sequence[str] = ("tbx11k",),
                    manifest: str | os.PathLike | None = None,
                    use_embedding: bool = True,
                    print_fn: Callable[[str], None] = print) -> tuple[Gate, GateStats, list]:
    """Fits a gate for a checkpoint folder from the shared data and reports its rates.

    Gaussians: the train split (at most ``max_train_per_source`` per source); threshold: the val
    split; report: the test split per source, the extra real chest files and the real non-chest
    files (never used in fitting or calibration).
    """
    from chestxray.checkpoint import load_folder
    from chestxray.predictor import Predictor

    root = Path(data_root)
    predictor = Predictor(load_folder(model_dir), device="cpu")
    df = chest_manifest(model_dir, root, extra_sources=extra_sources, seed=seed, manifest=manifest)
    if not str(df["from"].iloc[0]).startswith("run manifest"):
        print_fn("warning: no run manifest.csv beside the model (pass --manifest runs/<arch>/manifest.csv): a fresh "
                 "patient split is used, so 'val' and 'test' may hold images the model was trained on")
    parts = {}
    for split, cap in (("train", max_train_per_source), ("val", max_eval_per_source), ("test", max_eval_per_source)):
        sub = df[df["split"] == split]
        parts[split] = {s: list(_sample(g, cap, seed)["path"]) for s, g in sub.groupby("source")}
    train = [p for ps in parts["train"].values() for p in ps]
    val = [p for ps in parts["val"].values() for p in ps]
    t0 = time.perf_counter()
    print_fn(f"fitting on {len(train)} train / calibrating on {len(val)} val chest X-rays "
             f"({df['from'].iloc[0]}); model {predictor.name} ({predictor.arch})")
    gate, stats = fit_gate(predictor, train, val, out, target_fa=target_fa, use_embedding=use_embedding,
                           meta={"sources": sorted(parts["train"]),
                                 "split_from": str(df["from"].iloc[0]).split(" /")[0]})
    print_fn(f"threshold {stats.threshold:.3f} (val false alarm {stats.val_false_alarm:.1%}); "
             f"{time.perf_counter() - t0:.0f} s; saved to {stats.path}")
    rows = []
    if report:
        groups = {f"val chest {s}": ps for s, ps in parts["val"].items()}
        groups.update({f"test chest {s}": ps for s, ps in parts["test"].items()})
        groups["extra chest files (misc, dicom)"] = [str(root / f) for f in EXTRA_CHEST_FILES if (root / f).is_file()]
        chest = set(groups)
        non_chest = [str(root / f) for f in NON_CHEST_FILES if (root / f).is_file()]
        groups["non-chest files (ood, dicom)"] = non_chest
        groups["non-chest, gray pixels only"] = non_chest
        rows = evaluate(gate, predictor, groups, chest, pixels_only={"non-chest, gray pixels only"})
        print_fn(format_rows(rows, show_files=False))
        print_fn(format_rows([r for r in rows if r["kind"] == "non-chest" or "extra" in r["group"]], show_files=True))
    return gate, stats, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestxray.gate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the input gate of a checkpoint folder and report its rates")
    f.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    f.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    f.add_argument("--out", default=None, help=f"output file (default: <model>/{GATE_FILE})")
    f.add_argument("--manifest", default=None,
                   help="the training run's manifest.csv (default: found beside the model folder or in its parent)")
    f.add_argument("--target-fa", type=float, default=0.01, help="false-alarm rate aimed at on val chest X-rays")
    f.add_argument("--max-train-per-source", type=int, default=600)
    f.add_argument("--max-eval-per-source", type=int, default=300)
    f.add_argument("--no-embedding", action="store_true", help="appearance components only")
    f.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    f.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(max(1, args.threads))
    out = args.out or str(Path(args.model) / GATE_FILE)
    fit_from_folder(args.model, args.data_root, out, max_train_per_source=args.max_train_per_source,
                    max_eval_per_source=args.max_eval_per_source, target_fa=args.target_fa, seed=args.seed,
                    use_embedding=not args.no_embedding, manifest=args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The checkpoint's own block of ``config.json`` (``"chestxray": {...}``): one typed reader and writer.

timm ignores unknown root keys of ``config.json``, so the project keeps its facts there: the label
set, per-label thresholds, how the weights were trained (:class:`Training`) and what ``release``
measured on held-out films (:class:`ReleaseMetrics`). Every module reads and writes the block through
:class:`CkptMeta` instead of indexing dicts.

Reading is tolerant, because shipped and downloaded files come from older versions: a missing or
mistyped field reads as ``None`` (or empty), older names are mapped to current ones
(``metrics.headline_source`` -> ``headline_group``; a flat ``mean_auroc`` number -> group
:data:`ALL`), and fields this version does not know are kept in ``extra`` so that a read-modify-write
never drops them. Importing it pulls in neither torch nor timm.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from chestxray.layout import CONFIG_FILE, CheckpointError

#: The root key of config.json that holds the block.
KEY = "chestxray"
#: Group key of a flat (ungrouped) test result in older files: all test films together.
ALL = "all"


def is_num(v: Any) -> bool:
    """A real number (bool and NaN are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def map_threshold(threshold: float, temperature: float, shift: float = 0.0) -> float:
    """An operating threshold on the calibrated scale: ``sigmoid(logit(t) / T + b)``.

    ``sigmoid(z / T + b) >= sigmoid(logit(t) / T + b)`` exactly when ``sigmoid(z) >= t`` (T > 0): the same
    films are flagged before and after calibration (:mod:`chestxray.calibration` fits T, :mod:`chestxray.prevalence`
    the prior shift b; this run-time half is here so that the predictor needs nothing from the offline code).
    """
    t = float(threshold)
    if (temperature == 1.0 and shift == 0.0) or not 0.0 < t < 1.0:
        return t
    x = (math.log(t) - math.log1p(-t)) / float(temperature) + float(shift)
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _num(v: Any) -> float | None:
    return float(v) if is_num(v) else None


def _int(v: Any) -> int | None:
    return int(v) if is_num(v) and float(v).is_integer() else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _dict(v: Any) -> dict[str, Any]:
    return dict(v) if isinstance(v, Mapping) else {}


def _str_list(v: Any) -> list[str]:
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else []


def ci_pair(v: Any) -> list[float] | None:
    """A confidence interval ``[low, high]`` of two numbers, else None (e.g. ``[null, null]``)."""
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(is_num(x) for x in v)
    return [float(x) for x in v] if ok else None


def _compact(obj: Any, skip: tuple[str, ...] = ("extra",)) -> dict[str, Any]:
    """The dataclass's fields as a dict without None and empty containers, then its extras."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if f.name in skip or v is None or (isinstance(v, (dict, list)) and not v):
            continue
        out[f.name] = v
    return {**out, **getattr(obj, "extra", {})}


@dataclass
class Training:
    """How the weights were made (written by training; ``recipe`` added by ``release``)."""

    epoch: int | None = None
    val_mean_auroc: float | None = None
    val_mean_auroc_ci: list[float] | None = None
    threshold_rule: str | None = None
    sources: list[str] = field(default_factory=list)
    #: The validation films that selected the epoch: source/cohort names, or ``"all"``.
    val_sources: list[str] | str | None = None
    split: str | None = None
    seed: int | None = None
    n_images: dict[str, int] = field(default_factory=dict)
    pretrained: bool | None = None
    img_size: int | None = None
    initialised_from: str | None = None
    taught_by: str | None = None
    trained_on: str | None = None
    #: The training run's hyper-parameters (a subset of ``train_config.json``), as ``release`` copies them;
    #: not the recipe file's path, which a run records as ``recipe_file``.
    recipe: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "Training":
        """Reads the ``training`` dict; anything else reads as an empty record."""
        d = _dict(d)
        vs = d.get("val_sources")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(epoch=_int(d.get("epoch")), val_mean_auroc=_num(d.get("val_mean_auroc")),
                   val_mean_auroc_ci=ci_pair(d.get("val_mean_auroc_ci")),
                   threshold_rule=_str(d.get("threshold_rule")), sources=_str_list(d.get("sources")),
                   val_sources=_str_list(vs) if isinstance(vs, (list, tuple)) else _str(vs),
                   split=_str(d.get("split")), seed=_int(d.get("seed")),
                   n_images={k: int(v) for k, v in _dict(d.get("n_images")).items() if _int(v) is not None},
                   pretrained=d["pretrained"] if isinstance(d.get("pretrained"), bool) else None,
                   img_size=_int(d.get("img_size")), initialised_from=_str(d.get("initialised_from")),
                   taught_by=_str(d.get("taught_by")), trained_on=_str(d.get("trained_on")),
                   recipe=_dict(d.get("recipe")), extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (None and empty fields left out)."""
        return _compact(self)


@dataclass
class ReleaseMetrics:
    """What ``release`` measured on the held-out test films, per group (source or cohort)."""

    split: str = "test"
    #: The headline group (NIH's label-balanced films); older files call it ``headline_source``.
    headline_group: str | None = None
    #: The group shown beside it (all NIH test films).
    mixed_group: str | None = None
    mean_auroc: dict[str, float | None] = field(default_factory=dict)
    #: ``{group: [low, high]}``; a group without a defined AUROC may hold ``[None, None]``.
    mean_auroc_ci: dict[str, Any] = field(default_factory=dict)
    #: Per-label AUROC on the headline group.
    auroc: dict[str, float | None] = field(default_factory=dict)
    n_test_images: dict[str, int] = field(default_factory=dict)
    pneumonia_auroc: dict[str, float | None] = field(default_factory=dict)
    flags_per_normal_film: dict[str, float | None] = field(default_factory=dict)
    float16_check: dict[str, Any] = field(default_factory=dict)
    localization: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, split: str = "test") -> "ReleaseMetrics | None":
        """Reads a ``metrics`` dict (per-group, or an older flat one); None when it holds no result."""
        d = _dict(d)
        if not d:
            return None
        mean = d.get("mean_auroc")
        flat = not isinstance(mean, Mapping)  # older files: one number for all test films
        group_map = (lambda v: {ALL: v}) if flat else _dict  # noqa: E731
        n = d.get("n_test_images", d.get("n_images")) if flat else d.get("n_test_images")
        known = ({f.name for f in fields(cls)} | {"headline_source", "n_images"}) - {"extra"}
        return cls(split=_str(d.get("split")) or split,
                   headline_group=_str(d.get("headline_group", d.get("headline_source"))),
                   mixed_group=_str(d.get("mixed_group")),
                   mean_auroc={g: _num(v) for g, v in group_map(mean).items()},
                   mean_auroc_ci=dict(group_map(d.get("mean_auroc_ci"))),
                   auroc={k: _num(v) for k, v in _dict(d.get("auroc")).items()},
                   n_test_images={g: int(v) for g, v in group_map(n).items() if _int(v) is not None},
                   pneumonia_auroc={g: _num(v) for g, v in _dict(d.get("pneumonia_auroc")).items()},
                   flags_per_normal_film={g: _num(v) for g, v in _dict(d.get("flags_per_normal_film")).items()},
                   float16_check=_dict(d.get("float16_check")), localization=_dict(d.get("localization")),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (None and empty fields left out)."""
        return _compact(self)

    def groups(self) -> list[str]:
        """Groups with a mean AUROC: the headline group first, the mixed group second, then by name."""
        first = [self.headline_group, self.mixed_group]
        return sorted((g for g, v in self.mean_auroc.items() if v is not None),
                      key=lambda g: (g not in first, first.index(g) if g in first else 0, g))

    def ci(self, group: str) -> list[float] | None:
        """The group's 95% CI of the mean AUROC, when both ends are numbers."""
        return ci_pair(self.mean_auroc_ci.get(group))


@dataclass
class Calibration:
    """How the predictor turns a logit into the probability it reports (``release`` / ``recard`` write it).

    Per label: a temperature ``T`` fitted on validation films, then a prior shift ``b`` that puts the number
    on a stated reference population's scale (:mod:`chestxray.prevalence`; e.g. adult NIH films at NIH's
    prevalence): the predictor reports ``sigmoid(logit / T + b)`` and compares it with the threshold mapped
    the same way (:func:`map_threshold`), so the same films are flagged and every ranking (AUROC) is
    unchanged. A label without T has T = 1, without b has b = 0. ``CkptMeta.thresholds`` stay on the raw
    ``sigmoid(logit)`` scale, which is what plain timm gives.
    """

    method: str = "temperature"
    temperatures: dict[str, float] = field(default_factory=dict)
    #: Which films the temperatures were fitted on (e.g. "validation split, reproduce_chexnet").
    fitted_on: str | None = None
    n_films: int | None = None
    #: ``{label: [NLL before, NLL after]}`` on those validation films.
    val_nll: dict[str, Any] = field(default_factory=dict)
    #: ``{label: b}``: the logit shift (after the temperature) to the reference population's prevalence.
    shifts: dict[str, float] = field(default_factory=dict)
    #: The population the probabilities refer to (e.g. "adult NIH ChestX-ray14 films"), when shifted.
    reference: str | None = None
    #: ``{label: prevalence}`` of that population (labels without one are not shifted).
    prevalence: dict[str, float] = field(default_factory=dict)
    #: Which films the shifts were fitted on, reweighted to the reference prevalence.
    shift_fitted_on: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "Calibration | None":
        """Reads the ``calibration`` dict; None without a usable temperature or shift."""
        d = _dict(d)
        temps = {str(k): float(v) for k, v in _dict(d.get("temperatures")).items() if is_num(v) and v > 0}
        shifts = {str(k): float(v) for k, v in _dict(d.get("shifts")).items() if is_num(v)}
        if not (temps or shifts) or (_str(d.get("method")) or "temperature") not in METHODS:
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(method=_str(d.get("method")) or "temperature", temperatures=temps, fitted_on=_str(d.get("fitted_on")),
                   n_films=_int(d.get("n_films")), val_nll=_dict(d.get("val_nll")), shifts=shifts,
                   reference=_str(d.get("reference")),
                   prevalence={str(k): float(v) for k, v in _dict(d.get("prevalence")).items() if is_num(v)},
                   shift_fitted_on=_str(d.get("shift_fitted_on")),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (None and empty fields left out)."""
        return _compact(self)


#: Calibration methods the predictor can apply: temperatures alone, or temperatures then a prior shift.
METHODS = ("temperature", "temperature+prior_shift")


@dataclass
class Ensemble:
    """An ensemble folder's recipe: it holds no weights, it names its members (:mod:`chestxray.ensemble`).

    The members are model names (``models.yaml`` entries, which are also their shipped folders' names).
    The ensemble reports the mean of the members' calibrated probabilities and the mean of their Grad-CAMs
    on one grid; its thresholds (``CkptMeta.thresholds``) are on that mean's scale, chosen on validation films
    of every member, so nothing maps them.
    """

    members: list[str] = field(default_factory=list)
    combine: str = "mean of calibrated probabilities"
    cam: str = "mean of the members' Grad-CAMs on the finest member grid"
    #: The member whose input gate checks the films (the first member unless said otherwise).
    gate: str | None = None
    #: The members' common input side in pixels (for cards; None when they differ).
    img_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "Ensemble | None":
        """Reads the ``ensemble`` dict; None without a list of member names."""
        d = _dict(d)
        members = _str_list(d.get("members"))
        if not members:
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(members=members, combine=_str(d.get("combine")) or cls.combine, cam=_str(d.get("cam")) or cls.cam,
                   gate=_str(d.get("gate")), img_size=_int(d.get("img_size")),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (None and empty fields left out)."""
        return _compact(self)

    @property
    def gate_member(self) -> str:
        """The member whose input gate is used."""
        return self.gate if self.gate in self.members else self.members[0]


@dataclass
class CkptMeta:
    """The whole ``chestxray`` block of a checkpoint's config.json."""

    label_set: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    training: Training | None = None
    metrics: ReleaseMetrics | None = None
    calibration: Calibration | None = None
    #: Set in an ensemble folder's config (no weights of its own): its members and how they are combined.
    ensemble: Ensemble | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, block: Any) -> "CkptMeta":
        """Reads the block; a missing or malformed one reads as empty (never raises)."""
        d = _dict(block)
        training = Training.from_dict(d["training"]) if isinstance(d.get("training"), Mapping) else None
        metrics = ReleaseMetrics.from_dict(d.get("metrics"))
        legacy = [k for k in ("evaluation", "test") if isinstance(d.get(k), Mapping)]
        if metrics is None and legacy:  # the first toolkit versions' names for the same record
            metrics = ReleaseMetrics.from_dict(d[legacy[0]], split=legacy[0])
        else:
            legacy = []
        return cls(label_set=_str(d.get("label_set")),
                   thresholds={str(k): float(v) for k, v in _dict(d.get("thresholds")).items() if is_num(v)},
                   training=training, metrics=metrics, calibration=Calibration.from_dict(d.get("calibration")),
                   ensemble=Ensemble.from_dict(d.get("ensemble")),
                   extra={k: v for k, v in d.items()
                          if k not in ("label_set", "thresholds", "training", "metrics", "calibration", "ensemble",
                                       *legacy)})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CkptMeta":
        """Reads the block of a parsed config.json."""
        return cls.from_dict(config.get(KEY) if isinstance(config, Mapping) else None)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "CkptMeta":
        """Reads the block of ``<folder>/config.json``."""
        return cls.from_config(json.loads((Path(folder) / CONFIG_FILE).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``label_set`` and ``thresholds`` always, the rest where known."""
        out: dict[str, Any] = {"label_set": self.label_set, "thresholds": dict(self.thresholds)}
        if self.training is not None:
            out["training"] = self.training.to_dict()
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.ensemble is not None:
            out["ensemble"] = self.ensemble.to_dict()
        return {**out, **self.extra}

    @property
    def temperatures(self) -> dict[str, float]:
        """``{label: T}`` of the labels with a fitted temperature (empty: probabilities are not recalibrated)."""
        return dict(self.calibration.temperatures) if self.calibration else {}

    @property
    def shifts(self) -> dict[str, float]:
        """``{label: b}`` of the labels shifted to the reference population's prevalence (empty: none)."""
        return dict(self.calibration.shifts) if self.calibration else {}

    @property
    def reference(self) -> str | None:
        """The population the reported probabilities refer to (None: the training mix's own scale)."""
        return self.calibration.reference if self.calibration and self.calibration.shifts else None

    def calibrated_thresholds(self) -> dict[str, float]:
        """The operating thresholds on the scale of the probabilities the predictor reports: each one
        mapped by its label's temperature and shift (:func:`map_threshold`); unchanged without."""
        temps, shifts = self.temperatures, self.shifts
        return {k: map_threshold(t, temps.get(k, 1.0), shifts.get(k, 0.0)) for k, t in self.thresholds.items()}

    def apply(self, config: dict[str, Any]) -> dict[str, Any]:
        """Sets this block in a parsed config.json (in place) and returns it."""
        config[KEY] = self.to_dict()
        return config

    def write(self, folder: str | os.PathLike) -> Path:
        """Replaces the block in ``<folder>/config.json``, keeping timm's fields as they are."""
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.apply(json.loads(path.read_text())), indent=2))
        return path


def read_config(folder: Path) -> dict[str, Any]:
    """Reads and sanity-checks a checkpoint folder's config.json (an ensemble folder's needs only its labels)."""
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{CONFIG_FILE} in {folder.name} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{CONFIG_FILE} in {folder.name} is not a JSON object")
    # An ensemble has no weights, hence none of timm's fields: its members have them.
    needed = ("label_names",) if ensemble_of(cfg) else ("architecture", "label_names", "pretrained_cfg")
    for key in needed:
        if key not in cfg:
            raise CheckpointError(f"{CONFIG_FILE} in {folder.name} lacks {key!r}")
    return cfg


def ensemble_of(config: Mapping[str, Any]) -> Ensemble | None:
    """The ensemble recipe of a parsed config.json, or None for a checkpoint of one model."""
    block = config.get(KEY) if isinstance(config, Mapping) else None
    return Ensemble.from_dict(block.get("ensemble")) if isinstance(block, Mapping) else None


def read_ensemble(folder: str | os.PathLike) -> Ensemble | None:
    """The ensemble recipe in ``<folder>/config.json``; None when the folder holds one model or no readable config."""
    path = Path(folder) / CONFIG_FILE
    try:
        return ensemble_of(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None

"""The app's model list (``models.yaml``): which checkpoints are installed, loading each once, model cards.

The list is found by :func:`chestxray.layout.models_file` (``$CHESTXRAY_MODELS``, the checkout's
``models.yaml``, or the copy installed with the package) and the shipped folders by
:func:`chestxray.layout.weights_dir`. A model is *available* when its shipped folder exists or its
pinned Hub revision is already in the Hugging Face cache. Nothing else is ever offered: with no
trained weights installed the registry is empty, and callers say so (:data:`NO_MODEL`) instead of
predicting with random weights.

Only pinned Hub references (``hf-hub:org/name@<40-hex commit>``, as ``chestxray publish`` prints them)
are followed: an unpinned one would let the newest upload silently replace the reviewed weights, so
it is ignored with one log line and the shipped folder is used.

An *ensemble* folder (``config.json`` naming its members, no weights: :mod:`chestxray.ensemble`) is available
when its members are; it is built from the registry's own loaded members, so no model is held twice.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from chestxray import hub
from chestxray.ckpt_config import ALL, CkptMeta, ReleaseMetrics, Training, is_num, read_config, read_ensemble
from chestxray.layout import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, weights_dir
from chestxray.layout import MODELS_ENV, models_file  # noqa: F401 (MODELS_ENV re-exported)
from chestxray.sources import GROUP_NAMES

if TYPE_CHECKING:  # torch is imported on the first load, not with the registry
    from chestxray.ensemble import EnsemblePredictor
    from chestxray.predictor import Predictor

log = logging.getLogger(__name__)

#: The one line shown (and raised) when no trained checkpoint is installed.
NO_MODEL = "No trained model is installed: see the README to train or download one."


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``models.yaml``: display name, ``hf-hub:`` reference, shipped folder name."""

    name: str
    hub: str | None = None
    local: str | None = None


class ModelRegistry:
    """Thread-safe registry: each model is loaded at most once, on first use."""

    def __init__(self, entries: list[ModelEntry], default: str | None = None):
        self.entries = {e.name: e for e in entries}
        self._default = default
        self._cache: dict[str, Predictor | EnsemblePredictor] = {}
        self._locks = {name: threading.Lock() for name in self.entries}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None) -> "ModelRegistry":
        """Reads the model list (default: :func:`chestxray.layout.models_file`; none found: an empty list)."""
        path = Path(path) if path else models_file()
        if path is None:
            log.warning("no models.yaml found (set $%s): no model is offered", MODELS_ENV)
            return cls([])
        data = yaml.safe_load(path.read_text()) or {}
        entries = []
        for item in data.get("models") or []:
            local = item.get("local")
            if local and (os.sep in str(local) or "/" in str(local) or str(local) in (".", "..")):
                raise ValueError(f"{path.name}: 'local' must be a folder name under weights/, got {local!r}")
            entries.append(ModelEntry(str(item["name"]), item.get("hub"), str(local) if local else None))
        return cls(entries, data.get("default"))

    # -- what is installed -----------------------------------------------------------------------
    def _shipped(self, entry: ModelEntry) -> bool:
        folder = weights_dir() / (entry.local or entry.name)
        return (folder / CONFIG_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or bool(self._members(entry)))

    def _members(self, entry: ModelEntry) -> list[str] | None:
        """The members an entry's shipped folder names when it is an ensemble; None for a model of its own."""
        folder = weights_dir() / (entry.local or entry.name)
        spec = None if (folder / WEIGHTS_FILE).is_file() else read_ensemble(folder)
        return spec.members if spec else None

    def missing_members(self, name: str) -> list[str]:
        """The members of ensemble ``name`` that are not available (why it is not offered); [] otherwise."""
        members = self._members(self._entry(name)) or []
        return [m for m in members if m not in self.entries or m == name or self._members(self.entries[m])
                or not self._installed(self.entries[m])]

    @staticmethod
    def _in_hf_cache(ref: str | None) -> bool:
        if not ref or not ref.startswith(hub.HUB_PREFIX) or not hub.is_pinned(ref):
            return False
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, rev = hub.split_repo(ref)
            return all(isinstance(try_to_load_from_cache(repo, f, revision=rev), str)
                       for f in (CONFIG_FILE, WEIGHTS_FILE))
        except Exception:  # noqa: BLE001 - a malformed repo id is simply not cached
            return False

    def _installed(self, entry: ModelEntry) -> bool:
        return entry.name in self._cache or self._shipped(entry) or self._in_hf_cache(entry.hub)

    def available(self) -> list[str]:
        """Names (yaml order) whose shipped folder exists or whose Hub repo is cached; an ensemble when all its
        members are available (members are models of their own: an ensemble of ensembles is not offered)."""
        return [n for n, e in self.entries.items() if self._installed(e) and not self.missing_members(n)]

    def default(self) -> str | None:
        """The yaml's default if available, else the first available model, else None."""
        names = self.available()
        if self._default in names:
            return self._default
        return names[0] if names else None

    # -- loading ----------------------------------------------------------------------------------
    def _entry(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            choices = ", ".join(self.entries) or "none"
            raise CheckpointError(f"unknown model {name!r}; choose one of: {choices}") from None

    def folder(self, name: str) -> Path:
        """The local checkpoint folder of a model (pinned Hub revision, downloaded or cached, else its shipped folder)."""
        entry = self._entry(name)
        if name in self._cache:
            return self._cache[name].ckpt.path
        local = entry.local or entry.name
        if entry.hub and hub.is_pinned(entry.hub):
            return hub.resolve(entry.hub, fallback=local)
        if self._shipped(entry):
            if entry.hub:
                _warn_unpinned(entry.hub, local)
            return weights_dir() / local
        why = f"{entry.hub} is not pinned to a commit and " if entry.hub else ""
        raise CheckpointError(f"model {name!r} is not installed: {why}there is no {weights_dir() / local}")

    def get(self, name: str) -> Predictor:
        """The model's :class:`Predictor`, loaded once (concurrent first calls wait for one load)."""
        entry = self._entry(name)
        if name in self._cache:
            return self._cache[name]
        with self._locks[entry.name]:
            if name not in self._cache:
                # Imported here: listing models and reading their cards (what the app's page needs) stays
                # free of torch and timm, about 5 s of an app's start-up.
                from chestxray.checkpoint import load_folder
                from chestxray.predictor import Predictor

                folder = self.folder(name)
                ens = None if (folder / WEIGHTS_FILE).is_file() else read_ensemble(folder)
                self._cache[name] = (Predictor(load_folder(folder)) if ens is None else
                                     self._ensemble(name, folder, ens.members))
            return self._cache[name]

    def _ensemble(self, name: str, folder: Path, members: list[str]) -> EnsemblePredictor:
        """Ensemble ``name`` over the registry's own members (loaded here when they are not yet)."""
        from chestxray.ensemble import EnsemblePredictor

        if missing := self.missing_members(name):
            raise CheckpointError(f"ensemble {name!r} needs {', '.join(missing)}, which "
                                  f"{'is' if len(missing) == 1 else 'are'} not installed")
        return EnsemblePredictor.from_folder(folder, [self.get(m) for m in members])

    def loaded(self) -> list[str]:
        """Names of the models loaded so far."""
        return list(self._cache)

    # -- model card -------------------------------------------------------------------------------
    def card(self, name: str) -> dict[str, Any]:
        """A defensive summary of the checkpoint's ``chestxray`` block (missing keys are left out)."""
        if name in self._cache:
            cfg = self._cache[name].ckpt.config
            folder = self._cache[name].ckpt.path
        else:
            folder = self.folder(name)
            cfg = read_config(folder)
        meta = CkptMeta.from_config(cfg)
        training = meta.training or Training()
        size = (cfg.get("pretrained_cfg") or {}).get("input_size") or [None]
        card: dict[str, Any] = {
            "name": name, "arch": cfg.get("architecture"), "img_size": size[-1],
            "labels": list(cfg.get("label_names") or []), "label_set": meta.label_set,
            # on the scale of the probabilities the predictor reports (mapped by the temperatures, if any)
            "thresholds": meta.calibrated_thresholds(),
            "source": self.entries[name].hub if folder.parent != weights_dir() else f"weights/{folder.name}",
        }
        if (ens := meta.ensemble) is not None:  # no weights of its own: its members' (their cards say which)
            card.update(arch=f"ensemble: {ens.combine} of {', '.join(ens.members)}", img_size=ens.img_size,
                        source=" + ".join(ens.members), ensemble=ens.to_dict())
        for key in ("sources", "n_images", "split", "epoch", "threshold_rule", "pretrained", "val_sources",
                    "initialised_from", "taught_by"):
            if getattr(training, key) not in (None, [], {}):
                card[key] = getattr(training, key)
        if training.val_mean_auroc is not None:
            card["val_mean_auroc"] = training.val_mean_auroc
            card.update({"val_mean_auroc_ci": training.val_mean_auroc_ci} if training.val_mean_auroc_ci else {})
        card.update({"metrics": summary} if meta.metrics and (summary := _metrics_summary(meta.metrics)) else {})
        if meta.calibration:
            card["calibration"] = {"method": meta.calibration.method, "temperatures": meta.temperatures,
                                   "fitted_on": meta.calibration.fitted_on, "n_films": meta.calibration.n_films,
                                   "reference": meta.reference, "n_shifts": len(meta.shifts)}
        elif ens is not None:  # what calibrates an ensemble's probabilities: each member's own calibration
            cards = [] if self.missing_members(name) else [self.card(m) for m in ens.members]
            card.update({"calibration": cal} if (cal := _members_calibration(cards, ens.combine)) else {})
        return card


_WARNED: set[str] = set()


def _warn_unpinned(ref: str, local: str) -> None:
    """One log line per reference and process: an unpinned Hub reference is never followed."""
    if ref not in _WARNED:
        _WARNED.add(ref)
        log.warning("models.yaml: %s is not pinned to a commit (write hf-hub:org/name@<commit>, as `chestxray "
                    "publish` prints it): not following it; using shipped weights/%s", ref, local)


def _members_calibration(cards: list[dict[str, Any]], combine: str) -> dict[str, Any] | None:
    """An ensemble card's ``calibration``: its members' temperatures (one list per label) and their common
    reference population; None unless every member is calibrated."""
    cals = [c.get("calibration") for c in cards]
    if not cals or not all(cals):
        return None
    refs = {c.get("reference") for c in cals}
    labels = list(dict.fromkeys(k for c in cals for k in c["temperatures"]))
    return {"method": f"each member's own, then the {combine}", "fitted_on": "each member's validation split",
            "temperatures": {k: [c["temperatures"].get(k) for c in cals] for k in labels}, "n_films": None,
            "reference": refs.pop() if len(refs) == 1 else None, "n_shifts": min(c.get("n_shifts", 0) for c in cals)}


def _metrics_summary(m: ReleaseMetrics) -> dict[str, Any]:
    """``{title: {mean_auroc, mean_auroc_ci?, n_images?}}``, one entry per test group with a mean AUROC:
    the headline group (NIH's label-balanced films) first, the mixed NIH set second."""
    out: dict[str, Any] = {}
    for g in m.groups():
        title = m.split if g == ALL else f"{m.split}, {GROUP_NAMES.get(g, g)}"
        out[title] = {"mean_auroc": m.mean_auroc[g]}
        out[title].update({"mean_auroc_ci": ci} if (ci := m.ci(g)) else {})
        out[title].update({"n_images": m.n_test_images[g]} if is_num(m.n_test_images.get(g)) else {})
    return out

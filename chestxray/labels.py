"""Label sets: named, ordered lists of findings that travel with each checkpoint.

A label set is data, not code: the checkpoint's ``config.json`` stores the label names, and the
names below are only the sets a user can ask for by name when training. (The data sources and how
each annotates these labels: :mod:`chestxray.sources`.)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

NO_FINDING = "No Finding"
#: No source here has cancer labels: this label is NIH's Mass or Nodule, and its name says so, so
#: that the app's bars and the model card never present it as a cancer diagnosis.
LUNG_CANCER_PROXY = "Lung Cancer (proxy: Mass/Nodule)"

#: The 14 findings of NIH ChestX-ray14, in the order of the CheXNet paper.
NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "nih14": NIH14 + (NO_FINDING,),
    "nih14-findings": NIH14,
    "nih14-tb": NIH14 + ("Tuberculosis", NO_FINDING),
    "tuberculosis": ("Tuberculosis",),
    "covid": ("COVID-19", "Pneumonia", NO_FINDING),
    "lung-opacity": ("Lung Opacity",),
    # The labels of the classifier this project started from, each trained from the data we have
    # (issue 10; how each source annotates them: chestxray/sources.py).
    "six": ("Pneumonia", "Tuberculosis", "COVID-19", "Lung Opacity", LUNG_CANCER_PROXY, NO_FINDING),
}

#: Labels defined as "any of these findings" in a source's findings list (a film with Mass or
#: Nodule is a proxy positive; a film whose findings name neither is a proxy negative).
PROXIES: dict[str, tuple[str, ...]] = {LUNG_CANCER_PROXY: ("Mass", "Nodule")}

# Spellings seen in public label files, mapped to the names used here.
ALIASES: dict[str, str] = {
    "pleural thickening": "Pleural_Thickening",
    "no findings": NO_FINDING,
    "normal": NO_FINDING,
    "tb": "Tuberculosis",
    "covid19": "COVID-19",
    "covid-19": "COVID-19",
}


def canonical(name: str) -> str:
    """Returns the canonical spelling of one label name (case and known aliases folded)."""
    key = name.strip()
    alias = ALIASES.get(key.lower())
    if alias:
        return alias
    for known in {n for s in LABEL_SETS.values() for n in s}:
        if known.lower() == key.lower():
            return known
    return key


def get_label_set(spec: str | Sequence[str]) -> list[str]:
    """Resolves a label set by name (``"nih14"``), comma list (``"Effusion,Edema"``) or sequence.

    Raises:
        ValueError: unknown set name, empty or duplicated labels.
    """
    if isinstance(spec, str):
        if spec in LABEL_SETS:
            labels = list(LABEL_SETS[spec])
        elif "," in spec or spec.strip():
            labels = [canonical(s) for s in spec.split(",") if s.strip()]
            if len(labels) == 1 and labels[0] not in {n for s in LABEL_SETS.values() for n in s}:
                raise ValueError(f"unknown label set {spec!r}; known sets: {', '.join(LABEL_SETS)}"
                                 " (or give a comma-separated list of labels)")
        else:
            labels = []
    else:
        labels = [canonical(s) for s in spec]
    if not labels:
        raise ValueError("a label set needs at least one label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels in label set: {labels}")
    return labels


def parse_findings(text: str, sep: str = "|") -> set[str]:
    """Parses NIH's pipe-joined ``Finding Labels`` field into canonical names (empty -> empty set)."""
    if text is None:
        return set()
    return {canonical(t) for t in str(text).split(sep) if t.strip() and str(t).strip().lower() != "nan"}


def name_set(labels: Iterable[str]) -> str | None:
    """Returns the registered name of a label list, or None when it is a custom set."""
    labels = tuple(labels)
    for name, members in LABEL_SETS.items():
        if members == labels:
            return name
    return None

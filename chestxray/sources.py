"""The shared data sources: one table of every fact about each (where it lies, how to read it, what it
is a sample of, its plain name), the cohorts inside them, and the public collections they come from.

Everything that names a source reads it from here: the manifest reader (:mod:`chestxray.data`), the
command lines' help, the evaluation groups, the model card's datasets, licences and citations, and
which groups a release reports first. Adding a source is one :data:`SOURCES` entry. Nothing here
imports torch or pandas, so ``--help`` can list the sources at once.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chestxray.labels import NO_FINDING


@dataclass(frozen=True)
class Collection:
    """A public collection that sources are samples of (one hospital or study)."""

    title: str
    terms: str  # the terms of its images (from the data's README)
    citation: str
    hub_id: str | None = None  # a public Hub copy of the same collection (the card's ``datasets``)


@dataclass(frozen=True)
class Source:
    """One shared-data source: a label file and its image folder under the data root."""

    csv: str  # label file, relative to the data root
    images: str  # folder the label file's image names are relative to
    collection: str  # key of :data:`COLLECTIONS`
    title: str  # plain name for cards, tables and the app
    #: Labels it annotates (``None``: every label it can answer); the others are unknown, masked.
    annotated: tuple[str, ...] | None = None
    #: Patient namespace; sources that share patients (NIH's folders) share it, so a split keeps them together.
    patient_prefix: str | None = None
    #: ``{label: column}`` for labels read from a column of their own (another reader's diagnosis).
    diagnosis_cols: dict[str, str] = field(default_factory=dict)
    #: The source whose films this one repeats (another size of the same films): left out wherever every
    #: film should count once (e.g. the gate's default sample).
    repeats: str | None = None

    def reader_options(self, name: str, root: str | os.PathLike) -> dict:
        """Keyword arguments of :func:`chestxray.data.read_manifest` (without ``labels``)."""
        return dict(csv_path=str(Path(root) / self.csv), images_dir=str(Path(root) / self.images), source=name,
                    annotated=None if self.annotated is None else list(self.annotated),
                    patient_prefix=self.patient_prefix or name, diagnosis_cols=dict(self.diagnosis_cols))


COLLECTIONS: dict[str, Collection] = {
    "nih": Collection("NIH ChestX-ray14",
                      "unrestricted use; cite Wang et al., CVPR 2017, and acknowledge the NIH Clinical Center",
                      "NIH ChestX-ray14: Wang et al., ChestX-ray8, CVPR 2017; images courtesy of the NIH Clinical "
                      "Center.", hub_id="alkzar90/NIH-Chest-X-ray-dataset"),
    "kermany": Collection("Kermany et al. pediatric chest X-rays (Cell 2018)", "CC BY 4.0",
                          "Kermany et al., Cell 2018 (CC BY 4.0).", hub_id="hf-vision/chest-xray-pneumonia"),
    "covid": Collection("COVID-19 image data collection (Cohen et al., 2020)",
                        "a licence per image (its `license` column); many are non-commercial",
                        "COVID-19 image data collection, Cohen et al. 2020 (per-image licences)."),
    "tbx11k": Collection("TBX11K (Liu et al., CVPR 2020)", "CC BY 4.0", "TBX11K: Liu et al., CVPR 2020 (CC BY 4.0)."),
    "covid_cxnet": Collection("COVID-CXNet collection (Haghanifar et al., 2022)", "CC BY 4.0",
                              "COVID-CXNet: Haghanifar et al., Multimedia Tools and Applications 2022 (CC BY 4.0)."),
}

#: NIH annotates every label it can answer from its findings: its 14 findings, No Finding, the
#: Mass/Nodule proxy, and "no" to COVID-19 (films of 1992-2015, before the pandemic) and to
#: Tuberculosis (not among its findings; the nih14-tb convention). Lung Opacity is the RSNA
#: radiologists' reading in ``rsna_class``: unknown where RSNA did not read the film.
_NIH = dict(collection="nih", patient_prefix="nih", diagnosis_cols={"Lung Opacity": "rsna_class"})

SOURCES: dict[str, Source] = {
    "nih384": Source("nih/images_384/labels.csv", "nih/images_384", title="NIH, all 384-px test films (mixed)", **_NIH),
    "nih64": Source("nih/images_64/labels.csv", "nih/images_64", title="NIH, 64-px films", **_NIH),
    "nih_full_res": Source("nih/full_res/labels.csv", "nih/full_res", title="NIH, full-resolution films",
                           repeats="nih384", **_NIH),
    "kermany": Source("kermany/labels.csv", "kermany", "kermany", "Kermany pediatric (children)",
                      annotated=("Pneumonia", NO_FINDING)),
    # COVID-19 comes from the collection's own diagnosis column: its other pneumonias (SARS,
    # bacterial, ...) and its few normal films are COVID-19 negatives.
    "covid": Source("covid/labels.csv", "covid/images", "covid", "COVID-19 image collection",
                    annotated=("Pneumonia", NO_FINDING), diagnosis_cols={"COVID-19": "original_finding"}),
    # COVID-CXNet (adult films from web sources): every film is of a COVID-19 patient, read as pneumonia
    # or, for 35, as normal. A patient ID for about half; the rest are one film one patient.
    "covid_cxnet": Source("covid_cxnet/labels.csv", "covid_cxnet/images", "covid_cxnet", "COVID-CXNet collection",
                          annotated=("Pneumonia", NO_FINDING), diagnosis_cols={"COVID-19": "source_label"}),
    # TBX11K has no patient column: one image is taken as one patient (noted in the manifest).
    # Only its tuberculosis films are here (active and latent alike are Tuberculosis positives).
    "tbx11k": Source("tbx11k/labels.csv", "tbx11k/images", "tbx11k", "TBX11K tuberculosis",
                     annotated=("Tuberculosis",)),
}

#: Samples within a source (its label file's ``source`` column), reported as groups of their own:
#: ``{cohort: (collection, plain name)}``.
COHORTS: dict[str, tuple[str, str]] = {
    "reproduce_chexnet": ("nih", "NIH, label-balanced films (reproduce_chexnet sample)"),
    "darkcovidnet": ("nih", "NIH, No Finding / Pneumonia sample (darkcovidnet)"),
}

#: The headline test group: NIH's label-balanced films (every finding has positives, and abnormal
#: films among its negatives): the fair test of the 14 findings, always reported as a group of its own.
HEADLINE_GROUP = "reproduce_chexnet"
#: Shown beside it: all NIH test films at 384 px, mostly No Finding / Pneumonia, so a model that only
#: tells normal from abnormal scores high there.
MIXED_GROUP = "nih384"

#: Plain names of the evaluation groups (sources and cohorts) for cards, tables and the app.
GROUP_NAMES: dict[str, str] = {**{c: t for c, (_, t) in COHORTS.items()}, **{n: s.title for n, s in SOURCES.items()}}


def collection_of(group: str) -> str | None:
    """The collection (key of :data:`COLLECTIONS`) a source or cohort samples, else None."""
    if group in SOURCES:
        return SOURCES[group].collection
    return COHORTS[group][0] if group in COHORTS else None


def collections(groups: Iterable[str]) -> list[str]:
    """The collections that ``groups`` sample, in the order of :data:`COLLECTIONS`."""
    seen = {collection_of(g) for g in groups}
    return [c for c in COLLECTIONS if c in seen]


def source_names(include_repeats: bool = True) -> list[str]:
    """Every source's name; without the sources that repeat another's films when ``include_repeats`` is off."""
    return [n for n, s in SOURCES.items() if include_repeats or s.repeats is None]

"""Model cards: the README.md of a checkpoint folder, with Hub metadata (model-index) and honest limits.

The front matter is built with huggingface_hub's ``ModelCardData`` / ``EvalResult`` and the card
is parsed back by ``ModelCard`` before it is written, so a card that the Hub would refuse is never
saved.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from chestxray.card_calibration import _fmt, calibration_section, reference_lines, temperature_lines  # noqa: F401
from chestxray.ckpt_config import CkptMeta, Training
from chestxray.labels import PROXIES
from chestxray.sources import COLLECTIONS, GROUP_NAMES, collection_of, collections

DISCLAIMER = ("Research and education only. Not a medical device; not for diagnosis, triage or any "
              "clinical decision.")
CHEXNET = "CheXNet (Rajpurkar et al., 2017): 0.841 mean AUROC over 14 findings, DenseNet-121 at 224 px on 98k NIH images"
TASK = "Multi-label chest X-ray classification"
TAGS = ["image-classification", "timm", "chest-x-ray", "medical-imaging", "multi-label"]

RSNA_TERMS = ("RSNA pneumonia-challenge readings of NIH films (Shih et al., 2019), the source of the Lung Opacity "
              "label: research, non-commercial")


def _ci(ci: list | None) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" ({ci[0]:.3f}-{ci[1]:.3f})"


def eval_results(metrics: dict[str, Any], headline_group: str, mixed_group: str | None = None,
                 folds: int = 0) -> list[EvalResult]:
    """Hub eval results on the test split (``folds``: out of fold, k-fold cross-validation): mean AUROC on the
    headline and mixed groups, then per-label AUROC on the headline group. Groups whose collection has no Hub
    dataset id are left out (``model-index`` needs one)."""
    where, split = ((f"out of fold, {folds}-fold patient-wise cross-validation", "cross-validation") if folds
                    else ("held-out test patients", "test"))
    groups = metrics.get("by_group", {})
    means, per_label = [], []
    for g in dict.fromkeys(x for x in (headline_group, mixed_group) if x):
        m = groups.get(g, metrics if g == headline_group else {})
        coll = COLLECTIONS.get(collection_of(g) or "")
        hub_id, title = (coll.hub_id, coll.title) if coll else (None, "")
        if hub_id is None or m.get("mean_auroc") is None:
            continue

        def result(name: str, value: float, hub_id: str = hub_id, title: str = title) -> EvalResult:
            return EvalResult(task_type="image-classification", task_name=TASK, dataset_type=hub_id,
                              dataset_name=f"{title}, {where}", dataset_split=split,
                              metric_type="roc_auc", metric_name=name, metric_value=round(float(value), 4))

        n = f", {m['n_images']} films" if m.get("n_images") else ""
        means.append(result(f"mean AUROC, {GROUP_NAMES.get(g, g)}{n}", m["mean_auroc"]))
        if g == headline_group:
            per_label = [result(f"AUROC {label} ({g})", lm["auroc"]) for label, lm in m.get("labels", {}).items()
                         if lm.get("auroc") is not None]
    return means + per_label


def card_data(name: str, meta: CkptMeta, metrics: dict[str, Any], headline_group: str,
              mixed_group: str | None = None, folds: int = 0) -> ModelCardData:
    """The card's front matter: licence, training datasets (Hub ids), metric ids and ``model-index``."""
    sources = (meta.training or Training()).sources or list(metrics.get("sources", []))
    datasets = [hub for c in collections(sources) if (hub := COLLECTIONS[c].hub_id)]
    results = eval_results(metrics, headline_group, mixed_group, folds)
    return ModelCardData(model_name=name, library_name="timm", license="apache-2.0",
                         pipeline_tag="image-classification", tags=TAGS, datasets=datasets or None,
                         metrics=["roc_auc"], eval_results=results or None)


def usage_snippet(ref: str) -> str:
    """Six lines of plain timm (no toolkit code): gray film, the config's resize and mean/std, sigmoid, labels."""
    return "\n".join([
        "import timm, torch",
        "from PIL import Image",
        f'model = timm.create_model("{ref}", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))  # size, mean/std",
        'x = transform(Image.open("chest.png").convert("L")).unsqueeze(0)  # gray: the model has one input channel',
        'probs = dict(zip(model.pretrained_cfg["label_names"], torch.sigmoid(model(x))[0].tolist()))',
    ])


def licence_lines(config: dict[str, Any], meta: CkptMeta, metrics: dict[str, Any]) -> list[str]:
    """Card lines: the weights' licence and the terms of each training collection's images."""
    sources = (meta.training or Training()).sources or list(metrics.get("sources", []))
    terms = [f"- {COLLECTIONS[c].title}: {COLLECTIONS[c].terms}." for c in collections(sources)]
    if "Lung Opacity" in config.get("label_names", []):
        terms.append(f"- {RSNA_TERMS}.")
    return ["The weights and code are released under Apache-2.0. The training images are not distributed with "
            "them; each collection keeps its own terms, which may bind uses of models trained on it (check them "
            "before any commercial use):", "", *terms]


def label_table(metrics: dict[str, Any]) -> str:
    """Markdown table: per-label AUROC (CI), threshold, sensitivity, specificity, F1, support."""
    rows = ["| label | AUROC (95% CI) | threshold | sensitivity | specificity | F1 | positives / negatives |",
            "|---|---|---|---|---|---|---|"]
    for label, m in metrics["labels"].items():
        rows.append(f"| {label} | {_fmt(m.get('auroc'))}{_ci(m.get('auroc_ci'))} | {_fmt(m.get('threshold'))} | "
                    f"{_fmt(m.get('recall'))} | {_fmt(m.get('specificity'))} | {_fmt(m.get('f1'))} | "
                    f"{m.get('support_pos', 0)} / {m.get('support_neg', 0)} |")
    return "\n".join(rows)


def _evaluated_sources(metrics: dict[str, Any]) -> list[str]:
    groups = metrics.get("by_group", {})
    return [s for s in metrics.get("sources", []) if s in groups]


def _support(metrics: dict[str, Any], source: str, label: str) -> tuple[int, int]:
    m = metrics["by_group"][source]["labels"].get(label, {})
    return int(m.get("support_pos") or 0), int(m.get("support_neg") or 0)


def confounded_labels(metrics: dict[str, Any]) -> dict[str, list[str]]:
    """Labels confounded with their source, read off the evaluated data: ``{label: its positive sources}``.

    A label is confounded when all of its positives come from one site (sources that share
    patients, e.g. NIH's two folders, are one site: ``metrics["sites"]``) while some of its
    negatives come from other sites: its cross-source AUROC then rewards recognising the hospital
    as much as the finding.
    """
    sites = metrics.get("sites", {})
    out = {}
    for label in metrics.get("labels", {}):
        pos, neg = {}, set()
        for s in _evaluated_sources(metrics):
            n_pos, n_neg = _support(metrics, s, label)
            if n_pos:
                pos.setdefault(sites.get(s, s), []).append(s)
            if n_neg:
                neg.add(sites.get(s, s))
        if len(pos) == 1 and neg - set(pos):
            out[label] = next(iter(pos.values()))
    return out


def _auroc_cell(m: dict[str, Any]) -> str:
    return f"{_fmt(m.get('auroc'))}{_ci(m.get('auroc_ci'))}; {m.get('support_pos', 0)} / {m.get('support_neg', 0)}"


def within_source_table(metrics: dict[str, Any]) -> str:
    """Markdown: per label, the AUROC across all sources beside the AUROC within each source that has
    both positives and negatives (CI; positives / negatives)."""
    sources = _evaluated_sources(metrics)
    confounded = confounded_labels(metrics)
    rows = ["| label | all sources | " + " | ".join(sources) + " |", "|---" * (len(sources) + 2) + "|"]
    for label, m in metrics["labels"].items():
        cells = [_auroc_cell(m)]
        for s in sources:
            n_pos, n_neg = _support(metrics, s, label)
            cells.append(_auroc_cell(metrics["by_group"][s]["labels"][label]) if n_pos and n_neg
                         else f"positives only ({n_pos})" if n_pos else f"negatives only ({n_neg})" if n_neg
                         else "not annotated")
        name = f"{label} (confounded)" if label in confounded else label
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def confounding_statement(metrics: dict[str, Any]) -> str:
    """Plain sentences on each confounded label (:func:`confounded_labels`); empty when there is none."""
    confounded = confounded_labels(metrics)
    if not confounded:
        return ""
    lines = ["Confounded with their source: every positive of these labels comes from one source (one "
             "hospital), while negatives come from other hospitals too, so a model can score well by "
             "recognising where a film comes from instead of the finding."]
    for label, sources in confounded.items():
        where = ", ".join(GROUP_NAMES.get(s, s) for s in sources)
        others = "; ".join(GROUP_NAMES.get(s, s) for s in _evaluated_sources(metrics)
                           if s not in sources and _support(metrics, s, label)[1])
        auc = _fmt(metrics["labels"][label].get("auroc"))
        within = [(s, metrics["by_group"][s]["labels"][label]) for s in sources if all(_support(metrics, s, label))]
        if within:
            figures = "; ".join(f"{_fmt(g.get('auroc'))}{_ci(g.get('auroc_ci'))} within {GROUP_NAMES.get(s, s)} "
                                f"({g['support_pos']} positives / {g['support_neg']} negatives)" for s, g in within)
            lines.append(f"- **{label}**: positives only from {where}; negatives also from {others}. "
                         f"Across sources its AUROC is {auc}; "
                         f"the fairer figure is the one within that source: {figures}.")
        else:
            lines.append(f"- **{label}**: positives only from {where}; negatives only from {others}: no film "
                         f"of that source is a {label} negative here (its films without {label} are not in this "
                         f"data). So the {label} AUROC ({auc}) measures telling {where} films from other "
                         f"hospitals' films, not {label} from its absence within one hospital; no within-source "
                         "figure exists.")
    return "\n".join(lines)


def partial_labels_line(metrics: dict[str, Any]) -> str:
    """Card line: which labels each evaluated source annotates, where it annotates only some."""
    labels = list(metrics.get("labels", {}))
    parts = []
    for s in _evaluated_sources(metrics):
        known = [k for k in labels if sum(_support(metrics, s, k))]
        if len(known) < len(labels):
            parts.append(f"{GROUP_NAMES.get(s, s)} only {', '.join(known) or 'none'}")
    return ("- Partial labels: " + "; ".join(parts) + ". A source's other labels are unknown and masked out "
            "of the loss, never read as negative.") if parts else ""


def split_counts(folder: Path) -> dict[str, int]:
    """Images per split in the folder's ``splits.csv`` (empty when there is none)."""
    path = folder / "splits.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return dict(Counter(row["split"] for row in csv.DictReader(f)))


def provenance(config: dict[str, Any]) -> list[str]:
    """Card lines: what initialised the model, what taught it, input size and Grad-CAM grid."""
    train = CkptMeta.from_config(config).training or Training()
    size = int(config["pretrained_cfg"]["input_size"][-1])
    init = train.initialised_from or ("ImageNet" if train.pretrained else "random (from scratch)")
    return [f"- Initialised from: {init}.",
            f"- Taught by: {train.taught_by or 'the labels'}.",
            f"- Input: {size} x {size} px, gray, the whole film resized (no crop); Grad-CAM grid "
            f"{size // 32} x {size // 32} cells (the last feature map, stride 32).",
            *([f"- Trained on: {train.trained_on}."] if train.trained_on else [])]


def write_model_card(folder: str | Path, *, name: str, config: dict[str, Any], metrics: dict[str, Any],
                     headline_group: str, mixed_group: str | None = None,
                     extra_sections: dict[str, str] | None = None, repo_id: str | None = None,
                     splits: dict[str, int] | None = None, cv: dict[str, Any] | None = None) -> Path:
    """Writes ``README.md`` in a checkpoint folder (``splits``: images per split, else the folder's
    ``splits.csv``).

    Args:
        folder: the checkpoint folder (plots referenced relatively must already be there).
        name: model name.
        config: the folder's config.json (label names, ``chestxray`` block with training facts).
        metrics: evaluate output on the held-out test split (with ``by_group`` per source).
        headline_group: the group whose mean AUROC is the headline (NIH's balanced films).
        mixed_group: the group shown beside it (all NIH test films), with why the two differ.
        extra_sections: more Markdown sections, title -> body.
        repo_id: Hub repo id, for the usage snippet.
        cv: all-data weights of a cross-validated recipe: ``{"folds": k, "command": ...}``; ``metrics`` are then
            the pooled out-of-fold predictions of the recipe's folds (``chestxray cv``), the estimate for these
            weights, which trained on every one of those films.
    """
    folder = Path(folder)
    meta = CkptMeta.from_config(config)
    train = meta.training or Training()
    scaling = metrics.get("temperature_scaling") if meta.calibration else None
    groups = metrics.get("by_group", {})
    head = groups.get(headline_group, metrics)
    ref = f"hf-hub:{repo_id}" if repo_id else f"local-dir:/path/to/{name}"
    per_source = ["| group | images | mean AUROC (95% CI) | labels with an AUROC | Pneumonia AUROC "
                  "| findings flagged per normal film |", "|---|---|---|---|---|---|"]
    order = sorted(groups, key=lambda g: (g != headline_group, g != mixed_group, g))
    for g in order:
        m = groups[g]
        n_def = len(m["labels"]) - len(m.get("undefined_labels", []))
        flags = m.get("flags_per_normal_film")
        per_source.append(f"| {GROUP_NAMES.get(g, g)} | {m['n_images']} | {_fmt(m.get('mean_auroc'))}"
                          f"{_ci(m.get('mean_auroc_ci'))} | {n_def} | "
                          f"{_fmt(m['labels'].get('Pneumonia', {}).get('auroc'))} | {_fmt(flags, 2)} |")
    n = train.n_images  # what the trainer used: its validation set is the selection films only
    split = splits or split_counts(Path(folder)) or n
    mixed = groups.get(mixed_group or "", {})
    size = config["pretrained_cfg"]["input_size"][-1]
    seen = [*train.sources, *metrics.get("sources", [])]  # the sources it was trained or tested on
    sites = [COLLECTIONS[c].title for c in collections(seen)]
    pretrained = bool(train.pretrained) and "ImageNet" in (train.initialised_from or "ImageNet")
    folds = int((cv or {}).get("folds") or 0)
    held = "out-of-fold" if folds else "test"
    where = "out of fold" if folds else "test split"
    group_name = GROUP_NAMES.get(headline_group, headline_group)
    if folds:
        results = [
            f"## Cross-validated results ({folds}-fold, out of fold)", "",
            f"Headline: **mean AUROC {_fmt(head.get('mean_auroc'))}{_ci(head.get('mean_auroc_ci'))}** on the "
            f"{head.get('n_images')} films of {group_name}, each predicted by the model of the fold that held its "
            f"patient out: {folds}-fold patient-wise cross-validation of this recipe, a fixed schedule, nothing "
            "chosen on the held-out films (95% bootstrap CI, "
            f"{metrics.get('bootstrap', {}).get('n_boot', '?')} resamples). **These weights were trained on every "
            "labelled film of the shared data with the same recipe, so no shared film can test them**: the "
            "cross-validated figures are the estimate of what they score on new films of the same kind (each fold "
            f"model saw {folds - 1}/{folds} of the films these weights saw)."]
    else:
        results = [
            "## Results on held-out patients", "",
            f"Headline: **mean AUROC {_fmt(head.get('mean_auroc'))}{_ci(head.get('mean_auroc_ci'))}** on the "
            f"{head.get('n_images')} test films of {group_name} (patients never "
            f"seen in training or validation; 95% bootstrap CI, {metrics.get('bootstrap', {}).get('n_boot', '?')} "
            "resamples)."]
    thresholds_on = (f"thresholds chosen on these out-of-fold films by the {train.threshold_rule or 'youden'} rule, "
                     "so the figures at the threshold are in-sample" if folds else
                     f"thresholds chosen on validation by the {train.threshold_rule or 'youden'} rule")
    if folds:
        data_lines = [
            f"- Sources: {', '.join(train.sources)}; trained on every labelled film ({split.get('train', '?')} "
            "images after the source caps; `splits.csv` lists them): no validation or test split.",
            f"- A fixed schedule of {train.epoch} epochs (the final epoch is the model); thresholds, temperatures "
            f"and prior shifts fitted on the out-of-fold predictions of the recipe's {folds}-fold cross-validation "
            f"(patient-wise, seed {train.seed}; balanced films for the thresholds: "
            f"{', '.join(train.val_sources) if isinstance(train.val_sources, list) else 'all sources'})."]
    else:
        data_lines = [
            f"- Sources: {', '.join(train.sources)} (see `splits.csv` for every image's split).",
            f"- Split by patient (seed {train.seed}): {split.get('train', '?')} train / {split.get('val', '?')} val / "
            f"{split.get('test', '?')} test images; no patient is in two splits.",
            f"- Epoch and thresholds selected on the {n.get('val', '?')} validation images of: "
            f"{', '.join(train.val_sources) if isinstance(train.val_sources, list) else 'all sources'}; "
            f"best epoch {train.epoch} (validation mean AUROC {train.val_mean_auroc})."]
    lines = [
        f"# {name}: multi-label chest X-ray classifier ({config.get('architecture')})", "",
        f"> **{DISCLAIMER}**", "",
        f"A timm `{config.get('architecture')}` with one sigmoid output per label "
        f"({len(config.get('label_names', []))} labels: {', '.join(config.get('label_names', []))}).", "",
        *provenance(config), "",
        *results,
        *([f"On all {mixed.get('n_images')} NIH {held} films ({mixed_group}) it is "
           f"{_fmt(mixed.get('mean_auroc'))}{_ci(mixed.get('mean_auroc_ci'))}. The two differ in case mix: most "
           "of the mixed films are No Finding / Pneumonia, so for most findings the negatives there are normal "
           "films and a model that only tells normal from abnormal scores high; on the balanced films every "
           "finding's negatives are mostly other abnormal films."]
          if mixed and mixed_group != headline_group else []), "",
        f"For scale: {CHEXNET}. These weights saw {n.get('train', '?')} training images"
        + (f", ~{round(98_000 / n['train'])}x fewer" if isinstance(n.get("train"), int) and n["train"] else "")
        + " (most of them without NIH finding labels): expect them to be far weaker.", "",
        f"### Per group ({where})", "", *per_source, "",
        f"*Findings flagged per normal film*: on {held} films labelled No Finding, the mean number of the other "
        "labels at or above their operating threshold (each one a false alarm).", "",
        *([f"### Per-label AUROC within each source ({where})", "",
           f"AUROC (95% CI); positives / negatives. *All sources* pools every {held} film; a source's column "
           "has a figure only where that source has both positives and negatives of the label.", "",
           within_source_table(metrics), "", confounding_statement(metrics), ""]
          if confounded_labels(metrics) else []),
        f"### Per label ({headline_group}, {where}; {thresholds_on}"
        + ("; shown on the temperature-calibrated scale, which flags the same films" if scaling else "") + ")",
        "", label_table(head), "",
        "![ROC curves](roc.png)", "", "![Confusion matrices](confusion.png)", "",
        "![Training curves](training_curves.png)", "",
        *calibration_section(head, GROUP_NAMES.get(headline_group, headline_group),
                             plot=(folder / "reliability.png").is_file(), scaling=scaling,
                             calibration=meta.calibration, reference=metrics.get("reference_scale"),
                             groups=[(g, GROUP_NAMES.get(g, g)) for g in dict.fromkeys(
                                 x for x in (headline_group, mixed_group) if x)] + [("all", f"all {held} films")],
                             held=held),
        "## Training data and split", "",
        *data_lines,
        *([partial] if (partial := partial_labels_line(metrics)) else []), "",
        "## Intended use", "",
        "A demonstration of multi-label chest X-ray classification with explanations, for researchers and "
        "educators. "
        + ("Probabilities are this model's outputs, temperature-calibrated per label on validation films "
           "(see Calibration): closer to observed frequencies on films like these, still not disease risks for "
           "any other population; a label is marked when its probability reaches its operating threshold "
           "(stored in `config.json` on the raw scale and mapped by the same temperature)."
           if scaling else
           "Probabilities are this model's outputs, not calibrated disease risks; a label is marked "
           "when its probability reaches the per-label threshold stored in `config.json`."), "",
        "## Limitations and known failure modes", "",
        "- **Label noise**: NIH labels were mined from reports by NLP; expert audits found many wrong "
        "(Oakden-Rayner, 2017). AUROCs on them are noisy in both directions.",
        *([f"- **Site confounding**: the films come from {len(sites)} collections ({'; '.join(sites)}), each "
           "from other hospitals, and most sources annotate only a few labels; a model can learn the source "
           "instead of the disease. A source's own AUROCs (often high) say little about the others' films."]
          if len(sites) > 1 else []),
        f"- **Small training set**: a few thousand images at {size} px"
        f"{'' if pretrained else ', from scratch'}. Small findings (Nodule, Mass, Pneumothorax) are near chance; "
        "treat every output as illustrative.",
        "- Rare labels (Hernia, Pneumothorax, Emphysema...) have few test positives: wide CIs.",
        *(f"- **{label}** is a proxy, not a diagnosis: no source here has such labels, so it is trained and "
          f"scored as {' or '.join(PROXIES[label])} (NIH's report-mined findings). Never read it as a diagnosis."
          for label in config.get("label_names", []) if label in PROXIES),
        "- Grad-CAM maps are min-max scaled per label by default, so a label at p=0.01 still shows a full-range "
        "heatmap: read the map together with its probability, or draw it scaled by the probability (an option "
        "in the app), which makes such a label faint.",
        "- Inputs that are not frontal adult chest radiographs (lateral views, CT, photos) give meaningless "
        "outputs; the toolkit's input gate warns about many of them but not all.", "",
        "## Use", "",
        "With plain timm, no code from this toolkit: an 8-bit PNG or JPEG film read as gray, resized whole to the "
        "input size in `config.json` and normalised with its mean/std, then one sigmoid per label:", "",
        "```python", usage_snippet(ref), "```", "",
        "`probs` maps each label to its probability; each label's operating threshold is in `config.json` "
        "(`chestxray.thresholds`)"
        + (" and applies to these raw probabilities; the calibrated probability of a label is "
           "`sigmoid(logit / T + b)` with its temperature T from `chestxray.calibration.temperatures` and its "
           "prior shift b from `chestxray.calibration.shifts` (0 where absent; the toolkit "
           "applies it, and maps the thresholds to match)" if scaling else "")
        + ". DICOM and 16-bit films need windowing first: this toolkit's reader does it, "
        "and adds the thresholds, Grad-CAM and the input gate:", "",
        "```python", "from chestxray import Predictor",
        f'pred = Predictor.load("{ref.replace("local-dir:", "")}")',
        'probs = pred.predict("chest.dcm")   # {label: probability}', "```", "",
    ]
    for title, body in (extra_sections or {}).items():
        lines += [f"## {title}", "", body.strip(), ""]
    lines += ["## Licence", "", *licence_lines(config, meta, metrics), "",
              "## Citation and data", "", " ".join(COLLECTIONS[c].citation for c in collections(seen)), ""]
    front = card_data(name, meta, metrics, headline_group, mixed_group, folds).to_yaml()
    card = ModelCard(f"---\n{front}\n---\n\n" + "\n".join(lines))  # parsing it back validates the model-index
    path = folder / "README.md"
    card.save(path)
    return path

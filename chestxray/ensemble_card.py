"""The card (``README.md``) of an ensemble folder: what it averages, how its thresholds were chosen, its measured
figures beside each member's on the very same films, its CPU cost per film, and the same honest limits.

Written by :func:`chestxray.ensemble_release.build_ensemble` from the folder's ``config.json`` and the metrics it
measured; the front matter is the Hub's (``ModelCardData``, parsed back before the card is saved).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from chestxray.ckpt_config import CkptMeta, Training
from chestxray.modelcard import CHEXNET, DISCLAIMER, TAGS, eval_results, label_table, licence_lines
from chestxray.sources import COLLECTIONS, GROUP_NAMES, MIXED_GROUP, collections


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _with_ci(m: dict[str, Any] | None) -> str:
    """``0.650 (0.590-0.705, 82)``: mean AUROC, its 95% CI and the films."""
    if not m or m.get("mean_auroc") is None:
        return "n/a"
    ci = m.get("ci") or [None, None]
    inner = f"{ci[0]:.3f}-{ci[1]:.3f}, " if ci[0] is not None else ""
    return f"{m['mean_auroc']:.3f} ({inner}{m['n_images']})"


def comparison_table(compared: dict[str, Any], name: str, headline: str) -> list[str]:
    """One row per model (the ensemble first, bold), every figure on the same test films."""
    rows = ["| model | NIH balanced films: mean AUROC (95% CI, films) | NIH all 384-px test films (mixed) | NIH 64-px "
            "films | pediatric pneumonia AUROC (Kermany) | COVID-19 set pneumonia AUROC | findings flagged per normal "
            "NIH film | CAM max in box (chance) |", "|---|---|---|---|---|---|---|---|"]
    for model, f in compared.items():
        loc = f.get("localization") or {}
        box = (f"{loc['hit_rate']:.0%} of {loc['n_pairs']} ({loc['chance']:.0%})"
               if loc.get("hit_rate") is not None else "n/a")
        means, pneu = f["mean_auroc"], f["pneumonia_auroc"]
        title = f"**{model}**" if model == name else model
        rows.append(f"| {title} | {_with_ci(means.get(headline))} | {_with_ci(means.get(MIXED_GROUP))} | "
                    f"{_with_ci(means.get('nih64'))} | {_f(pneu.get('kermany'))} | {_f(pneu.get('covid'))} | "
                    f"{_f(f.get('flags_per_normal_film'), 1)} | {box} |")
    return rows


def cpu_lines(timing: dict[str, Any], single: str, name: str) -> list[str]:
    """The CPU cost per film, ensemble against its first member (the app's default model)."""
    if not timing or not timing.get("threads"):
        return ["Not measured in this build (`python -m benchmarks.bench_ensemble` measures it)."]
    rows = [f"| torch threads | {single} ms (median / p95) | {name} ms (median / p95) | ratio |", "|---|---|---|---|"]
    for n, t in timing["threads"].items():
        a, b = t[single], t[name]
        rows.append(f"| {n} | {a['median_ms']:.0f} / {a['p95_ms']:.0f} | {b['median_ms']:.0f} / {b['p95_ms']:.0f} | "
                    f"{b['median_ms'] / a['median_ms']:.1f}x |")
    load = timing.get("load_average")
    return [f"`analyze` (every label's probability and Grad-CAM, the input gate) on one decoded {timing['size'][1]} x "
            f"{timing['size'][0]}-px film ({timing['film']}), median of {timing['runs']} runs, the two models "
            "interleaved, on a 2-core machine"
            + (f" shared with other jobs (load average {load[0]:.1f}): the absolute times are those of a process "
               "that got a small share of the cores; read the ratio" if load else "") + ":", "", *rows, "",
            "The ensemble runs every member once (the film is decoded and resized once), so it costs about the sum "
            "of its members; `python -m benchmarks.bench_ensemble` prints each member's share."]


def write_ensemble_card(folder: str | Path, *, name: str, config: dict[str, Any], metrics: dict[str, Any],
                        headline_group: str, sources: list[str], cv: dict[str, Any] | None = None) -> Path:
    """Writes ``README.md`` into the ensemble folder (its plots must already be there).

    Args:
        cv: for an ensemble of cross-validated members (:mod:`chestxray.ensemble_cv`), ``{"folds", "n_films"}``:
            its figures are out of fold and its thresholds were fitted on out-of-fold probabilities.
    """
    folder = Path(folder)
    meta = CkptMeta.from_config(config)
    ens, train = meta.ensemble, meta.training or Training()
    assert ens is not None
    groups = metrics.get("by_group", {})
    head, mixed = groups.get(headline_group, metrics), groups.get(MIXED_GROUP, {})
    compared = metrics.get("members", {})
    chosen = metrics.get("thresholds_chosen_on", {})
    members = ", ".join(f"`{m}`" for m in ens.members)
    per_source = ["| group | images | mean AUROC (95% CI) | Pneumonia AUROC | findings flagged per normal film |",
                  "|---|---|---|---|---|"]
    for g in sorted(groups, key=lambda g: (g != headline_group, g != MIXED_GROUP, g)):
        m = groups[g]
        per_source.append(f"| {GROUP_NAMES.get(g, g)} | {m['n_images']} | {_f(m.get('mean_auroc'))}"
                          f"{_ci(m.get('mean_auroc_ci'))} | {_f(m['labels'].get('Pneumonia', {}).get('auroc'))} | "
                          f"{_f(m.get('flags_per_normal_film'), 2)} |")
    single = ens.members[0]
    val_on = ", ".join(train.val_sources) if isinstance(train.val_sources, list) else "all sources"
    split = "out of fold" if cv else "test split"
    lines = [
        f"# {name}: the mean of {len(ens.members)} chest X-ray models", "",
        f"> **{DISCLAIMER}**", "",
        f"An ensemble with no weights of its own: it runs {members} (each one's own folder, card and weights) on "
        f"the same decoded film and reports, for each of the {len(config['label_names'])} labels, the **{ens.combine}**"
        " (each member's probability is already on the scale of adult NIH films at NIH's prevalence, after its own "
        "temperature and prior shift, so their mean is on that scale too).", "",
        f"- Heatmaps: the {ens.cam} ({_grid(ens)}), so every label's map is the members' maps averaged.",
        f"- Input gate (is this a frontal chest X-ray?): **{ens.gate_member}**'s, on its own features.",
        *(_cv_method(cv, train.threshold_rule, chosen, val_on) if cv else [
            f"- Operating thresholds: chosen by the members' rule ({train.threshold_rule}) on the ensemble's mean "
            f"probabilities of the {chosen.get('n_images', '?')} films that are validation films of every member "
            f"({val_on}: NIH's label-balanced validation films, which chose the members' epochs and thresholds); "
            "never on test films. Stored in `config.json` on the mean's scale (nothing maps them).",
            f"- Validation mean AUROC on those films: {_f(train.val_mean_auroc)}{_ci(train.val_mean_auroc_ci)}.", "",
            "## Results on films no member trained or was selected on", "",
            f"Test films: the {metrics.get('n_images')} films that are test films in every member's `splits.csv` "
            "(the members share one patient split where their films overlap; the students' extra films are left "
            "out)."]),
        f"Headline: **mean AUROC {_f(head.get('mean_auroc'))}{_ci(head.get('mean_auroc_ci'))}** on the "
        f"{head.get('n_images')} {'' if cv else 'test '}films of {GROUP_NAMES.get(headline_group, headline_group)} "
        f"(95% bootstrap CI, {metrics.get('bootstrap', {}).get('n_boot', '?')} resamples)"
        + (f"; on all {mixed['n_images']} NIH 384-px {'' if cv else 'test '}films (mixed) "
           f"{_f(mixed.get('mean_auroc'))}{_ci(mixed.get('mean_auroc_ci'))}" if mixed else "") + ".", "",
        *([f"Each member's test probabilities are the ones its own release wrote (its `predictions.csv`, 5 decimals, "
           "through the same reader and preprocessing); a fresh forward pass of "
           f"{reuse['checked_films']} of the films agreed to {reuse['max_abs_diff']:.1e}.", ""]
          if (reuse := metrics.get("test_probabilities") or {}).get("reused") else []),
        "### Against each member, on the same films", "",
        *comparison_table(compared, name, headline_group), "",
        *(["The members' rows are computed here from their own shipped out-of-fold probabilities of the same films "
           "(5 decimals: an AUROC can differ from its card's in the third decimal; the CIs are resampled here). "
           + _paired_lines(metrics.get("paired_against_members") or {}, headline_group)
           + " The pointing game needs every member's fold weights to draw the ensemble's heatmaps out of fold, and "
           "the record keeps none, so the ensemble has no heatmap figure; the members' column is their own folds' "
           "(each fold model on its held-out boxed films). A paired comparison (`chestxray compare "
           "A/predictions.csv B/predictions.csv --cohort reproduce_chexnet`) says whether a difference is more than "
           "the films' noise.", ""] if cv else
          ["The balanced test set is small: CIs overlapping this much mean the models are not distinguishable on "
           "it. The heatmap column is the pointing game on the boxed NIH films no member trained on (the members' "
           "figures are from their cards: the same boxed films, since NIH films share one split).", ""]),
        f"### Per group ({split})", "", *per_source, "",
        f"### Per label ({headline_group}, {split}; thresholds as above)", "", label_table(head), "",
        f"Calibration on the same films: mean Brier score {_f(head.get('mean_brier'))}, mean ECE "
        f"{_f(head.get('mean_ece'))} ({metrics.get('calibration', {}).get('n_bins', 15)} equal-width bins; see "
        "`reliability.png`).", "",
        "![ROC curves](roc.png)", "", "![Confusion matrices](confusion.png)", "",
        "## CPU cost per film", "", *cpu_lines(metrics.get("cpu_ms_per_film") or {}, single, name), "",
        "## Limitations", "",
        "- Everything each member's card says holds here: NIH's labels were mined from reports by NLP (many are "
        "wrong); the films come from several hospitals, each with its own labels (site confounding); the models are "
        f"small and trained on a few thousand films (for scale: {CHEXNET}).",
        ("- The members are not independent: they learnt from the same films with the same recipe, so their errors "
         "are alike and averaging gains less than it would with independent models." if cv else
         "- The members are not independent: the three students (resnet18, mobilenetv2_100, swin) were distilled "
         "from efficientnet_b0 v2.0 and efficientnet_b2, so their errors are alike and averaging gains less than "
         "it would with independent models."),
        "- Heatmaps show where the models looked, not where disease is; a mean of maps can blur two members' "
        "different regions into one.",
        (f"- The thresholds were fitted on the {chosen.get('n_images', '?')} balanced films' out-of-fold "
         "probabilities, the films the threshold-dependent figures above are reported on (as for the members): "
         "read accuracy, precision, recall and F1 as in-sample; rare labels' thresholds are rough." if cv else
         "- The thresholds were chosen on a few dozen balanced validation films: rare labels' thresholds are rough."),
        "- Inputs that are not frontal adult chest radiographs give meaningless outputs; the gate warns about many.",
        "",
        "## Use", "",
        "```python", "from chestxray.ensemble import load_model",
        f'ens = load_model("{name}")                 # its members, each loaded once',
        "analysis = ens.analyze(\"chest.dcm\")       # mean probabilities, mean Grad-CAMs, the gate's warnings",
        "analysis.positives(), analysis.overlay(\"Effusion\")", "```", "",
        "In the app it is one more entry of the model menu, built from the models the app has already loaded "
        "(no second copy in memory).", "",
        "## Reproduce", "",
        "```bash",
        f"python -m chestxray ensemble {'--cv ' if cv else ''}--name {name} --members {' '.join(ens.members)}"
        + (f" --timing-threads {' '.join(threads)}" if (threads := list((metrics.get("cpu_ms_per_film") or {}).get(
            "threads", {}))) not in ([], ["1"]) else "") + "   # this folder",
        *(["# each member's out-of-fold predictions: chestxray cv --config train/configs/cv/<member>.yaml",
           f"python -m benchmarks.bench_ensemble --ensemble {name}   # the CPU cost per film"] if cv else
          [f"python -m chestxray evaluate --model {name} " + " ".join(f"--source {s}" for s in sources)
           + f" --split test --out eval/{name}   # the same numbers",
           "python -m benchmarks.bench_ensemble   # the CPU cost per film"]), "```", "",
        "## Licence", "", *licence_lines(config, meta, metrics), "",
        "## Citation and data", "", " ".join(COLLECTIONS[c].citation for c in collections(sources)), "",
    ]
    data = ModelCardData(model_name=name, license="apache-2.0", tags=[t for t in TAGS if t != "timm"] + ["ensemble"],
                         datasets=[h for c in collections(sources) if (h := COLLECTIONS[c].hub_id)] or None,
                         metrics=["roc_auc"], eval_results=eval_results(metrics, headline_group, MIXED_GROUP) or None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))  # parsing it back validates the front matter
    path = folder / "README.md"
    card.save(path)
    return path


def _grid(ens: Any) -> str:
    """The members' input sides and the grid their maps are averaged on (stride 32), for the card."""
    sizes = ens.extra.get("input_sizes") or {}
    if ens.img_size or not sizes:
        side = ens.img_size or 224
        return f"{side}-px inputs: a {side // 32} x {side // 32} grid"
    finest = max(sizes.values()) // 32
    return (", ".join(f"{m} {s} px" for m, s in sizes.items())
            + f": each map is brought to the finest grid, {finest} x {finest}, before the mean")


def _paired_lines(paired: dict[str, Any], headline: str) -> str:
    """``Film by film, the ensemble minus lite2: +0.013 (-0.002 to +0.027) ...``: one sentence for the card."""
    parts = []
    for m, groups in paired.items():
        for g, d in groups.items():
            parts.append(f"{d['difference']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}) against {m} on the "
                         f"{d['n_films']} {'balanced' if g == headline else 'mixed NIH 384-px'} films")
    return ("Film by film, the ensemble minus each member (paired bootstrap 95% CI): " + "; ".join(parts) + "."
            if parts else "")


def _cv_method(cv: dict[str, Any], rule: str | None, chosen: dict[str, Any], val_on: str) -> list[str]:
    """How a cross-validated ensemble's thresholds and figures were obtained (out of fold), for its card."""
    return [
        f"- Operating thresholds: fitted by the members' rule ({rule}) on the ensemble's mean out-of-fold "
        f"probabilities of the {chosen.get('n_images', '?')} films the members' own thresholds were fitted on "
        f"({val_on}: NIH's label-balanced films), as `chestxray cv` fits each member's. Stored in `config.json` on "
        "the mean's scale (nothing maps them).", "",
        f"## Cross-validated results ({cv['folds']}-fold, out of fold)", "",
        "Every member is the all-data release of a cross-validated recipe: its weights saw every shared film, so no "
        "shared film can test them, nor this ensemble. The members were cross-validated on the same patient-wise "
        "folds (same fold count, seed, sources and caps; checked when this folder was built), so each of the "
        f"{cv['n_films']} films' out-of-fold probability of every member (its `predictions.csv`) comes from a fold "
        "model that never trained on that patient, and their mean is the out-of-fold probability of the mean of "
        "those fold models: this ensemble, cross-validated."]


def _ci(ci: list | None) -> str:
    return f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci and ci[0] is not None else ""

"""The calibration sections of a model card: temperature scaling, the probability scale and the reliability
figures, measured on the test films (or, for all-data weights, the out-of-fold films)."""
from __future__ import annotations

from typing import Any

from chestxray.calibration import MIN_EACH_CLASS, T_BOUNDS


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _arrow(before: float | None, after: float | None) -> str:
    return f"{_fmt(before)} -> {_fmt(after)}"


def temperature_lines(scaling: dict[str, Any], calibration: Any, groups: list[tuple[str, str]],
                      held: str = "test") -> list[str]:
    """Card lines on temperature scaling: what was fitted where, ECE and Brier before -> after on the ``held``
    films (test, or out-of-fold: then the same films it was fitted on), per group, and a per-label table."""
    fitted = (f" on {calibration.n_films} films of the {calibration.fitted_on}" if calibration is not None
              and calibration.fitted_on else " on validation films")
    temps = scaling.get("temperatures", {})
    rows = [f"| {held} films | images | mean ECE | pooled ECE | mean Brier | pooled Brier |", "|---|---|---|---|---|---|"]
    for key, title in groups:
        g = scaling["all"] if key == "all" else scaling.get("by_group", {}).get(key)
        if not g:
            continue
        b, a = g["before"], g["after"]
        rows.append(f"| {title} | {g['n_images']} | {_arrow(b['mean_ece'], a['mean_ece'])} | "
                    f"{_arrow(b['pooled_ece'], a['pooled_ece'])} | {_arrow(b['mean_brier'], a['mean_brier'])} | "
                    f"{_arrow(b['pooled_brier'], a['pooled_brier'])} |")
    head_key = groups[0][0]
    head = scaling["all"] if head_key == "all" else scaling.get("by_group", {}).get(head_key, scaling["all"])
    per_label = [f"| label | temperature | ECE ({groups[0][1]}) | Brier ({groups[0][1]}) |", "|---|---|---|---|"]
    better = worse = 0
    for label, t in temps.items():
        eb, ea = head["before"]["ece"].get(label), head["after"]["ece"].get(label)
        if eb is not None and ea is not None and eb == eb and ea == ea:
            better += ea < eb
            worse += ea > eb
        per_label.append(f"| {label} | {t:.3f} | {_arrow(eb, ea)} | "
                         f"{_arrow(head['before']['brier'].get(label), head['after']['brier'].get(label))} |")
    at_bound = [k for k, t in temps.items() if t >= T_BOUNDS[1] * 0.999 or t <= T_BOUNDS[0] * 1.001]
    bound_note = (
        [f"At the bound of the fit (T = {T_BOUNDS[1]:g} or {T_BOUNDS[0]:g}): {', '.join(at_bound)}. On the validation "
         "films the log-loss kept falling as these labels' probabilities were pulled towards 0.5: their raw "
         "probabilities sit far from the observed frequencies, and temperature scaling has no offset to move "
         "them. Read these labels' probabilities as uninformative (their ranking, AUROC and flags are unchanged).",
         ""] if at_bound else [])
    return [
        "### Temperature scaling", "",
        f"The probabilities are **temperature-calibrated**: each label's logit is divided by one number T fitted"
        f"{fitted} (minimising the log-loss; stored in `config.json` as `chestxray.calibration.temperatures`), "
        "so a label reads `sigmoid(logit / T)`. T > 1 pulls probabilities towards 0.5, T < 1 pushes them "
        "apart. Dividing by T keeps every label's order of films, so AUROC and AUPRC are unchanged, and each "
        "operating threshold t is mapped to `sigmoid(logit(t) / T)`, so exactly the same films are flagged. "
        f"{len(temps)} labels have a temperature (a label needs at least {MIN_EACH_CLASS} validation positives "
        f"and {MIN_EACH_CLASS} negatives). ECE and Brier score before -> after, on the "
        + ("held-out test films:" if held == "test" else
           f"{held} films (the films the temperatures were fitted on: in-sample, optimistic for the 'after'):"), "",
        *rows, "",
        f"On {groups[0][1]}, {better} of {len(temps)} labels' ECE went down and {worse} went up: one temperature "
        "per label is fitted to the whole validation mix, so it can leave one kind of film worse calibrated "
        "than before (and a label with few validation positives gets a noisy temperature).", "",
        *bound_note,
        "<details><summary>Per label</summary>", "", *per_label, "", "</details>", "",
    ]


def reference_lines(report: dict[str, Any] | None, calibration: Any, held: str = "test") -> list[str]:
    """Card lines on the probability scale: the reference population, each label's prevalence and prior
    shift, and (``report``: evaluate's ``reference_scale`` on the NIH test films) the mean probability on
    normal films and the reweighted ECE before -> after the shift."""
    shifts = calibration.shifts if calibration is not None else {}
    if not shifts:
        return ["### Probability scale", "",
                "The probabilities are on the scale of the training mix (sources and label frequencies of the "
                "training films, positive-class weights in the loss), not on any stated population's. On a normal "
                "adult film a finding can read far above its real frequency: read them as scores, with the "
                "operating thresholds.", ""]
    prev = calibration.prevalence
    lines = ["### Probability scale: " + (calibration.reference or "a reference population"), "",
             f"Each probability refers to **{calibration.reference}**: after its temperature, each label's logit is "
             "shifted by one number b (Bayes' rule for a change of prior: Saerens et al., 2002), fitted on "
             f"{calibration.shift_fitted_on} so that their weighted mean probability equals the reference "
             "prevalence (stored in `config.json` as `chestxray.calibration.shifts` and `prevalence`). A shift moves "
             "every film's logit by the same amount: AUROC, every ranking and the films flagged are unchanged. "
             "**A child's film is read on the same adult scale** (the Pneumonia probability of a child is an adult "
             "NIH-like population's, not a pediatric clinic's)."
             + (f" Not shifted (no reference prevalence): {', '.join(k for k in calibration.temperatures if k not in prev and k not in shifts)}."
                if any(k not in prev for k in calibration.temperatures) else ""), ""]
    if report and report.get("labels"):
        lines += [f"On the {report['n_films']} NIH {held} films: the mean probability on the normal (No Finding) films "
                  f"against the label's prevalence among NIH's adult films, and the ECE with the {held} films "
                  "reweighted to that prevalence, before (temperature only) -> after the shift:", "",
                  "| label | NIH adult prevalence | shift b | mean p, normal films | ECE, reweighted |",
                  "|---|---|---|---|---|"]
        for label, r in report["labels"].items():
            b, a = r["before"], r["after"]
            lines.append(f"| {label} | {_fmt(r['prevalence'], 4)} | {_fmt(r.get('shift'), 2)} | "
                         f"{_arrow(b['mean_prob_normal'], a['mean_prob_normal'])} | "
                         f"{_arrow(b['reweighted_ece'], a['reweighted_ece'])} |")
        m = report["mean_reweighted_ece"]
        lines += ["", f"Mean reweighted ECE {_arrow(m['before'], m['after'])}.", ""]
    return lines


def calibration_section(metrics: dict[str, Any], group: str, plot: bool = False,
                        scaling: dict[str, Any] | None = None, calibration: Any = None,
                        groups: list[tuple[str, str]] | None = None,
                        reference: dict[str, Any] | None = None, held: str = "test") -> list[str]:
    """Card lines on calibration (measured on the ``held`` films: test, or out-of-fold): mean AUPRC, Brier score and ECE, a compact per-label table, and, for a
    temperature-calibrated model (``scaling``: evaluate's ``temperature_scaling``), before/after figures.

    Empty when ``metrics`` predates these numbers (an older metrics.json), so such cards still render.
    """
    if metrics.get("mean_ece") is None and metrics.get("mean_brier") is None:
        return []
    rows = ["| label | AUPRC (chance) | Brier | ECE |", "|---|---|---|---|"]
    for label, m in metrics["labels"].items():
        rows.append(f"| {label} | {_fmt(m.get('auprc'))} ({_fmt(m.get('prevalence'))}) | {_fmt(m.get('brier'))} "
                    f"| {_fmt(m.get('ece'))} |")
    n_bins = metrics.get("calibration", {}).get("n_bins", 15)
    after = " after temperature scaling (below)" if scaling else ""
    return [
        "## Calibration", "",
        f"On the same films ({group}): mean AUPRC **{_fmt(metrics.get('mean_auprc'))}**, mean Brier score "
        f"**{_fmt(metrics.get('mean_brier'))}**, mean expected calibration error (ECE) "
        f"**{_fmt(metrics.get('mean_ece'))}** (all labels pooled: {_fmt(metrics.get('pooled_ece'))}){after}.", "",
        f"*AUPRC* is average precision; its chance level is the label's prevalence (in brackets). *Brier* is the "
        f"mean squared difference between probability and outcome (0 is perfect). *ECE* sorts the probabilities "
        f"into {n_bins} equal-width bins and averages |observed frequency - mean probability| weighted by the "
        "bin's share of films; for a rare label most films sit in the lowest bin, so a small ECE there says "
        "little: read the reliability diagram."
        + ("" if scaling else " The probabilities are not recalibrated."), "",
        *(["![Reliability diagram](reliability.png)", ""] if plot else []),
        "<details><summary>Per label</summary>", "", *rows, "", "</details>", "",
        *(temperature_lines(scaling, calibration, groups or [("all", f"all {held} films")], held) if scaling else []),
        *reference_lines(reference, calibration, held),
    ]

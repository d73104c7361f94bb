"""``chestxray compare``: two shipped models' predictions on their common films, paired (chestxray/compare.py)."""
from __future__ import annotations

import numpy as np
import pytest

from chestxray.ckpt_config import CkptMeta
from chestxray.cli import main
from chestxray.compare import compare_predictions, paired_difference, report_lines
from tests.conftest import REPO

B0, LITE0 = REPO / "weights/efficientnet_b0", REPO / "weights/efficientnet_lite0"


def test_paired_difference_of_a_model_with_itself_and_with_the_truth():
    rng = np.random.default_rng(0)
    Y = (rng.random((60, 3)) < 0.3).astype(float)
    Y[:5, 2] = np.nan  # unknown labels are left out, as evaluation leaves them out
    P = rng.random((60, 3))
    same = paired_difference(Y, P, P, n_boot=50)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["p_b_better"] == 0
    truth = paired_difference(Y, P, np.nan_to_num(Y) + 0.01 * rng.random((60, 3)), n_boot=50)
    assert truth["b"] == pytest.approx(1.0) and truth["a"] < 0.75 and truth["ci"][0] > 0 and truth["p_b_better"] == 1
    with pytest.raises(ValueError, match="equal N x K"):
        paired_difference(Y, P, P[:10])


def test_resamples_without_an_auroc_count_in_neither_the_ci_nor_the_share():
    # one label, 2 negatives among 40 films: many resamples draw no negative and have no AUROC
    rng = np.random.default_rng(1)
    Y = np.ones((40, 1))
    Y[:2] = 0
    PA = rng.random((40, 1))
    PB = PA.copy()
    PB[:2] = -1.0  # B ranks both negatives lowest: better on every resample that has an AUROC
    r = paired_difference(Y, PA, PB, n_boot=200)
    assert 0 < r["n_undefined"] < 200
    assert r["p_b_better"] > 0.9 and r["ci"][0] >= 0
    full = {**r, "n_films": 40, "labels": ["Hernia"], "source": "nih384", "cohort": None, "split_of": None}
    note = report_lines(full, "a.csv", "b.csv", 200)[-1]  # what `chestxray compare` prints last
    assert note.startswith(f"note: {r['n_undefined']} of the 200 resamples") and "left out" in note


def test_shipped_out_of_fold_predictions_against_b0_on_b0s_balanced_test_films(data_dir):
    """The README's comparison: A's figure on these films is b0's own card headline, reproduced."""
    r = compare_predictions(B0 / "predictions.csv", LITE0 / "predictions.csv", data_dir, cohort="reproduce_chexnet",
                            split_of=f"{B0}:test", n_boot=100)
    card = CkptMeta.read(B0).metrics
    assert r["n_films"] == 82 and len(r["labels"]) == 15
    assert r["a"] == pytest.approx(card.mean_auroc[card.headline_group], abs=2e-3)  # probabilities kept to 5 decimals
    assert r["ci"][0] < r["difference"] < r["ci"][1] and 0 <= r["p_b_better"] <= 1


def test_cli_prints_both_and_the_difference_or_one_error_line(data_dir, capsys):
    args = ["compare", str(B0 / "predictions.csv"), str(LITE0 / "predictions.csv"), "--cohort", "reproduce_chexnet",
            "--data-root", str(data_dir), "--n-boot", "20"]
    assert main([*args, "--split-of", f"{B0}:test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("82 common films") and "B - A:" in out and "paired bootstrap 95% CI" in out
    assert main([*args, "--split-of", "test"]) == 2  # no folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FOLDER:SPLIT" in err[0]


def test_a_folds_oof_csv_is_read_by_its_logits(data_dir, tmp_path):
    """oof.csv (chestxray cv) holds the films' labels under the label names and the scores as ``logit:``
    columns, with the image's path under the data root: it must compare as its probabilities would."""
    import pandas as pd

    pred = pd.read_csv(B0 / "predictions.csv")
    labels = [c for c in pred.columns if c not in ("image", "source", "cohort")]
    p = pred[labels].clip(1e-6, 1 - 1e-6)
    oof = pred[["image", "source", "cohort"]].assign(image="nih/images_384/" + pred["image"], fold=0)
    oof = pd.concat([oof, (p > 0.5).astype(float),  # stand-in label columns: ignored, the truth is the data's
                     np.log(p / (1 - p)).add_prefix("logit:")], axis=1)
    oof.to_csv(tmp_path / "oof.csv", index=False)
    kw = dict(cohort="reproduce_chexnet", split_of=f"{B0}:test", n_boot=20)
    by_probs = compare_predictions(B0 / "predictions.csv", LITE0 / "predictions.csv", data_dir, **kw)
    by_logits = compare_predictions(tmp_path / "oof.csv", LITE0 / "predictions.csv", data_dir, **kw)
    assert by_logits["n_films"] == by_probs["n_films"] == 82
    assert by_logits["a"] == pytest.approx(by_probs["a"], abs=1e-3)  # the probabilities were kept to 5 decimals

"""Manifests, patient-wise splits, the image cache, batch augmentation and the masked loss (real data)."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from chestxray.data import (assert_patient_disjoint, batch_augment, build_cache, cohort_patient_split,
                            default_sources, label_counts, load_sources, masked_bce_loss, parse_cohort_fracs,
                            patient_split, pos_weights, read_manifest, repeat_rows, split_from_lists, RawXrayDataset,
                            XrayDataset)
from chestxray.labels import LUNG_CANCER_PROXY, NIH14, NO_FINDING, PROXIES, get_label_set
from chestxray.transforms import resize_gray

LABELS = get_label_set("nih14-tb")
FINDINGS = [x for x in LABELS if x != NO_FINDING]


@pytest.fixture(scope="module")
def sources(data_dir):
    return default_sources(data_dir)


@pytest.fixture(scope="module")
def nih(sources):
    return read_manifest(labels=LABELS, **sources["nih384"])


@pytest.fixture(scope="module")
def nih64(sources):
    return read_manifest(labels=LABELS, **sources["nih64"])


def row(df, name):
    hit = df[df["path"].map(os.path.basename) == name]
    assert len(hit) == 1, name
    return hit.iloc[0]


def test_nih_manifest(nih):
    assert list(nih.columns[:5]) == ["path", "patient", "source", "cohort", "view"]
    assert list(nih.columns[5:]) == LABELS and all(nih[c].dtype == np.float32 for c in LABELS)
    assert nih["cohort"].value_counts().to_dict() == {"darkcovidnet": 775, "reproduce_chexnet": 319}
    assert len(nih) == 1094 and nih["path"].map(os.path.isabs).all() and os.path.exists(nih["path"].iat[0])
    r = row(nih, "00000100_000.png")
    positive = {c for c in LABELS if r[c] == 1.0}
    assert positive == {"Atelectasis", "Effusion", "Infiltration"}
    assert r["patient"] == "nih:100" and r["source"] == "nih384" and r["view"] == "PA"
    assert not nih[LABELS].isna().any().any()  # NIH annotates all 14 (+ No Finding); TB is a "no"
    normal = nih[nih[NO_FINDING] == 1.0]
    assert len(normal) > 100 and (normal[FINDINGS] == 0.0).all().all()
    assert ((nih[FINDINGS] == 1.0).any(axis=1) == (nih[NO_FINDING] == 0.0)).all()


def test_nih_data_entry_filtered_to_folder(data_dir, nih64):
    full = read_manifest(data_dir / "nih/Data_Entry_2017_v2020.csv.gz", data_dir / "nih/images_64", LABELS,
                         source="nih64", patient_prefix="nih", missing="drop")
    assert full.attrs["dropped_missing"] == 112120 - 1000
    a, b = full.set_index("path"), nih64.set_index("path")
    assert sorted(a.index) == sorted(b.index)
    pd.testing.assert_frame_equal(a.loc[b.index, LABELS + ["patient"]], b[LABELS + ["patient"]])


def test_kermany_and_tbx11k(sources):
    k = read_manifest(labels=LABELS, **sources["kermany"])
    assert len(k) == 5216 and k["path"].str.contains("/kermany/train/").all()
    assert set(k["Pneumonia"].unique()) == {0.0, 1.0} and k[[c for c in NIH14 if c != "Pneumonia"]].isna().all().all()
    assert k["Tuberculosis"].isna().all() and k["view"].isna().all()
    sick = k[k["path"].str.contains("/PNEUMONIA/")]
    assert (sick["Pneumonia"] == 1.0).all() and (sick[NO_FINDING] == 0.0).all()
    well = k[k["path"].str.contains("/NORMAL/")]
    assert (well["Pneumonia"] == 0.0).all() and (well[NO_FINDING] == 1.0).all()
    assert k["patient"].str.startswith("kermany:").all()

    t = read_manifest(labels=LABELS, **sources["tbx11k"])
    assert (t["Tuberculosis"] == 1.0).all() and (t[NO_FINDING] == 0.0).all() and t[list(NIH14)].isna().all().all()
    assert row(t, "tb0005.png")["patient"] == "tbx11k:tb0005.png" and t.attrs["notes"]  # file = patient


def test_covid_blank_findings_unknown(sources):
    c = read_manifest(labels=get_label_set("covid"), **sources["covid"])
    # COVID-19 is read from the collection's own diagnosis column (original_finding), not Finding Labels.
    assert not c["COVID-19"].isna().any() and int(c["COVID-19"].sum()) == 427
    blank = c["Pneumonia"].isna()
    assert blank.sum() == 6 and c.loc[blank, NO_FINDING].isna().all() and (c.loc[blank, "COVID-19"] == 0).all()


SIX = get_label_set("six")


@pytest.fixture(scope="module")
def six(data_dir):
    return load_sources(["nih384", "nih64", "kermany", "covid", "tbx11k"], data_dir, SIX)


def labels_of(df, name, source=None):
    """``{label: 1.0 / 0.0 / "?"}`` of one film (NaN as "?", so dicts compare)."""
    r = row(df if source is None else df[df["source"] == source], name)
    return {k: "?" if math.isnan(r[k]) else float(r[k]) for k in SIX}


def test_six_label_set_names_its_proxy(six):
    """The cancer label is the proxy by name, and what it reads on real films is its findings' union."""
    assert LUNG_CANCER_PROXY in SIX and "Lung Cancer" not in SIX  # never a bare cancer label
    nih = six[six["source"].isin(["nih384", "nih64"])]
    findings = pd.concat([pd.read_csv(label_file, usecols=["Image Index", "Finding Labels"])
                          for label_file in {os.path.join(os.path.dirname(p), "labels.csv") for p in nih["path"]}])
    by_name = dict(zip(findings["Image Index"], findings["Finding Labels"]))
    members = set(PROXIES[LUNG_CANCER_PROXY])
    want = [float(bool(members & set(by_name[os.path.basename(p)].split("|")))) for p in nih["path"]]
    assert nih[LUNG_CANCER_PROXY].tolist() == want and 0 < sum(want) < len(want)
    assert get_label_set(f"{LUNG_CANCER_PROXY},No Finding") == [LUNG_CANCER_PROXY, NO_FINDING]  # a comma list works


def test_six_labels_on_real_rows(six):
    nan = "?"
    # TBX11K: a tuberculosis positive and not normal; it annotates nothing else.
    assert labels_of(six, "tb0005.png") == {"Pneumonia": nan, "Tuberculosis": 1.0, "COVID-19": nan,
                                            "Lung Opacity": nan, LUNG_CANCER_PROXY: nan, NO_FINDING: 0.0}
    # NIH: Lung Opacity is the RSNA radiologists' reading, unknown (not 0) where they did not read the
    # film; the proxy is Mass or Nodule; NIH's films are Tuberculosis and COVID-19 negatives.
    assert labels_of(six, "00000981_000.png") == {"Pneumonia": 0.0, "Tuberculosis": 0.0, "COVID-19": 0.0,
                                                  "Lung Opacity": 1.0, LUNG_CANCER_PROXY: 0.0, NO_FINDING: 0.0}
    assert labels_of(six, "00000493_000.png")["Lung Opacity"] == 0.0  # RSNA: "Normal"
    assert labels_of(six, "00003421_000.png")["Lung Opacity"] == 0.0  # RSNA: "No Lung Opacity / Not Normal"
    assert labels_of(six, "00003421_000.png")[LUNG_CANCER_PROXY] == 1.0  # NIH: Mass
    nodule = labels_of(six, "00000008_002.png")  # 64-px folder, NIH: Nodule, never read by RSNA
    assert nodule[LUNG_CANCER_PROXY] == 1.0 and nodule["Lung Opacity"] == nan
    pneumonia = labels_of(six, "00017254_000.png")
    assert pneumonia["Pneumonia"] == 1.0 and pneumonia["Lung Opacity"] == nan and pneumonia[NO_FINDING] == 0.0
    assert labels_of(six, "00000075_000.png", "nih384")[LUNG_CANCER_PROXY] == 0.0  # Cardiomegaly only
    # Kermany: Pneumonia and No Finding only.
    assert labels_of(six, "IM-0115-0001.jpeg") == {"Pneumonia": 0.0, "Tuberculosis": nan, "COVID-19": nan,
                                                   "Lung Opacity": nan, LUNG_CANCER_PROXY: nan, NO_FINDING: 1.0}
    sick = labels_of(six, "person1000_bacteria_2931.jpeg")
    assert sick["Pneumonia"] == 1.0 and sick[NO_FINDING] == 0.0 and sick["COVID-19"] == nan
    # COVID collection: COVID-19 from its own diagnosis; its other pneumonias are COVID-19 negatives.
    assert labels_of(six, "covid-19-pneumonia-rapidly-progressive-admission.png")["COVID-19"] == 1.0  # "COVID-19, ARDS"
    sars = labels_of(six, "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.png")
    assert sars["COVID-19"] == 0.0 and sars["Pneumonia"] == 1.0 and sars["Tuberculosis"] == nan
    well = labels_of(six, "F051E018-DAD1-4506-AD43-BE4CA29E960B.png")
    assert well["COVID-19"] == 0.0 and well["Pneumonia"] == 0.0 and well[NO_FINDING] == 1.0
    ards = labels_of(six, "ARDSSevere.png")  # blank Finding Labels: only the diagnosis column is known
    assert ards["COVID-19"] == 0.0 and ards["Pneumonia"] == nan and ards[NO_FINDING] == nan


def test_six_label_counts_per_source(six):
    counts = label_counts(six)
    pos = counts["pos"].unstack("label")
    assert set(pos.index[pos["Tuberculosis"] > 0]) == {"tbx11k"}  # TB and COVID-19: one source each
    assert set(pos.index[pos["COVID-19"] > 0]) == {"covid"}
    assert set(pos.index[pos["Lung Opacity"] > 0]) == {"nih384", "nih64"}
    assert set(pos.index[pos["Pneumonia"] > 0]) == {"nih384", "nih64", "kermany", "covid"}
    assert counts.loc[("covid", "COVID-19")].to_dict() == {"pos": 427, "neg": 100, "unknown": 0}
    # Films RSNA never read are unknown for Lung Opacity, never negatives.
    assert counts.loc[("nih384", "Lung Opacity")].to_dict() == {"pos": 120, "neg": 257, "unknown": 717}
    assert counts.loc[("nih64", "Lung Opacity")].to_dict() == {"pos": 65, "neg": 182, "unknown": 753}
    assert counts.loc[("tbx11k", "Tuberculosis")].to_dict() == {"pos": 700, "neg": 0, "unknown": 0}
    assert counts.loc[("nih384", LUNG_CANCER_PROXY), "pos"] == 99


def test_label_column_missing_is_unknown(tmp_path, data_dir):
    """A user's NIH-layout CSV without the RSNA column: Lung Opacity unknown, with a note."""
    csv = tmp_path / "labels.csv"
    csv.write_text("Image Index,Finding Labels,rsna\n00000075_000.png,Cardiomegaly,\n"
                   "00000981_000.png,Fibrosis|Infiltration,COVID-19|Lung Opacity\n")
    images = data_dir / "nih/images_384"
    df = read_manifest(csv, images, SIX, source="toy", diagnosis_cols={"Lung Opacity": "rsna_class"})
    assert df["Lung Opacity"].isna().all() and any("rsna_class" in n for n in df.attrs["notes"])
    df = read_manifest(csv, images, SIX, source="toy", diagnosis_cols={"Lung Opacity": "rsna"})
    assert df["Lung Opacity"].isna().iat[0] and df["Lung Opacity"].iat[1] == 1.0


def test_per_label_layout_and_missing_files(tmp_path, data_dir):
    names = sorted(os.listdir(data_dir / "tbx11k/images"))[:3]
    csv = tmp_path / "labels.csv"
    csv.write_text("Image Index,Effusion,Edema,Hernia\n"
                   f"{names[0]},1,0,\n{names[1]},0,0,0\n{names[2]},,-1,1\nnot_there.png,1,1,1\n")
    with pytest.warns(UserWarning, match="dropped 1 "):
        df = read_manifest(csv, data_dir / "tbx11k/images", ["Effusion", "Edema", "Hernia", "Mass", NO_FINDING],
                           source="toy", annotated=["Effusion", "Edema", "Hernia"])
    got = df[["Effusion", "Edema", "Hernia", "Mass", NO_FINDING]].to_numpy()
    nan = math.nan
    np.testing.assert_array_equal(got, [[1, 0, nan, nan, 0], [0, 0, 0, nan, nan], [nan, nan, 1, nan, 0]])
    assert df["patient"].tolist() == [f"toy:{n}" for n in names] and df["view"].isna().all()


def test_load_sources_shares_nih_patients(data_dir, nih, nih64):
    df = load_sources(["nih384", "nih64", "covid"], data_dir, LABELS)
    assert df["source"].value_counts().to_dict() == {"nih384": 1094, "nih64": 1000, "covid": 527}
    shared = set(nih["patient"]) & set(nih64["patient"])
    assert len(shared) == 5  # same NIH patients in both folders: one namespace, kept together
    split = patient_split(df, seed=0)
    assert_patient_disjoint(df, split)
    with pytest.raises(ValueError, match="unknown sources"):
        load_sources(["nope"], data_dir, LABELS)


def test_patient_split(nih64):
    df = nih64
    s0 = patient_split(df, seed=0)
    assert set(s0) == {"train", "val", "test"}
    assert_patient_disjoint(df, s0)
    assert s0.equals(patient_split(df, seed=0))
    s1 = patient_split(df, seed=1)
    assert (s0 != s1).mean() > 0.1
    frac = s0.value_counts(normalize=True)
    assert abs(frac["train"] - 0.70) < 0.05 and abs(frac["val"] - 0.15) < 0.05 and abs(frac["test"] - 0.15) < 0.05
    for label in ("Atelectasis", "Effusion", "Nodule", "Pleural_Thickening"):  # every split has positives
        assert (df.groupby(s0)[label].sum() > 0).all(), label
    image_level = pd.Series(np.where(np.arange(len(df)) % 5 == 0, "test", "train"), index=df.index)
    with pytest.raises(ValueError, match="nih:"):
        assert_patient_disjoint(df, image_level)


def test_balanced_cohort_gets_its_own_held_out_share(data_dir):
    """NIH's 319 label-balanced films: a quarter of their patients each in val and test, every finding
    present in both, the rest split 15/15, and no patient in two splits (NIH folders share patients)."""
    df = load_sources(["nih384", "nih64"], data_dir, NIH14)
    assert set(df.loc[df["source"] == "nih64", "cohort"]) == {"kcr2019_64px"}
    fracs = parse_cohort_fracs(["reproduce_chexnet=0.25:0.25"])
    assert fracs == {"reproduce_chexnet": (0.25, 0.25)}
    split = cohort_patient_split(df, 0.15, 0.15, seed=0, cohort_fracs=fracs)
    assert_patient_disjoint(df, split)
    balanced = (df["cohort"] == "reproduce_chexnet").to_numpy()
    share = split[balanced].value_counts()
    assert share["val"] >= 70 and share["test"] >= 70 and share["train"] >= 140
    for label in NIH14:  # each finding has positives in the balanced val and test films
        for s in ("val", "test"):
            assert (df.loc[balanced & (split == s).to_numpy(), label] == 1.0).sum() >= 1, (label, s)
    others = ~df["patient"].isin(set(df.loc[balanced, "patient"])).to_numpy()
    rest = split[others].value_counts(normalize=True)
    assert 0.12 < rest["val"] < 0.18 and 0.12 < rest["test"] < 0.18
    assert split.equals(cohort_patient_split(df, 0.15, 0.15, seed=0, cohort_fracs=fracs))  # seeded
    with pytest.raises(ValueError, match="NAME=VAL_FRAC:TEST_FRAC"):
        parse_cohort_fracs(["reproduce_chexnet=0.25"])


def test_repeat_rows_weighs_a_cohort_in_training(data_dir):
    """``repeat: [reproduce_chexnet=3]``: each balanced film 3 times, every other film once, labels and
    patients carried along; an empty list is the frame itself, a bad or matchless spec one clear error."""
    df = load_sources(["nih384", "nih64"], data_dir, NIH14)
    balanced = df["cohort"] == "reproduce_chexnet"
    assert repeat_rows(df, []) is df
    out = repeat_rows(df, ["reproduce_chexnet=3"])
    assert len(out) == len(df) + 2 * balanced.sum()
    seen = out["path"].value_counts()
    assert set(seen[df.loc[balanced, "path"]]) == {3} and set(seen[df.loc[~balanced, "path"]]) == {1}
    assert label_counts(out).loc["nih64"].equals(label_counts(df).loc["nih64"])
    pos = out.loc[out["cohort"] == "reproduce_chexnet", "Cardiomegaly"].eq(1.0).sum()
    assert pos == 3 * df.loc[balanced, "Cardiomegaly"].eq(1.0).sum() > 0
    assert len(repeat_rows(df, ["nih64=2"])) == len(df) + (df["source"] == "nih64").sum()  # a source works too
    for bad, msg in (("reproduce_chexnet", "expected"), ("reproduce_chexnet=0", "expected"),
                     ("kermany=2", "no training film")):
        with pytest.raises(ValueError, match=msg):
            repeat_rows(df, [bad])


def test_chexnet_lists(data_dir, nih):
    d = data_dir / "nih/chexnet_split"
    s = split_from_lists(nih, d / "train_list.txt", d / "val_list.txt", d / "test_list.txt")
    assert "unused" not in set(s)
    assert_patient_disjoint(nih, s)
    src = pd.read_csv(data_dir / "nih/images_384/labels.csv")["source"].to_numpy()
    assert (s[src == "reproduce_chexnet"] == "test").all()  # all of CheXNet's test split, as README says
    assert set(s[src == "darkcovidnet"]) == {"train", "val", "test"}  # the random sample is not

    # official-style train_val vs test: val is carved out of train_val by patient
    train_val = [ln.split()[0] for f in ("train_list.txt", "val_list.txt") for ln in open(d / f)]
    c = split_from_lists(nih, train_val, test_list=d / "test_list.txt", val_frac=0.2, seed=3)
    assert_patient_disjoint(nih, c)
    assert (c == "test").equals(s == "test") and 0.1 < (c == "val").sum() / (c != "test").sum() < 0.3
    only = split_from_lists(nih, [], test_list=["00000100_000.png"])
    assert (only == "test").sum() == 1 and (only == "unused").sum() == len(nih) - 1


@pytest.fixture(scope="module")
def small(nih):
    return nih.iloc[::40].head(28).reset_index(drop=True)


def test_cache_built_once_and_exact(tmp_path, small):
    from chestxray.imaging import read_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    df = pd.concat([small, small.head(1).assign(path=str(bad))], ignore_index=True)
    cache = build_cache(df, 64, tmp_path / "cache", workers=2, progress=False)
    assert cache.built and len(cache) == len(small) and list(cache.failed) == [str(bad)]
    assert cache.array.shape == (len(small), 64, 64) and cache.array.dtype == np.uint8
    npy_mtime = os.stat(cache.npy_path).st_mtime_ns

    again = build_cache(df, 64, tmp_path / "cache", progress=False)
    assert not again.built and again.key == cache.key and again.failed == cache.failed
    assert os.stat(again.npy_path).st_mtime_ns == npy_mtime
    other = build_cache(small.head(5), 64, tmp_path / "cache", progress=False)  # other paths: other key
    assert other.built and other.key != cache.key

    for p in small["path"].iloc[[0, 7, 27]]:
        want = resize_gray(read_image(p).pixels, (64, 64))[0, 0].mul(255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(cache.array[cache.index_of(p)], want)

    clone = pickle.loads(pickle.dumps(cache))  # spawn-started loader workers reopen the memmap
    assert isinstance(clone.array, np.memmap) and np.array_equal(clone.array[5], cache.array[5])

    ds = XrayDataset(cache, df, LABELS)
    assert len(ds) == len(small) and ds.dropped == 1
    x, y = ds[3]
    assert x.shape == (1, 64, 64) and x.dtype == torch.uint8 and y.shape == (len(LABELS),)
    raw = RawXrayDataset(small, LABELS, 64)
    xr, yr = raw[3]
    assert torch.equal(x, xr) and torch.equal(y, yr)


def test_batch_augment():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 1, 48, 48, generator=g) * 255).to(torch.uint8)
    a = batch_augment(x, torch.Generator().manual_seed(1))
    b = batch_augment(x, torch.Generator().manual_seed(1))
    c = batch_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    x01 = x.float() / 255
    torch.testing.assert_close(batch_augment(x, g, strength=0.0), x01)
    weak = batch_augment(x, g, strength=1e-4)  # goes through the warp: still ~identity
    torch.testing.assert_close(weak, x01, atol=2e-3, rtol=0)
    assert (batch_augment(x, g) - x01).abs().mean() > 0.02
    # no flip by default: a bright left half stays mostly on the left
    half = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    half[..., :16] = 255
    out = batch_augment(half, g)
    assert (out[..., :16].mean(dim=(1, 2, 3)) > out[..., 16:].mean(dim=(1, 2, 3))).all()
    flipped = batch_augment(half, torch.Generator().manual_seed(5), hflip=True)
    assert (flipped[..., :16].mean(dim=(1, 2, 3)) < flipped[..., 16:].mean(dim=(1, 2, 3))).any()


def test_masked_bce_loss():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]], requires_grad=True)
    targets = torch.tensor([[1.0, math.nan, 0.0], [math.nan, 1.0, 1.0]])
    loss = masked_bce_loss(logits, targets)
    known = ~targets.isnan()
    manual = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()

    pw = torch.tensor([2.0, 3.0, 0.5])
    weighted = masked_bce_loss(logits, targets, pos_weight=pw)
    manual_w = F.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0.0), pos_weight=pw,
                                                  reduction="none")[known].mean()
    torch.testing.assert_close(weighted, manual_w)
    none_known = masked_bce_loss(logits, torch.full_like(targets, math.nan))
    assert none_known.item() == 0.0 and torch.isfinite(none_known)


def test_pos_weights():
    df = pd.DataFrame({"a": [1, 0, 0, 0, math.nan], "b": [1, 1, 1, 0, 0], "c": [0.0] * 5}, dtype=np.float32)
    torch.testing.assert_close(pos_weights(df, ["a", "b", "c"]), torch.tensor([3.0, 2 / 3, 1.0]))
    rare = pd.DataFrame({"d": [1.0] + [0.0] * 49})
    assert pos_weights(rare, ["d"], max_weight=10.0).item() == 10.0

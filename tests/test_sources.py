"""The data sources' one table (chestxray/sources.py) against the real shared data, and what reads it."""
from __future__ import annotations

import pandas as pd
import pytest

from chestxray.sources import COHORTS, COLLECTIONS, GROUP_NAMES, SOURCES, collections, source_names


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_reads_from_the_shared_data(name, data_dir):
    from chestxray.data import default_sources, read_manifest
    from chestxray.labels import get_label_set

    spec = SOURCES[name]
    assert spec.collection in COLLECTIONS and GROUP_NAMES[name] == spec.title
    df = read_manifest(labels=get_label_set("six"), missing="error", **default_sources(data_dir)[name])
    assert len(df) > 0 and set(df["source"]) == {name}
    assert df["patient"].str.startswith(f"{spec.patient_prefix or name}:").all()
    for label in get_label_set("six"):  # what it annotates is known; a label it does not annotate is unknown
        annotated = spec.annotated is None or label in spec.annotated or label in spec.diagnosis_cols
        if not annotated and label != "No Finding":
            assert df[label].isna().all(), (name, label)


def test_a_source_that_repeats_another_holds_only_its_films(data_dir):
    """``repeats`` is a fact about the files: every film of such a source is one of the other's."""
    repeating = [n for n, s in SOURCES.items() if s.repeats]
    assert repeating and set(source_names(include_repeats=False)) == set(SOURCES) - set(repeating)
    for name in repeating:
        own = pd.read_csv(data_dir / SOURCES[name].csv)["Image Index"]
        other = set(pd.read_csv(data_dir / SOURCES[SOURCES[name].repeats].csv)["Image Index"])
        assert set(own) <= other


def test_the_cohorts_in_the_label_files_are_registered(data_dir):
    """NIH's 384-px label file names its samples in a ``source`` column: each is a registered cohort."""
    found = set(pd.read_csv(data_dir / SOURCES["nih384"].csv)["source"].dropna())
    assert found == set(COHORTS)
    assert collections(["reproduce_chexnet", "kermany", "nih64"]) == ["nih", "kermany"]


def test_the_command_lines_list_every_source(capsys):
    from chestxray.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SOURCES)
    from chestxray.train_cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert all(name in text for name in SOURCES)

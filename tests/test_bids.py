"""BIDS datasets as cohorts: discovery with sessions, missing images and labels, extra columns; generate --layout bids."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TRAIN_CONFIG, run_bundle
from monai_mtl.__main__ import main
from monai_mtl.cohort import CohortError, read_cohort, read_labels

pytest.importorskip("bids")


def _bids_from(cohort: Path, root: Path, n: int | None = None) -> pd.DataFrame:
    """A hand-made BIDS dataset from a CSV cohort: two sessions for every third subject, extra columns,
    one subject without labels and one listed subject without an image."""
    labels = read_labels(cohort / "labels.csv").head(n)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    rows = []
    for i, row in enumerate(labels.itertuples(index=False)):
        subject = f"sub-{i:03d}"
        sessions = ["1", "2"] if i % 3 == 0 else ["1"]
        for session in sessions:
            anat = root / subject / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            image = nib.load(row.image)
            scale = 1.0 if session == "1" else 0.5  # session 2 is another (darker) scan
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * scale, image.affine), anat / f"{subject}_ses-{session}_T1w.nii.gz")
        rows.append({"participant_id": subject, "age": 40 + i, "site": "A" if i % 2 else "B",
                     "dx_class": row.response, "dx_severity": row.severity})
    rows[1].update(dx_class="n/a", dx_severity="n/a")  # labels unknown
    rows.append({"participant_id": "sub-999", "age": 50, "site": "A", "dx_class": 1, "dx_severity": 40.0})  # no image
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    return labels


def test_bids_discovery_with_sessions_missing_images_labels_and_extra_columns(tiny_cohort, tmp_path, caplog):
    root = tmp_path / "bids"
    labels = _bids_from(tiny_cohort, root, n=6)
    with caplog.at_level(logging.INFO):
        table = read_cohort(root, response_column="dx_class", severity_column="dx_severity")
    assert table["subject_id"].tolist() == ["sub-000", "sub-002", "sub-003", "sub-004", "sub-005"]
    assert table["response"].tolist() == labels["response"].drop(index=1).tolist()
    assert {"age", "site"} <= set(table.columns)  # extra columns kept
    assert all("ses-1" in p for p in table["image"])  # several sessions: the first
    message = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(message) == 1 and "sub-999" in message[0] and "sub-001" in message[0]  # one message lists both
    assert any("several sessions" in r.getMessage() and "sub-000" in r.getMessage() for r in caplog.records)

    second = read_cohort(root, response_column="dx_class", severity_column="dx_severity", session="2")
    assert second["subject_id"].tolist() == ["sub-000", "sub-003"] and all("ses-2" in p for p in second["image"])

    with pytest.raises(CohortError, match=r"participants.tsv: no column\(s\) \['response', 'severity'\]"):
        read_cohort(root)  # the default columns are not there


def test_generate_layout_bids_is_valid_and_reads_as_the_csv_cohort(tmp_path):
    from bids_validator import BIDSValidator

    common = ["generate", "--num-samples", "6", "--seed", "3", "--no-progress", "--workers", "1"]
    assert main([*common, "--output", str(tmp_path / "csv")]) == 0
    assert main([*common, "--output", str(tmp_path / "bids"), "--layout", "bids"]) == 0
    root = tmp_path / "bids"
    ignored = set((root / ".bidsignore").read_text().split())
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in ignored and p.name != ".bidsignore"]
    assert files and all(BIDSValidator().is_bids("/" + p.relative_to(root).as_posix()) for p in files)
    assert not (root / "labels.csv").exists() and (root / "participants.json").is_file()
    csv, bids = read_cohort(tmp_path / "csv"), read_cohort(root)
    assert csv["subject_id"].tolist() == bids["subject_id"].tolist()
    assert csv["response"].tolist() == bids["response"].tolist() and csv["severity"].tolist() == bids["severity"].tolist()
    for a, b in zip(csv["image"], bids["image"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()


@pytest.mark.slow
def test_a_bids_dataset_trains_and_predicts(train_cohort, tmp_path):
    root = tmp_path / "bids"
    _bids_from(train_cohort, root)
    output = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(root), output_dir=str(output), max_epochs=1, batch_size=8,
               cache_workers=1, response_column="dx_class", severity_column="dx_severity", bids_session="1")
    split = json.loads((output / "split.json").read_text())
    assert sum(len(split[k]) for k in ("train", "validation", "test")) == 59  # 60 subjects, one without labels
    assert "sub-001" not in split["train"] + split["validation"] + split["test"]
    predictions = tmp_path / "predictions"
    run_bundle("run", str(Path(TRAIN_CONFIG).with_name("inference.json")), dataset_dir=str(root),
               ckpt_path=str(output / "model.pt"), output_dir=str(predictions))
    table = pd.read_csv(predictions / "predictions.csv")
    assert len(table) == 60 and table["error"].isna().all()  # every subject with an image, labelled or not
    assert table["image"].str.contains("ses-1").all()  # each subject's first session, as training read it
    run_bundle("run", str(Path(TRAIN_CONFIG).with_name("inference.json")), dataset_dir=str(root),
               ckpt_path=str(output / "model.pt"), output_dir=str(tmp_path / "session2"), bids_session="2")
    session2 = pd.read_csv(tmp_path / "session2" / "predictions.csv")
    assert len(session2) == 20 and session2["image"].str.contains("_ses-2_T1w").all()  # every third subject has one

    # evaluation, and the tools that predict a run's test part, read the cohort as its training did (its label columns
    # and session) without repeating them: the same test figures
    run_bundle("evaluating", [TRAIN_CONFIG, str(Path(TRAIN_CONFIG).with_name("evaluate.json"))], dataset_dir=str(root),
               output_dir=str(output))
    assert json.loads((output / "metrics.json").read_text())["severity_mae"] == pytest.approx(
        json.loads((output / "test_metrics.json").read_text())["severity_mae"])
    from monai_mtl.robustness import artifact_sweep
    from monai_mtl.run_folder import read_run_cohort

    sweep = artifact_sweep(output, root, tmp_path / "robustness", strengths={"noise": [0.05]}, grids=[])
    tested = json.loads((output / "test_metrics.json").read_text())
    assert sweep.iloc[0]["accuracy"] == tested["accuracy"] and sweep.iloc[0]["severity_mae"] == pytest.approx(tested["severity_mae"])
    settings = json.loads((output / "run_settings.json").read_text())
    settings["config"]["bids_session"] = "2"
    (tmp_path / "session2_run").mkdir()
    (tmp_path / "session2_run" / "run_settings.json").write_text(json.dumps(settings))
    assert read_run_cohort(tmp_path / "session2_run", root)["image"].str.contains("_ses-2_T1w").all()
    shutil.rmtree(output / "tensorboard")


def test_a_model_with_covariates_predicts_a_bids_dataset_from_its_participants_tsv(train_cohort, tmp_path):
    from monai_mtl.errors import project_error

    root = tmp_path / "bids"
    _bids_from(train_cohort, root)
    output = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(root), output_dir=str(output), max_epochs=1, batch_size=8,
               cache_workers=1, response_column="dx_class", severity_column="dx_severity", bids_session="1",
               covariates=["age", "site"])
    infer = str(Path(TRAIN_CONFIG).with_name("inference.json"))
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    participants[participants["participant_id"] != "sub-004"].to_csv(root / "participants.tsv", sep="\t", index=False)
    run_bundle("run", infer, dataset_dir=str(root), ckpt_path=str(output / "model.pt"), output_dir=str(tmp_path / "p"))
    table = pd.read_csv(tmp_path / "p" / "predictions.csv").set_index("image")
    unlisted = table[table["error"].notna()]
    assert len(table) == 60 and len(unlisted) == 1 and "sub-004" in unlisted.index[0]
    assert "participants.tsv: no row for sub-004" in unlisted["error"].iloc[0]
    # each listed subject's covariates reach the network: other ages give other outputs for the same scans
    participants["age"] = participants["age"].astype(float) + 30
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    run_bundle("run", infer, dataset_dir=str(root), ckpt_path=str(output / "model.pt"), output_dir=str(tmp_path / "older"))
    older = pd.read_csv(tmp_path / "older" / "predictions.csv").set_index("image")
    listed = table.index[table["error"].isna()]
    assert not np.allclose(older.loc[listed, "prob_responder"], table.loc[listed, "prob_responder"])
    participants.drop(columns=["site"]).to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(Exception) as refused:
        run_bundle("run", infer, dataset_dir=str(root), ckpt_path=str(output / "model.pt"), output_dir=str(tmp_path / "x"))
    assert "covariate column(s) ['site']" in str(project_error(refused.value))

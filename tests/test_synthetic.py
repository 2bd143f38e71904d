"""The synthetic cohort: files, labels, determinism, severity signal and argument checks."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import TINY

from monai_mtl import RESPONSE_NAMES
from monai_mtl.__main__ import main
from monai_mtl.synthetic import ATLAS_LABELS, CohortConfig, draw_subject, generate_cohort


def _digests(root, names):
    return {n: hashlib.sha256((root / "images" / f"{n}.nii.gz").read_bytes()).hexdigest() for n in names}


def test_images_are_float32_ras_nifti_with_physical_spacing(tiny_cohort):
    labels = pd.read_csv(tiny_cohort / "labels.csv")
    image = nib.load(tiny_cohort / labels["image"][0])
    assert image.shape == (64, 64, 16)
    assert image.get_data_dtype() == np.float32
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms(), TINY.spacing_mm)
    fov = np.asarray(image.shape) * np.asarray(image.header.get_zooms())
    assert np.all((fov >= 100) & (fov <= 260)), fov
    assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
    np.testing.assert_allclose(image.get_sform(), image.get_qform(), atol=1e-5)
    assert image.header.get_xyzt_units()[0] == "mm"
    data = np.asarray(image.dataobj)
    assert 0.7 < data.max() < 1.2 and abs(np.median(data[:5, :5, :])) < 0.05  # brain bright, background dark


def test_labels_csv_schema_classes_and_severity_ranges(tiny_cohort):
    labels = pd.read_csv(tiny_cohort / "labels.csv")
    assert list(labels.columns) == ["subject_id", "image", "response", "response_name", "severity"]
    assert labels["subject_id"].is_unique and len(labels) == TINY.num_samples
    assert set(labels["response"]) <= {0, 1, 2}
    assert (labels["response_name"] == labels["response"].map(dict(enumerate(RESPONSE_NAMES)))).all()
    for response, (low, high) in enumerate(TINY.severity_ranges):
        severity = labels.loc[labels["response"] == response, "severity"]
        assert ((severity >= low) & (severity < high)).all()
    assert all((tiny_cohort / path).is_file() for path in labels["image"])


def test_atlas_and_cohort_json(tiny_cohort):
    atlas = nib.load(tiny_cohort / "atlas.nii.gz")
    assert atlas.shape == (64, 64, 16)
    present = set(np.unique(np.asarray(atlas.dataobj)).tolist())
    assert present == set(ATLAS_LABELS), present
    meta = json.loads((tiny_cohort / "cohort.json").read_text())
    assert meta["parameters"]["seed"] == 7 and meta["parameters"]["num_samples"] == 24
    assert sum(meta["class_counts"].values()) == 24
    assert meta["version"]


def test_class_proportions_follow_the_config():
    config = CohortConfig()
    responses = np.array([draw_subject(config, i).response for i in range(3000)])
    np.testing.assert_allclose(np.bincount(responses) / len(responses), config.class_proportions, atol=0.03)


def test_same_seed_gives_identical_files_whatever_workers_and_n(tiny_cohort, tmp_path):
    first = generate_cohort(tmp_path / "first8", CohortConfig(num_samples=8, seed=7), workers=1, progress=False)
    names = list(first["subject_id"])
    assert _digests(tmp_path / "first8", names) == _digests(tiny_cohort, names)
    other = generate_cohort(tmp_path / "seed8", CohortConfig(num_samples=8, seed=8), workers=1, progress=False)
    assert set(_digests(tmp_path / "seed8", names).values()).isdisjoint(_digests(tiny_cohort, names).values())
    assert not other["severity"].equals(first["severity"])


def test_hippocampal_intensity_tracks_severity(tmp_path):
    root = tmp_path / "signal"
    labels = generate_cohort(root, CohortConfig(num_samples=60, seed=3), progress=False)
    atlas = np.asarray(nib.load(root / "atlas.nii.gz").dataobj)
    hippocampi = np.isin(atlas, [6, 7])
    means = [np.asarray(nib.load(root / p).dataobj)[hippocampi].mean() for p in labels["image"]]
    r = np.corrcoef(means, labels["severity"])[0, 1]
    assert r < -0.8, r


def test_refuses_to_overwrite_unless_asked(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["generate", "--output", str(out), "--num-samples", "3", "--no-progress"]) == 0
    before = (out / "labels.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--output", str(out), "--num-samples", "4", "--no-progress"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "labels.csv").read_text() == before
    assert main(["generate", "--output", str(out), "--num-samples", "4", "--overwrite", "--no-progress"]) == 0
    assert len(pd.read_csv(out / "labels.csv")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging or old folders left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import monai_mtl.synthetic as synthetic

    calls = {"n": 0}
    real = synthetic._write_subject

    def failing(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(synthetic, "_write_subject", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(tmp_path / "c", CohortConfig(num_samples=5), workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "2"], "num_samples"),
        (["--class-proportions", "0.5", "0.3", "0.3"], "sum to 1"),
        (["--severity-ranges", "60", "100", "35", "65", "0", "35"], "overlap"),
        (["--severity-ranges", "65", "120", "35", "65", "0", "35"], "0 <= low < high <= 100"),
        (["--severity-ranges", "65", "100", "35", "65", "35", "0"], "0 <= low < high"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "c"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--output", str(out), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--output", str(blocker / "cohort"), "--num-samples", "3", "--no-progress"])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_a_cohort_in_synthetic_dir_made_otherwise_than_asked_is_refused(tiny_cohort):
    from monai_mtl.cohort import ensure_cohort
    from monai_mtl.errors import CohortError

    made = json.loads((tiny_cohort / "cohort.json").read_text())["parameters"]
    # what the config leaves unset (None) or asks as it was made: the cohort is used as it is
    assert ensure_cohort(tiny_cohort, tiny_cohort) == tiny_cohort
    assert ensure_cohort(tiny_cohort, tiny_cohort, made["shape"], made["spacing_mm"], made["num_samples"]) == tiny_cohort
    for asked, message in [
        ({"shape": (107, 128, 85)}, f"made with shape {made['shape']}, but the config asks for synthetic_shape [107, 128, 85]"),
        ({"spacing": (1.5, 1.5, 1.5)}, "asks for synthetic_spacing [1.5, 1.5, 1.5]"),
        ({"num_samples": 300}, f"num_samples {made['num_samples']}, but the config asks for synthetic_num_samples 300"),
        ({"covariates": True}, "made with no clinical covariates, but the config asks for synthetic_covariates true"),
    ]:
        with pytest.raises(CohortError, match=f"cohort.json: this synthetic cohort was .*{message}".replace("[", r"\[")):
            ensure_cohort(tiny_cohort, tiny_cohort, **asked)
    # another folder (a user's cohort given as dataset_dir) is not the generated one: nothing compared
    assert ensure_cohort(tiny_cohort, tiny_cohort.parent / "elsewhere", num_samples=300) == tiny_cohort

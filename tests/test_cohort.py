"""Reading and validating labels.csv and the images: each bad cohort is refused with a message naming what is wrong."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from monai_mtl.cohort import CohortError, prepare_datalists, read_labels
from monai_mtl.images import check_image


@pytest.fixture
def cohort(tiny_cohort, tmp_path):
    """A writable copy of the tiny cohort."""
    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, root)
    return root


def _edit_labels(root, edit):
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    labels = edit(labels)
    labels.to_csv(root / "labels.csv", index=False)


def _refused(root, tmp_path, *fragments):
    out = tmp_path / "run"
    with pytest.raises(CohortError) as err:
        prepare_datalists(root, out)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert not (out / "split.json").exists()  # nothing that looks like a started run
    return str(err.value)


def test_valid_cohort_gives_disjoint_datalists(cohort, tmp_path):
    lists = prepare_datalists(cohort, tmp_path / "run")
    assert sum(len(v) for v in lists.values()) == 24
    first = lists["train"][0]
    assert set(first) == {"image", "response", "severity", "subject_id"} and first["image"].endswith(".nii.gz")
    assert (tmp_path / "run" / "split.json").is_file()
    assert prepare_datalists(cohort, tmp_path / "run") == lists  # same split reused


def test_missing_column(cohort, tmp_path):
    _edit_labels(cohort, lambda t: t.drop(columns=["severity"]))
    _refused(cohort, tmp_path, "labels.csv", "missing column", "severity")


def test_extra_columns_are_fine(cohort, tmp_path):
    _edit_labels(cohort, lambda t: t.assign(age="42", site="A"))
    assert len(prepare_datalists(cohort, tmp_path / "run")["test"]) > 0


@pytest.mark.parametrize("value", ["3", "-1", "x", "1.5", ""])
def test_unknown_response(cohort, tmp_path, value):
    _edit_labels(cohort, lambda t: t.assign(response=[value] + list(t["response"][1:])))
    _refused(cohort, tmp_path, "line 2", "response")


@pytest.mark.parametrize("value", ["nan", "101", "-0.5", "severe", "inf"])
def test_bad_severity(cohort, tmp_path, value):
    _edit_labels(cohort, lambda t: t.assign(severity=list(t["severity"][:4]) + [value] + list(t["severity"][5:])))
    _refused(cohort, tmp_path, "line 6", "severity", "[0, 100]")


def test_duplicate_subject_ids(cohort, tmp_path):
    _edit_labels(cohort, lambda t: t.assign(subject_id=["dup", "dup"] + list(t["subject_id"][2:])))
    _refused(cohort, tmp_path, "duplicate subject_id", "dup", "lines [2, 3]")


def test_missing_image_file(cohort, tmp_path):
    labels = pd.read_csv(cohort / "labels.csv")
    (cohort / labels["image"][3]).unlink()
    _refused(cohort, tmp_path, "line 5", labels["subject_id"][3], "does not exist")


def test_empty_csv_and_header_only(cohort, tmp_path):
    (cohort / "labels.csv").write_text("")
    _refused(cohort, tmp_path, "empty")
    (cohort / "labels.csv").write_text("subject_id,image,response,severity\n")
    _refused(cohort, tmp_path, "no subjects")


def test_truncated_and_non_gzip_images(cohort, tmp_path):
    labels = pd.read_csv(cohort / "labels.csv")
    path = cohort / labels["image"][0]
    path.write_bytes(path.read_bytes()[:5000])
    message = _refused(cohort, tmp_path, labels["subject_id"][0], "cannot read as NIfTI")
    assert str(path) in message
    path.write_bytes(b"this is not a gzip file at all" * 100)
    _refused(cohort, tmp_path, "cannot read as NIfTI")


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_image_checks(tmp_path):
    volume = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    assert check_image(_save(tmp_path / "ok.nii.gz", volume)) == (8, 8, 8)
    assert check_image(_save(tmp_path / "one4d.nii.gz", volume[..., None])) == (8, 8, 8)
    for dtype in (np.int16, np.uint8, np.float64):
        assert check_image(_save(tmp_path / f"{np.dtype(dtype).name}.nii.gz", (volume * 100).astype(dtype))) == (8, 8, 8)
    cases = {
        "2d": (volume[:, :, 0], "expected a 3D volume"),
        "4d": (np.stack([volume, volume], axis=-1), "expected a 3D volume"),
        "nan": (np.where(volume > 0.5, np.nan, volume).astype(np.float32), "NaN or infinite"),
        "inf": (np.where(volume > 0.9, np.inf, volume).astype(np.float32), "NaN or infinite"),
        "constant": (np.ones((8, 8, 8), np.float32), "constant"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(CohortError, match=message) as err:
            check_image(_save(tmp_path / f"{name}.nii.gz", data))
        assert f"{name}.nii.gz" in str(err.value)  # the message names the file


def test_class_too_small_to_stratify(cohort, tmp_path):
    def keep_two_responders(t):
        responders = t.index[t["response"] == "2"]
        return t.drop(index=responders[2:])

    _edit_labels(cohort, keep_two_responders)
    _refused(cohort, tmp_path, "cannot stratify", "responder: 2")


def test_read_labels_resolves_relative_and_absolute_paths(cohort):
    labels = pd.read_csv(cohort / "labels.csv")
    labels.loc[0, "image"] = str(cohort / labels["image"][0])
    labels.to_csv(cohort / "labels.csv", index=False)
    table = read_labels(cohort / "labels.csv")
    assert all(p.startswith(str(cohort)) for p in table["image"])
    assert table["response"].dtype.kind == "i" and table["severity"].dtype.kind == "f"


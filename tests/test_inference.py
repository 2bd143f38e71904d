"""Inference on new scans: predictions CSV, saliency NIfTI in each input's space, bad files, export and zoo checks."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, run_bundle

from monai_mtl.cohort import CohortError
from monai_mtl.inference import PREDICTION_COLUMNS

INFER_CONFIG = str(BUNDLE_CONFIGS / "inference.json")
META = str(BUNDLE_CONFIGS / "metadata.json")


def _lps_int16(source: nib.Nifti1Image, shape=(96, 80, 40), spacing=2.0) -> nib.Nifti1Image:
    """A 96 x 80 x 40 int16 scan at 2 mm in LPS orientation, holding a resampled copy of ``source``'s brain."""
    from scipy.ndimage import zoom

    data = np.asarray(source.dataobj, dtype=np.float32)
    data = zoom(data, np.asarray(shape) / np.asarray(data.shape), order=1)[::-1, ::-1, :]
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [spacing * shape[0] / 2, spacing * shape[1] / 2, -spacing * shape[2] / 2]
    return nib.Nifti1Image((data * 1000).astype(np.int16), affine)


@pytest.fixture(scope="module")
def scans(train_cohort, tmp_path_factory):
    """A folder of good scans of other shapes/orientations/dtypes and bad files."""
    folder = tmp_path_factory.mktemp("scans")
    labels = pd.read_csv(train_cohort / "labels.csv")
    source = nib.load(train_cohort / labels["image"][0])
    nib.save(_lps_int16(source), folder / "lps_int16.nii.gz")
    ras64 = nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float64)[:, :, 2:14], source.affine)
    nib.save(ras64, folder / "ras_float64.nii")
    shutil.copy(train_cohort / labels["image"][1], folder / "synthetic.nii.gz")
    good = (folder / "synthetic.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    (folder / "not_nifti.nii.gz").write_bytes(b"plain text, not a NIfTI file\n" * 50)
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 8, 3).astype(np.float32), np.eye(4)), folder / "series4d.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), folder / "all_nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.eye(4)), folder / "constant.nii.gz")
    (folder / "notes.txt").write_text("ignored: not a NIfTI name")
    return folder


@pytest.fixture(scope="module")
def inference_run(trained_run, scans, tmp_path_factory):
    output = tmp_path_factory.mktemp("inference") / "out"
    run_bundle(
        "run", INFER_CONFIG, dataset_dir=str(scans), output_dir=str(output),
        ckpt_path=str(trained_run / "model.pt"), saliency=True,
        batch_size=2,  # in name order the first batch (all_nan, constant) has no usable scan at all
    )
    return output


def test_predictions_csv_schema_and_bad_files(inference_run, scans):
    table = pd.read_csv(inference_run / "predictions.csv")
    table["error"] = table["error"].fillna("")
    assert list(table.columns) == list(PREDICTION_COLUMNS)
    assert len(table) == 8  # every NIfTI-named file has a row; notes.txt is not an input
    names = [p.split("/")[-1] for p in table["image"]]
    assert names == sorted(names)  # the inputs' order, errors included
    rows = {p.split("/")[-1]: r for p, r in zip(table["image"], table.to_dict("records"))}
    for name in ("lps_int16.nii.gz", "ras_float64.nii", "synthetic.nii.gz"):
        row = rows[name]
        assert row["error"] == ""
        probs = [row["prob_non_responder"], row["prob_partial_responder"], row["prob_responder"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and int(np.argmax(probs)) == row["pred_response"]
        assert 0.0 <= row["pred_severity"] <= 100.0
    expected_errors = {
        "truncated.nii.gz": "cannot read", "not_nifti.nii.gz": "cannot read", "series4d.nii.gz": "3D",
        "all_nan.nii.gz": "NaN", "constant.nii.gz": "constant",
    }
    for name, fragment in expected_errors.items():
        assert fragment in rows[name]["error"], rows[name]["error"]
        assert pd.isna(rows[name]["pred_response_name"]) and pd.isna(rows[name]["pred_severity"])


@pytest.mark.parametrize("name", ["lps_int16.nii.gz", "ras_float64.nii", "synthetic.nii.gz"])
def test_saliency_maps_lie_in_the_input_space(inference_run, scans, name):
    source = nib.load(scans / name)
    stem = name.replace(".nii.gz", "").replace(".nii", "")
    for head in ("response", "severity"):
        saliency = nib.load(inference_run / "saliency" / f"{stem}_{head}.nii.gz")
        assert saliency.shape == source.shape
        np.testing.assert_allclose(saliency.affine, source.affine, atol=1e-5)
        data = np.asarray(saliency.dataobj)
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0 + 1e-5
    assert any(p.suffix == ".png" for p in (inference_run / "saliency").iterdir())


def test_region_saliency_for_inputs_on_the_atlas_grid(trained_run, train_cohort, tmp_path):
    out = tmp_path / "out"
    run_bundle(
        "run", INFER_CONFIG, dataset_dir=str(train_cohort / "images"), output_dir=str(out),
        ckpt_path=str(trained_run / "model.pt"), saliency=True, saliency_png=0,
    )
    regions = pd.read_csv(out / "saliency" / "region_saliency.csv")
    assert set(regions["head"]) == {"response", "severity"}
    assert len(regions) == 2 * 60
    assert {"prefrontal_cortex", "left_hippocampus", "right_hippocampus"} <= set(regions.columns)


def test_gradient_saliency_in_input_space_and_equal_to_monai_vanilla_grad(trained_run, scans, tmp_path):
    from monai.visualize import VanillaGrad

    from monai_mtl.inference import HeadSelector, input_gradient_saliency

    out = tmp_path / "gradient"
    run_bundle("run", INFER_CONFIG, dataset_dir=str(scans), output_dir=str(out), ckpt_path=str(trained_run / "model.pt"),
               saliency=True, saliency_method="gradient", saliency_png=0)
    source = nib.load(scans / "lps_int16.nii.gz")
    saliency = nib.load(out / "saliency" / "lps_int16_severity.nii.gz")
    assert saliency.shape == source.shape and np.allclose(saliency.affine, source.affine, atol=1e-5)
    assert np.asarray(saliency.dataobj).max() > 0

    # batched input gradients equal MONAI's one-sample VanillaGrad, sample by sample
    net = _checkpoint_network(trained_run / "model.pt")
    x = torch.rand(3, 1, 64, 64, 16)
    classes = torch.tensor([0, 2, 1])
    for head in ("response", "severity"):
        batched = input_gradient_saliency(net, x, head, classes)
        for i in range(3):
            single = VanillaGrad(HeadSelector(net, head))(x[i : i + 1], index=int(classes[i]) if head == "response" else 0).abs()
            torch.testing.assert_close(batched[i : i + 1], single / single.max(), rtol=1e-4, atol=1e-6)


def test_nothing_usable_is_a_clear_error_and_writes_nothing(trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no scans here")
    with pytest.raises(Exception) as err:
        run_bundle("run", INFER_CONFIG, dataset_dir=str(empty), output_dir=str(tmp_path / "o1"), ckpt_path=str(trained_run / "model.pt"))
    assert "no NIfTI files" in repr(err.value) or "no NIfTI files" in repr(err.value.__cause__)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.nii.gz").write_bytes(b"broken")
    with pytest.raises(Exception) as err:
        run_bundle("run", INFER_CONFIG, dataset_dir=str(bad), output_dir=str(tmp_path / "o2"), ckpt_path=str(trained_run / "model.pt"))
    chain = repr(err.value) + repr(err.value.__cause__)
    assert "none of the 1 input file(s) is usable" in chain
    # the output folder is checked (made) before any input is read, and holds nothing
    assert not list((tmp_path / "o1").iterdir()) and not list((tmp_path / "o2").iterdir())


def _checkpoint_network(checkpoint) -> torch.nn.Module:
    """The network a checkpoint stores the settings of (the default's: task paths after the stem, severity bins), in eval mode."""
    from monai_mtl.evaluation import CheckpointPredictor

    return CheckpointPredictor(checkpoint).network.eval()


def test_find_inputs_errors(tmp_path):
    from monai_mtl.inference import find_inputs

    with pytest.raises(CohortError, match="not a folder"):
        find_inputs(tmp_path / "missing")
    (tmp_path / "list.csv").write_text("path\nx.nii.gz\n")
    with pytest.raises(CohortError, match="no 'image' column"):
        find_inputs(tmp_path / "list.csv")


def test_torchscript_export_matches_checkpoint(trained_run, tmp_path):
    from monai.bundle import ckpt_export

    target = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(target), ckpt_file=str(trained_run / "model.pt"),
        meta_file=META, config_file=INFER_CONFIG, bundle_root=str(BUNDLE_CONFIGS.parent),
        ckpt_path=str(trained_run / "model.pt"),  # the network is built from the settings this checkpoint stores
    )
    exported = torch.jit.load(str(target))
    net = _checkpoint_network(trained_run / "model.pt")
    x = torch.rand(3, 1, 64, 64, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), atol=1e-5, rtol=1e-5)


def test_model_zoo_checks(trained_run, train_cohort, tmp_path):
    from monai.bundle import ConfigWorkflow, verify_net_in_out

    checkpoint = str(trained_run / "model.pt")
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=INFER_CONFIG, ckpt_path=checkpoint)
    workflow = ConfigWorkflow(
        config_file=INFER_CONFIG, workflow_type="infer", logging_file=False,
        dataset_dir=str(train_cohort / "images"), output_dir=str(tmp_path), ckpt_path=checkpoint,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    meta = json.loads(open(META).read())
    outputs = _checkpoint_network(checkpoint)(torch.zeros(1, 1, 64, 64, 16)).shape[1]  # logits, severity, bins' logits
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == outputs == 54

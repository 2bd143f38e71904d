"""The training bundle: a real two-epoch run, its outputs, the bundle checks, and the pieces it is made of."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG, run_bundle

from monai_mtl.cohort import SPLIT_KEYS, stratified_split
from monai_mtl.handlers import GradientClipHandler
from monai_mtl.losses import MultiTaskLoss
from monai_mtl.synthetic import CohortConfig, generate_cohort

SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"


def _scalars(run_dir: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


def test_training_run_writes_checkpoint_split_metrics_and_events(trained_run, train_cohort):
    assert (trained_run / "model.pt").is_file()
    state = torch.load(trained_run / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state)  # a bare state dict (ignite saves a single object so)

    split = json.loads((trained_run / "split.json").read_text())
    labels = pd.read_csv(train_cohort / "labels.csv")
    parts = [set(split[k]) for k in SPLIT_KEYS]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(labels)  # disjoint, and covers the cohort

    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    assert metrics["n"] == len(split["test"])
    assert set(metrics["per_class"]) == {"non_responder", "partial_responder", "responder"}
    assert np.asarray(metrics["confusion_matrix"]).sum() == len(split["test"])

    # the metrics are those of the written predictions, whose labels are the cohort's
    predictions = pd.read_csv(trained_run / "test_predictions.csv")
    assert sorted(predictions["subject_id"]) == sorted(split["test"])
    truth = labels.set_index("subject_id").loc[predictions["subject_id"]]
    assert predictions["true_response"].tolist() == truth["response"].tolist()
    np.testing.assert_allclose(predictions["true_severity"], truth["severity"], atol=1e-4)
    assert (predictions["pred_response"] == predictions["true_response"]).mean() == pytest.approx(metrics["accuracy"])
    recomputed = (predictions["true_severity"] - predictions["pred_severity"]).abs().mean()
    assert recomputed == pytest.approx(metrics["severity_mae"], rel=1e-4)
    low, high = metrics["bootstrap_95"]["severity_mae"]
    assert low <= metrics["severity_mae"] <= high

    # model.pt is the last validated epoch (checkpoint_selection "last"), with its score, and knows the split
    from monai_mtl.checkpoints import read_run_metadata
    from monai_mtl.evaluation import read_scalars

    stored = read_run_metadata(trained_run / "model.pt")
    scores = dict(read_scalars(trained_run / "tensorboard")["val_score"])
    assert stored["selection"] == "last" and stored["epoch"] == max(scores) == 2
    assert stored["metric"] == pytest.approx(scores[2])
    assert stored["split"] == {k: split[k] for k in SPLIT_KEYS}

    scalars, images = _scalars(trained_run)
    expected = {
        "train_loss", "train_loss_response", "train_loss_severity", "train_accuracy", "train_severity_mae",
        "learning_rate", "val_loss", "val_accuracy", "val_f1_macro", "val_severity_mae", "val_score",
    }
    assert expected <= scalars, expected - scalars
    assert "val_input_axial_slice" in images

    # the machine it trained on, for its wall time and its last digits (one sitting: it was not resumed elsewhere)
    from monai_mtl.run_folder import describe_machine, run_machines

    sittings = json.loads((trained_run / "environment.json").read_text())["sittings"]
    assert len(sittings) == 1 and sittings[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {k: v for k, v in sittings[0].items() if k != "started"} == describe_machine()
    threads = "" if torch.get_num_threads() == os.cpu_count() else f", {torch.get_num_threads()} torch thread"
    assert run_machines(trained_run)[0].startswith(f"{os.cpu_count()} CPU cores ({sittings[0]['cpu']}, "
                                                   f"{sittings[0]['cpu_capability']}){threads}")
    assert run_machines(trained_run)[0].endswith(f"torch {torch.__version__}, Python {platform.python_version()}")


def test_a_run_resumed_on_another_machine_lists_both_and_one_resumed_where_it_began_one(tmp_path, monkeypatch):
    from monai_mtl import run_folder

    run_folder.record_environment(tmp_path)
    run_folder.record_environment(tmp_path)  # the same machine again: nothing added
    assert len(json.loads((tmp_path / "environment.json").read_text())["sittings"]) == 1
    here = run_folder.describe_machine()
    elsewhere = {**here, "cpu": "another CPU", "cpu_capability": "ANOTHER_ISA", "cpu_cores": 96, "torch_threads": 96}
    monkeypatch.setattr(run_folder, "describe_machine", lambda device=None: elsewhere)
    run_folder.record_environment(tmp_path)
    assert run_folder.run_machines(tmp_path) == [run_folder.machine_label(here), run_folder.machine_label(elsewhere)]
    assert run_folder.machine_label(elsewhere).startswith("96 CPU cores (another CPU, ANOTHER_ISA), torch ")
    # a run given fewer threads than cores (cv --jobs) says so: its time and last digits are those of that many
    assert run_folder.machine_label({**elsewhere, "torch_threads": 1}).startswith(
        "96 CPU cores (another CPU, ANOTHER_ISA), 1 torch thread, torch ")
    assert ", 48 torch threads, " in run_folder.machine_label({**elsewhere, "torch_threads": 48})
    assert run_folder.run_machines(tmp_path / "elsewhere") is None  # a run made before machines were recorded


def test_check_properties_is_empty(train_cohort, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=TRAIN_CONFIG, workflow_type="train", logging_file=False,
        dataset_dir=str(train_cohort), output_dir=str(tmp_path), validate_images=False,
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_metadata_validates_offline_against_the_schema():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(BUNDLE_CONFIGS / "metadata.json"), filepath=str(SCHEMA))  # raises when invalid


def test_focal_loss_equals_hand_computed_value():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    severity = torch.tensor([0.3, 0.8])
    target = {"response": torch.tensor([0, 2]), "severity": torch.tensor([0.5, 0.6])}
    loss = MultiTaskLoss(response_weight=0.6, severity_weight=0.4, focal_alpha=0.25, focal_gamma=2.0)
    value = loss(torch.cat([logits, severity[:, None]], dim=1), target)

    p_true = torch.softmax(logits, dim=1)[torch.arange(2), target["response"]]
    focal = (-0.25 * (1 - p_true) ** 2 * torch.log(p_true)).mean()  # summed over classes = the true class's term
    mse = ((severity - target["severity"]) ** 2).mean()
    assert loss.last_components["loss_response"] == pytest.approx(float(focal), rel=1e-6)
    assert loss.last_components["loss_severity"] == pytest.approx(float(mse), rel=1e-6)
    assert float(value) == pytest.approx(float(0.6 * focal + 0.4 * mse), rel=1e-6)


def test_gradient_clipping_bounds_the_norm():
    net = torch.nn.Linear(10, 4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(torch.randn(8, 10)) * 1000).pow(2).sum().backward()
    engine = SimpleNamespace(optimizer=optimizer, state=SimpleNamespace(output={}), amp=False, scaler=None)
    GradientClipHandler(max_norm=1.0)(engine)
    total = torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert float(engine.state.output["grad_norm"]) > 10.0  # it was large before
    assert float(total) == pytest.approx(1.0, rel=1e-4)


def test_gradient_clipping_under_amp_unscales_first_and_steps_once():
    """With a GradScaler the clip must act on the true gradients, and step() must not unscale them again."""
    torch.manual_seed(0)
    net = torch.nn.Linear(10, 4)
    reference = torch.nn.Linear(10, 4)
    reference.load_state_dict(net.state_dict())
    x = torch.randn(8, 10)

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale((net(x) * 1000).pow(2).sum()).backward()
    engine = SimpleNamespace(optimizer=optimizer, state=SimpleNamespace(output={}), amp=True, scaler=scaler)
    GradientClipHandler(max_norm=1.0)(engine)
    total = torch.norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)  # clipped in true (unscaled) units
    scaler.step(optimizer)
    scaler.update()

    # the same step without AMP: identical weights afterwards
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    (reference(x) * 1000).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    ref_optimizer.step()
    for a, b in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(engine.state.output["grad_norm"]) > 10.0  # the recorded norm is the true one, before clipping
    assert float(engine.state.output["grad_norm"]) < 1e9


def test_split_is_stratified_and_disjoint():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"subject_id": [f"s{i}" for i in range(400)], "response": rng.choice(3, 400, p=[0.26, 0.5, 0.24])})
    split = stratified_split(table, 0.15, 0.15, seed=1)
    assert stratified_split(table, 0.15, 0.15, seed=1) == split  # seeded
    parts = [set(split[k]) for k in SPLIT_KEYS]
    assert sum(map(len, parts)) == 400 and len(set().union(*parts)) == 400
    assert len(split["test"]) == 60
    overall = table["response"].value_counts(normalize=True).sort_index()
    by_id = table.set_index("subject_id")["response"]
    for key in SPLIT_KEYS:
        share = by_id.loc[split[key]].value_counts(normalize=True).sort_index()
        np.testing.assert_allclose(share, overall, atol=0.04)


@pytest.mark.slow
def test_a_cohort_of_another_shape_spacing_orientation_and_dtype_trains(tmp_path):
    """48 x 40 x 20 voxels at 3.3 x 4.8 x 6.4 mm, int16, stored in LPS: the defaults bring it to the model's grid."""
    source = tmp_path / "source"
    labels = generate_cohort(
        source, CohortConfig(num_samples=40, seed=5, shape=(48, 40, 20), spacing_mm=(3.3, 4.8, 6.4)), progress=False
    )
    cohort = tmp_path / "lps_int16"
    (cohort / "scans").mkdir(parents=True)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i, row in labels.iterrows():
        image = nib.load(source / row["image"])
        data = np.asarray(image.dataobj)[::-1, ::-1, :]  # RAS -> LPS voxel order
        flipped = np.eye(4)
        flipped[:3, 3] = (np.asarray(data.shape) - 1) * [1, 1, 0]
        affine = image.affine @ flipped @ flip
        nib.save(nib.Nifti1Image((data * 1000).astype(np.int16), affine), cohort / "scans" / f"s{i}.nii")
        labels.loc[i, "image"] = f"scans/s{i}.nii"
    assert nib.aff2axcodes(nib.load(cohort / "scans/s0.nii").affine) == ("L", "P", "S")
    labels.drop(columns=["response_name"]).to_csv(cohort / "labels.csv", index=False)

    out = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(cohort), output_dir=str(out), max_epochs=1, batch_size=8, cache_workers=1)
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["n"] == len(json.loads((out / "split.json").read_text())["test"])


def test_severity_loss_choices_are_the_mean_absolute_error_and_huber():
    from monai_mtl.errors import ConfigError

    pred = torch.tensor([[0.0, 0.0, 0.0, 0.30], [0.0, 0.0, 0.0, 0.90]])
    target = {"response": torch.tensor([0, 1]), "severity": torch.tensor([0.50, 0.88])}
    l1 = MultiTaskLoss(severity_loss="l1")
    l1(pred, target)
    assert l1.last_components["loss_severity"] == pytest.approx((0.20 + 0.02) / 2, rel=1e-5)
    huber = MultiTaskLoss(severity_loss="huber", huber_delta=0.05)  # quadratic below 5 points, linear above
    huber(pred, target)
    assert huber.last_components["loss_severity"] == pytest.approx((0.05 * (0.20 - 0.025) + 0.5 * 0.02**2) / 2, rel=1e-5)
    with pytest.raises(ConfigError, match="severity_loss must be one of"):
        MultiTaskLoss(severity_loss="cubic")

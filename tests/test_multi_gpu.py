"""The multi-GPU override, run with torchrun on CPU (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE_CONFIGS, TRAIN_CONFIG

from monai_mtl.cohort import read_labels, to_datalist
from monai_mtl.metrics import epoch_scores, pack_targets
from monai_mtl.checkpoints import read_run_metadata
from monai_mtl.networks import build_network


def _single_process_scores(checkpoint, cohort, subject_ids):
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    from monai_mtl.transforms import Preprocessing

    # validate#preprocessing is the preprocessing the checkpoint stores (parsing it from train.json would fit it:
    # its landmarks read the training part of the configured cohort)
    transform = Compose(Preprocessing.from_dict(read_run_metadata(checkpoint)["preprocessing"]).transforms(severity_key="severity"))
    data = to_datalist(read_labels(cohort / "labels.csv"), subject_ids)
    net = build_network(read_run_metadata(checkpoint)["network"])  # the network the checkpoint says it was trained as
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    preds, targets = [], []
    with torch.no_grad():
        for batch in DataLoader(Dataset(data, transform), batch_size=16):
            preds.append(net(torch.as_tensor(batch["image"])))
            targets.append(pack_targets({"response": batch["response"], "severity": batch["severity"]}))
    return epoch_scores(torch.cat(preds), torch.cat(targets))


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(train_cohort, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", str([TRAIN_CONFIG, str(BUNDLE_CONFIGS / "multi_gpu_train.json")]),
        "--dataset_dir", str(train_cohort), "--output_dir", str(out), "--max_epochs", "2", "--batch_size", "8",
        "--cache_workers", "1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    # one process wrote the checkpoint, the split, the test results and one event file
    assert sorted(p.name for p in out.iterdir()) == [
        "environment.json", "model.pt", "run_settings.json", "split.json", "tensorboard", "test_metrics.json",
        "test_predictions.csv", "training_state.pt",
    ]  # and no lock left behind
    assert len(list((out / "tensorboard").iterdir())) == 1
    # the machine as one sitting of two processes
    sittings = json.loads((out / "environment.json").read_text())["sittings"]
    assert len(sittings) == 1 and sittings[0]["processes"] == 2

    from monai_mtl.evaluation import read_scalars

    scalars = read_scalars(out / "tensorboard")
    from monai_mtl.checkpoints import read_run_metadata

    saved_epoch = read_run_metadata(out / "model.pt")["epoch"]  # the last epoch (checkpoint_selection "last")
    logged = {name: dict(scalars[f"val_{name}"])[saved_epoch] for name in ("accuracy", "severity_mae", "score")}
    split = json.loads((out / "split.json").read_text())
    recomputed = _single_process_scores(out / "model.pt", train_cohort, split["validation"])
    for name, value in logged.items():
        assert recomputed[name] == pytest.approx(value, abs=1e-4), (name, recomputed, logged)
    assert np.isfinite(json.loads((out / "test_metrics.json").read_text())["severity_mae"])

"""Which simulated lower resolution looks, to a trained model, like a scan made on a coarser grid?

Predicts one part (default: validation) of a run's split four ways through the run's checkpoint and its stored
preprocessing: the scans as they are, the same subjects re-rendered by the generator on a coarser grid with the same
field of view (what a scanner with larger voxels hands over), and the scans taken down to that grid and back up by
MONAI's ``RandSimulateLowResolution`` with each ``downsample_mode`` the training augmentation can use
(``scanner_augmentation#downsample_mode``). Prints accuracy, MAE and the mean severity error (predicted - true) per
variant: the simulation whose error is closest to the real grid's is the one to train with. docs/experiments.md,
"The simulated lower resolution made like a scanner's", quotes its output:

    python docs/scripts/low_resolution_diagnosis.py data/synthetic runs/cv/fold_1 48 48 12
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from monai.transforms import RandSimulateLowResolution

from monai_mtl.cohort import read_cohort, to_datalist
from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.robustness import regrid_subjects
from monai_mtl.transforms import DOWNSAMPLE_MODES


def summary(name: str, table: pd.DataFrame) -> dict:
    error = table["pred_severity"].to_numpy() - table["true_severity"].to_numpy()
    return {"variant": name, "accuracy": float((table["pred_response"] == table["true_response"]).mean()),
            "severity_mae": float(np.abs(error).mean()), "mean_error": float(error.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir", help="the single-site synthetic cohort the run was trained on")
    parser.add_argument("run_dir", help="a training run folder (model.pt, split.json)")
    parser.add_argument("shape", type=int, nargs=3, help="the coarser grid, e.g. 48 48 12")
    parser.add_argument("--part", default="validation", choices=("validation", "test"))
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    subject_ids = json.loads((run_dir / "split.json").read_text())[args.part]
    model = CheckpointPredictor(run_dir / "model.pt")
    native_shape = model.preprocessing.spatial_size
    # one zoom for all three axes when the coarser grid keeps the field of view's proportions (48/64 = 12/16)
    zoom = float(np.mean(np.asarray(args.shape) / np.asarray(native_shape)))
    datalist = to_datalist(read_cohort(args.dataset_dir), subject_ids)
    rows = [summary("as scanned", model.predict(datalist))]
    with tempfile.TemporaryDirectory(prefix="regrid-") as tmp:
        records = regrid_subjects(args.dataset_dir, subject_ids, args.shape, tmp)
        rows.append(summary(f"re-rendered on {'x'.join(map(str, args.shape))}", model.predict(records)))
    for mode in DOWNSAMPLE_MODES:
        # the loaded scan is on the cohort's grid, the network's: what the training augmentation sees
        simulate = RandSimulateLowResolution(prob=1.0, zoom_range=(zoom, zoom), downsample_mode=mode)
        rows.append(summary(f"simulated, zoom {zoom:.2f}, {mode}",
                            model.predict(datalist, [lambda d, f=simulate: {**d, "image": f(d["image"])}])))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

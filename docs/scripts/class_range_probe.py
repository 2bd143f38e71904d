"""The predicted class's severity band as a constraint: each predicted severity clipped to the range of the training
part's severities of the predicted class, on a CV's validation parts.

``python docs/scripts/class_range_probe.py CV_DIR [FOLD ...]``: per fold, the checkpoint's predictions of its validation
part (as inference makes them: its shift averaging and temperature), MAE as predicted and clipped
(docs/experiments.md, session 31).
"""
import json
import sys
from pathlib import Path

import numpy as np

import monai_mtl.evaluation as ev
from monai_mtl.cohort import to_datalist
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir


def main() -> None:
    cv = Path(sys.argv[1])
    folds = sys.argv[2:] or sorted(p.name.split("_")[1] for p in cv.glob("fold_*") if p.is_dir())
    for fold in folds:
        run = cv / f"fold_{fold}"
        table = read_run_cohort(run, run_dataset_dir(run))
        split = json.loads((run / "split.json").read_text())
        train = table.set_index("subject_id").loc[split["train"]]
        bands = train.groupby("response")["severity"].agg(["min", "max"])
        predictor = ev.CheckpointPredictor(run / "model.pt")
        p = predictor.predict(predictor.with_covariates(to_datalist(table, split["validation"]), table))
        low = bands["min"].reindex(p["pred_response"]).to_numpy()
        high = bands["max"].reindex(p["pred_response"]).to_numpy()
        clipped = np.clip(p["pred_severity"].to_numpy(), low, high)
        err = np.abs(p["pred_severity"] - p["true_severity"]).mean()
        err_clipped = np.abs(clipped - p["true_severity"]).mean()
        moved = np.mean(clipped != p["pred_severity"].to_numpy())
        print(f"fold {fold}: accuracy {np.mean(p['pred_response'] == p['true_response']):.4f}; MAE {err:.3f} -> clipped "
              f"{err_clipped:.3f} ({err_clipped - err:+.3f}); {moved:.1%} of the scans moved; bands "
              f"{bands.round(2).to_dict('index')}", flush=True)


if __name__ == "__main__":
    main()

"""How much would averaging several trainings of the default recipe gain? The CV's fold models on a fresh cohort.

Usage: ``python docs/scripts/ensemble_probe.py CV_DIR DATASET`` (e.g. ``runs/cv data/fresh_seed7``, the cohort made by
``python -m monai_mtl generate --output data/fresh_seed7 --num-samples 300 --seed 7``: subjects none of the models saw).
Each fold's checkpoint (``CV_DIR/fold_K/model.pt``, its own preprocessing and temperature) predicts every scan of
``DATASET``; the script prints each model's accuracy and severity MAE, then those of the average of k models (class
probabilities and severities averaged; every subset of k models, mean over the subsets), k = 1 .. the number of folds, and the accuracy's information limit on ``DATASET`` (:func:`monai_mtl.floor.response_limit`).
For fused models, each model's accuracy on the subjects whose value of a covariate is missing (one line per such column).
The spread between trainings of one recipe is what an average removes; docs/experiments.md quotes it.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from monai_mtl.cohort import read_cohort, to_datalist
from monai_mtl.covariates import stored_covariates
from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.floor import response_limit
from monai_mtl.outputs import PROBABILITY_COLUMNS


def main() -> None:
    cv_dir, dataset = Path(sys.argv[1]), Path(sys.argv[2])
    table = read_cohort(dataset)
    runs = sorted(cv_dir.glob("fold_*/model.pt"))
    models = [CheckpointPredictor(path) for path in runs]
    predictions = [model.predict(model.with_covariates(to_datalist(table), table)) for model in models]
    truth = predictions[0][["true_response", "true_severity"]].to_numpy()
    probabilities = np.stack([p[list(PROBABILITY_COLUMNS)].to_numpy() for p in predictions])
    severities = np.stack([p["pred_severity"].to_numpy() for p in predictions])
    for path, p in zip(runs, predictions):
        print(f"{path.parent.name}: accuracy {np.mean(p['pred_response'] == p['true_response']):.4f}, "
              f"severity MAE {np.mean(np.abs(p['pred_severity'] - p['true_severity'])):.2f}")
    encoding = stored_covariates(runs[0])
    for column in encoding.columns if encoding is not None else []:
        missing = table[column].isna().to_numpy()
        if missing.any():
            right = [int(np.sum((p["pred_response"] == p["true_response"]).to_numpy()[missing])) for p in predictions]
            print(f"subjects without {column} ({missing.sum()}): right per model {right}, accuracy "
                  f"{np.mean(right) / missing.sum():.4f}")
    rows = []
    for k in range(1, len(runs) + 1):
        accuracy, mae = [], []
        for subset in itertools.combinations(range(len(runs)), k):
            subset = list(subset)
            accuracy.append(np.mean(probabilities[subset].mean(axis=0).argmax(axis=1) == truth[:, 0]))
            mae.append(np.mean(np.abs(severities[subset].mean(axis=0) - truth[:, 1])))
        rows.append({"models averaged": k, "subsets": len(mae), "accuracy": np.mean(accuracy),
                     "severity MAE": np.mean(mae), "MAE range": f"{min(mae):.2f}-{max(mae):.2f}"})
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    description = json.loads((dataset / "cohort.json").read_text())
    limit = response_limit(description, table.set_index("subject_id", drop=False), list(table["subject_id"]))
    print(f"information limit of the accuracy (an observer who knows the scan's class, the covariates and the rule): "
          f"{np.mean(limit['limit_response'] == limit['true_response']):.4f}")


if __name__ == "__main__":
    main()

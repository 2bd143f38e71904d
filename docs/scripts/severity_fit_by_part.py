"""A run's checkpoint on each part of its split: does the network underfit the severity, and where in the range?

Usage: ``python docs/scripts/severity_fit_by_part.py RUN [DATASET]`` (default dataset ``data/synthetic``). The stored
checkpoint predicts its training, validation and test parts (no augmentation: the scans as they are); it prints each
part's accuracy and severity MAE, then the mean error (predicted minus true) and MAE per band of the true severity. A
training MAE close to the validation MAE says the network underfits rather than overfits; a mean error that rises
at the low end of each class's band and falls at its high end says the estimate is pulled towards the class's
middle. docs/experiments.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from monai_mtl.cohort import read_cohort, to_datalist
from monai_mtl.evaluation import CheckpointPredictor, report_from_predictions

BANDS = [0, 10, 25, 35, 45, 55, 65, 75, 90, 100]  # the classes' edges (35, 65) are band edges


def main() -> None:
    run = Path(sys.argv[1])
    dataset = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("data/synthetic")
    table = read_cohort(dataset)
    split = json.loads((run / "split.json").read_text())
    model = CheckpointPredictor(run / "model.pt")
    by_band = {}
    for part in ("train", "validation", "test"):
        predictions = model.predict(to_datalist(table, split[part]))
        report = report_from_predictions(predictions)
        print(f"{part}: n {len(predictions)}, accuracy {report['accuracy']:.4f}, severity MAE {report['severity_mae']:.2f}")
        error = predictions["pred_severity"] - predictions["true_severity"]
        band = pd.cut(predictions["true_severity"], BANDS, include_lowest=True)
        by_band[part] = pd.DataFrame({"mean error": error, "MAE": error.abs()}).groupby(band, observed=True).mean()
    print(pd.concat(by_band, axis=1).round(2).to_string())


if __name__ == "__main__":
    main()

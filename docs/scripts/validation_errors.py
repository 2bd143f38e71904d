"""The misclassified scans of a CV fold's validation part: true class, predicted class, true severity.

``python docs/scripts/validation_errors.py CV_DIR FOLD [CV_DIR ...]``: each CV's fold-FOLD checkpoint predicts its
validation part, averaged over the scan and train.json's four one-voxel moves (as ``shift_averaging_probe.py``'s
"averaged"), and every wrong class is listed with the true severity, so errors at the classes' severity cut-offs
(35 and 65 on the synthetic cohort: docs/synthetic_cohort.md) stand out.
"""
import json
import sys
from pathlib import Path

import numpy as np
from shift_averaging_probe import SHIFTS  # train.json's moves: the probe beside this script reads them

import monai_mtl.evaluation as ev
from monai_mtl.cohort import to_datalist
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir


def main() -> None:
    *cvs, fold = sys.argv[1:]
    ev.calibrated_shifts = lambda checkpoint: SHIFTS  # the default's moves, whatever the checkpoint was calibrated with
    for cv in cvs:
        run = Path(cv) / f"fold_{fold}"
        table = read_run_cohort(run, run_dataset_dir(run))
        ids = json.loads((run / "split.json").read_text())["validation"]
        predictor = ev.CheckpointPredictor(run / "model.pt")
        p = predictor.predict(predictor.with_covariates(to_datalist(table, ids), table))
        wrong = np.flatnonzero(p["pred_response"] != p["true_response"])
        cells = ", ".join(f"{int(p['true_response'][i])}->{int(p['pred_response'][i])} at {float(p['true_severity'][i]):.1f}"
                          for i in sorted(wrong, key=lambda i: float(p["true_severity"][i])))
        print(f"{cv} fold {fold}: {len(wrong)} of {len(ids)} wrong (true->predicted class at true severity): {cells}", flush=True)


if __name__ == "__main__":
    main()

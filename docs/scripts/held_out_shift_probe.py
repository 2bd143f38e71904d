"""Shift averaging (``test_time_shifts``) on the held-out sites of a leave-one-site-out run, plain and adapted.

``python docs/scripts/held_out_shift_probe.py LOSO_DIR``: for each ``site_K/model.pt``, the held-out site's scans (the
run's test part) predicted in one pass and averaged over train.json's four one-voxel moves, as the checkpoint comes and
after the batch-norm adaptation of inference's ``adapt_batchnorm`` (docs/experiments.md, session 31). The probe sets
the moves whatever the checkpoint was calibrated with, as ``shift_averaging_probe.py`` does.
"""
import json
import sys
from pathlib import Path

import numpy as np

import monai_mtl.evaluation as ev
from monai_mtl.cohort import to_datalist
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir

SHIFTS = json.loads((Path(__file__).parents[2] / "bundle" / "configs" / "train.json").read_text())["test_time_shifts"]


def main() -> None:
    loso = Path(sys.argv[1])
    totals = {}
    for run in sorted(p for p in loso.glob("site_*") if p.is_dir()):
        table = read_run_cohort(run, run_dataset_dir(run))
        ids = json.loads((run / "split.json").read_text())["test"]
        line = []
        for kind, shifts in (("one pass", []), ("averaged", SHIFTS)):
            ev.calibrated_shifts = lambda checkpoint, s=shifts: s
            for adapted in (False, True):
                predictor = ev.CheckpointPredictor(run / "model.pt")
                records = predictor.with_covariates(to_datalist(table, ids), table)
                if adapted:
                    predictor.adapt_batchnorm(records)
                p = predictor.predict(records)
                acc = float(np.mean(p["pred_response"] == p["true_response"]))
                mae = float(np.mean(np.abs(p["pred_severity"] - p["true_severity"])))
                key = f"{kind}{', adapted' if adapted else ''}"
                totals.setdefault(key, []).append((acc, mae))
                line.append(f"{key} {acc:.4f} / {mae:.3f}")
        print(f"{run.name} (n {len(ids)}): " + "; ".join(line), flush=True)
    for key, values in totals.items():
        acc, mae = np.mean(values, axis=0)
        print(f"mean {key}: {acc:.4f} / {mae:.3f}")


if __name__ == "__main__":
    main()

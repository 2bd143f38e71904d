"""Shift averaging (``test_time_shifts``) on a CV's validation parts, clean and re-rendered on other grids.

``python docs/scripts/shift_averaging_probe.py CV_DIR [FOLD ...] [--clean-only] [--sets NAME ...]``: for each fold's checkpoint, the validation part
predicted in one pass and averaged over the scan and the four one-voxel moves along x and y (the logits and severities
averaged as ``monai_mtl.engines.ShiftAveragingInferer`` does, then the checkpoint's temperature), on the cohort's own
grid and on 80 x 72 x 24, 48 x 48 x 12 and 128 x 128 x 32 (same field of view; ``--clean-only``: the cohort's grid only). The checkpoints need not have been
calibrated with the moves: the probe sets them (docs/experiments.md, "Shift averaging"). ``--sets`` compares other
sets of moves (:data:`SHIFT_SETS`) with these (docs/experiments.md, "More moves at test time").
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import monai_mtl.evaluation as ev
from monai_mtl.cohort import to_datalist
from monai_mtl.robustness import regrid_subjects
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir

#: train.json's default ``test_time_shifts``
SHIFTS = json.loads((Path(__file__).parents[2] / "bundle" / "configs" / "train.json").read_text())["test_time_shifts"]
GRIDS = ((80, 72, 24), (48, 48, 12), (128, 128, 32), None)  # None: the cohort's own grid
#: the sets ``--sets`` can name: none (one pass), the default, and larger ones (every in-plane neighbour; every phase of
#: a stride of 4 in-plane; one slice up and down)
SHIFT_SETS = {
    "one_pass": [],
    "default": SHIFTS,
    "diagonal8": SHIFTS + [[1, 1, 0], [1, -1, 0], [-1, 1, 0], [-1, -1, 0]],
    "phase15": [[dx, dy, 0] for dx in (-1, 0, 1, 2) for dy in (-1, 0, 1, 2) if dx or dy],
    "z6": SHIFTS + [[0, 0, 1], [0, 0, -1]],
}


def main() -> None:
    argv = sys.argv[1:]
    names = ["one_pass", "default"]
    if "--sets" in argv:  # the names after it, up to the next option
        at = argv.index("--sets")
        names = [a for a in argv[at + 1:] if not a.startswith("--")]
        argv = argv[:at] + argv[at + 1 + len(names):]
    args = [a for a in argv if a != "--clean-only"]
    grids = (None,) if "--clean-only" in argv else GRIDS
    cv = Path(args[0])
    folds = args[1:] or sorted(p.name.split("_")[1] for p in cv.glob("fold_*") if p.is_dir())
    with tempfile.TemporaryDirectory() as tmp:
        for fold in folds:
            run = cv / f"fold_{fold}"
            cohort = run_dataset_dir(run)  # the cohort the fold was trained on (a fused model's covariates too)
            table = read_run_cohort(run, cohort)
            ids = json.loads((run / "split.json").read_text())["validation"]
            for shape in grids:
                name = "x".join(map(str, shape)) if shape else "clean"
                records = to_datalist(table, ids) if shape is None else regrid_subjects(cohort, ids, shape, Path(tmp) / f"{fold}_{name}")
                out = {}
                for kind, shifts in ((name, SHIFT_SETS[name]) for name in names):
                    ev.calibrated_shifts = lambda checkpoint, s=shifts: s  # the predictor's moves, whatever it was calibrated with
                    predictor = ev.CheckpointPredictor(run / "model.pt")
                    p = predictor.predict(predictor.with_covariates(records, table))
                    out[kind] = f"{np.mean(p['pred_response'] == p['true_response']):.4f} / {np.mean(np.abs(p['pred_severity'] - p['true_severity'])):.3f}"
                print(f"fold {fold} {name}: " + "; ".join(f"{kind} {value}" for kind, value in out.items()), flush=True)


if __name__ == "__main__":
    main()

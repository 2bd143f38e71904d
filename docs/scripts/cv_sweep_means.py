"""A CV's per-fold robustness sweeps summed up: each row's accuracy and MAE as the mean over the folds.

``python docs/scripts/cv_sweep_means.py CV_DIR [CV_DIR ...] [--sweep robustness_motion]``: reads
``CV_DIR/fold_K/<sweep>/robustness.csv`` (written by ``python -m monai_mtl robustness --run CV_DIR/fold_K --part validation
... --output-dir CV_DIR/fold_K/<sweep>``) for every fold and prints the mean per kind and strength, then the clean row's
figures per fold (docs/experiments.md, "Motion ghosting at 0.1 and 0.05").
"""
import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dirs", nargs="+", type=Path)
    parser.add_argument("--sweep", default="robustness_motion", help="each fold's sweep folder")
    args = parser.parse_args()
    for cv in args.cv_dirs:
        folds = sorted(p for p in cv.glob("fold_*") if (p / args.sweep / "robustness.csv").is_file())
        tables = [pd.read_csv(f / args.sweep / "robustness.csv").assign(fold=f.name) for f in folds]
        table = pd.concat(tables)
        table["strength"] = table["strength"].astype(object).fillna("—")  # the clean row has none
        means = table.groupby(["kind", "strength"], sort=False)[["accuracy", "severity_mae"]].mean()
        means["accuracy"] *= 100
        print(f"{cv} ({len(folds)} folds), mean accuracy (%) and severity MAE:\n{means.round(3).to_string()}")
        clean = table[table["kind"] == "clean"].set_index("fold")
        print("clean, per fold: MAE", clean["severity_mae"].round(3).tolist(), "accuracy", (clean["accuracy"] * 100).round(2).tolist())


if __name__ == "__main__":
    main()

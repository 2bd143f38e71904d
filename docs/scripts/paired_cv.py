"""Two cross-validations of the same folds, paired by fold: the candidate minus the reference, validation and test.

Reads each folder's ``cv_folds.csv`` (written by ``python -m monai_mtl cv``: the test part's figures and the validation
part's at the checkpoint, ``val_accuracy`` / ``val_severity_mae``) and prints, per fold and as mean ± std of the paired
difference, how far the candidate moves each figure and in how many folds it is at least as good. Choosing between
recipes reads the validation rows; the test rows are read once, after the choice. With ``--sweeps NAME`` it compares
instead each fold's robustness sweep ``fold_K/NAME/robustness.csv`` (``python -m monai_mtl robustness --run CV/fold_K
--part validation --output-dir CV/fold_K/NAME``): per condition the mean accuracy (lowest model's), mean MAE, mean MAE
above the clean scans and how many models exceed it by more than 1.0. docs/experiments.md quotes it:

    python docs/scripts/paired_cv.py runs/cv_nearest runs/cv                          # downsample_mode nearest -> area
    python docs/scripts/paired_cv.py runs/cv_nearest runs/cv --sweeps robustness_validation
    python docs/scripts/paired_cv.py runs/sel15_mm_current runs/sel15_mm_cosine       # the fused model's schedule
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from monai_mtl.errors import CohortError

#: (column, label, whether higher is better, scale for printing)
FIGURES = (("val_accuracy", "validation accuracy (%)", True, 100.0), ("val_severity_mae", "validation MAE", False, 1.0),
           ("accuracy", "test accuracy (%)", True, 100.0), ("severity_mae", "test MAE", False, 1.0))


def read_folds(cv_dir: Path) -> pd.DataFrame:
    path = cv_dir / "cv_folds.csv"
    if not path.is_file():
        raise CohortError(f"{path}: not found (expected a finished `python -m monai_mtl cv` folder)")
    return pd.read_csv(path).set_index("fold").sort_index()


def sweep_summary(cv_dir: Path, folds, name: str) -> pd.DataFrame:
    """Per sweep condition over the folds' models: mean and lowest accuracy, mean MAE, excess over clean, models above 1.0."""
    rows = []
    for fold in folds:
        path = cv_dir / f"fold_{fold}" / name / "robustness.csv"
        if not path.is_file():
            raise CohortError(f"{path}: not found (run `python -m monai_mtl robustness --run {cv_dir}/fold_{fold} "
                              f"--part validation --output-dir {path.parent}`)")
        table = pd.read_csv(path, keep_default_na=False)
        clean = float(table.loc[table["kind"] == "clean", "severity_mae"].iloc[0])
        for row in table.itertuples():
            rows.append({"condition": f"{row.kind} {row.strength}".strip(), "accuracy": row.accuracy,
                         "severity_mae": row.severity_mae, "excess": row.severity_mae - clean})
    frame = pd.DataFrame(rows)
    order = list(dict.fromkeys(frame["condition"]))
    summary = frame.groupby("condition", sort=False).agg(
        accuracy=("accuracy", "mean"), lowest=("accuracy", "min"), mae=("severity_mae", "mean"), excess=("excess", "mean"),
        above_1=("excess", lambda e: int((e > 1.0).sum())))
    return summary.loc[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="CV folder of the current recipe")
    parser.add_argument("candidate", type=Path, help="CV folder of the candidate, the same folds")
    parser.add_argument("--sweeps", metavar="NAME", help="compare the folds' robustness sweeps in fold_K/NAME instead")
    args = parser.parse_args()
    reference, candidate = read_folds(args.reference), read_folds(args.candidate)
    if list(reference.index) != list(candidate.index) or not reference["n"].equals(candidate["n"]):
        raise CohortError(f"{args.reference} and {args.candidate} do not hold the same folds")
    if args.sweeps:
        both = pd.concat({str(d): sweep_summary(d, reference.index, args.sweeps) for d in (args.reference, args.candidate)},
                         axis=1)
        print(both.to_string(float_format=lambda v: f"{v:.3f}"))
        return
    rows = []
    for column, label, higher_better, scale in FIGURES:
        difference = (candidate[column] - reference[column]) * scale
        at_least_as_good = (difference >= 0) if higher_better else (difference <= 0)
        rows.append({"figure": label, "reference": f"{reference[column].mean() * scale:.2f}",
                     "candidate": f"{candidate[column].mean() * scale:.2f}",
                     "candidate - reference": f"{difference.mean():+.2f} ± {difference.std(ddof=1):.2f}",
                     "folds candidate as good": f"{int(at_least_as_good.sum())}/{len(difference)}",
                     "per fold": " ".join(f"{d:+.2f}" for d in difference)})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()

"""Where a fused (imaging + covariates) cross-validation's response errors are, and a missing category marginalised.

Usage: ``python docs/scripts/fused_errors.py CV_DIR DATASET [--marginalise]`` (e.g. ``runs/cv_multimodal
data/multimodal``). Each fold's test predictions (``fold_K/test_predictions.csv``) are joined with the generator's
own account of the subject (:func:`monai_mtl.floor.response_limit`: the class the scan shows, and the class an observer
who knows it, the covariates and the rule names), and every wrong prediction gets one cause:

* ``beyond the limit``: a missing genotype hides an ultrarapid metaboliser; no model can name the class;
* ``missing genotype``: the genotype is missing, but the most likely class given the rest is the right one;
* ``other``: everything else (the scan's class misread, or the covariates' rule misapplied).

With ``--marginalise`` each fold's model also predicts its validation and test parts with every missing text
covariate replaced, in turn, by each category the training part had (missing indicator 0) and the class
probabilities averaged with the training part's category frequencies (as multiple imputation would, under missing
at random), instead of the network's own reading of the missing indicator. docs/experiments.md quotes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from monai_mtl.cohort import read_cohort, to_datalist
from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.floor import response_limit

PROBABILITIES = ["prob_non_responder", "prob_partial_responder", "prob_responder"]


def error_causes(cv_dir: Path, table: pd.DataFrame, description: dict) -> pd.DataFrame:
    rows = []
    for fold in sorted(p for p in cv_dir.glob("fold_*") if p.is_dir()):
        predictions = pd.read_csv(fold / "test_predictions.csv")
        wrong = predictions[predictions["pred_response"] != predictions["true_response"]]
        limit = response_limit(description, table, list(wrong["subject_id"])).set_index("subject_id")
        for _, row in wrong.iterrows():
            subject = row["subject_id"]
            genotype_missing = pd.isna(table.loc[subject, "genotype"])
            if limit.loc[subject, "limit_response"] != row["true_response"]:
                cause = "beyond the limit"
            elif genotype_missing:
                cause = "missing genotype"
            else:
                cause = "other"
            rows.append({"fold": fold.name, "subject_id": subject, "cause": cause,
                         "moved": bool(limit.loc[subject, "scan_response"] != row["true_response"]),
                         "severity": float(table.loc[subject, "severity"])})
    return pd.DataFrame(rows)


def marginalised_accuracy(model: CheckpointPredictor, training: pd.DataFrame,
                          rows: pd.DataFrame) -> tuple[float, float, int]:
    """(accuracy as stored, accuracy with missing text covariates marginalised, subjects with one missing) on ``rows``."""

    def predict(subset: pd.DataFrame) -> pd.DataFrame:
        subset = subset.reset_index(drop=True)
        return model.predict(model.with_covariates(to_datalist(subset), subset)).set_index("subject_id")

    stored = predict(rows)
    averaged = stored[PROBABILITIES].copy()
    touched = pd.Series(False, index=rows.index)
    for column, categories in model.covariates.categories.items():
        missing = rows[column].isna()
        if not missing.any():
            continue
        touched |= missing
        frequency = training[column].dropna().astype(str).value_counts(normalize=True)
        subset = rows[missing]
        total = np.zeros((len(subset), len(PROBABILITIES)))
        for category in categories:
            filled = subset.copy()
            filled[column] = category
            total += frequency.get(category, 0.0) * predict(filled).loc[subset.index, PROBABILITIES].to_numpy()
        averaged.loc[subset.index, PROBABILITIES] = total
    truth = stored["true_response"].to_numpy()
    return (float((stored["pred_response"].to_numpy() == truth).mean()),
            float((averaged.to_numpy().argmax(axis=1) == truth).mean()), int(touched.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--marginalise", action="store_true")
    args = parser.parse_args()
    table = read_cohort(args.dataset).set_index("subject_id", drop=False)
    description = json.loads((args.dataset / "cohort.json").read_text())

    causes = error_causes(args.cv_dir, table, description)
    print(f"{len(causes)} wrong test predictions over the folds")
    print(pd.crosstab(causes["fold"], causes["cause"], margins=True).to_string())
    print("moved by the rule among 'other':", int(causes.loc[causes["cause"] == "other", "moved"].sum()))
    edge = (causes["severity"].sub(35).abs().le(3) | causes["severity"].sub(65).abs().le(3))
    print("within 3 points of a severity band's edge among 'other':", int((edge & (causes["cause"] == "other")).sum()))
    if args.marginalise:
        results: dict[str, list[tuple[float, float]]] = {"validation": [], "test": []}
        for fold in sorted(p for p in args.cv_dir.glob("fold_*") if p.is_dir()):
            split = json.loads((fold / "split.json").read_text())
            model = CheckpointPredictor(fold / "model.pt")
            for part in results:
                stored, averaged, n = marginalised_accuracy(model, table.loc[split["train"]], table.loc[split[part]])
                results[part].append((stored, averaged))
                print(f"{fold.name} {part}: {n} with a missing category; accuracy {stored:.4f} stored, {averaged:.4f} marginalised")
        for part, pairs in results.items():
            difference = np.diff(np.asarray(pairs), axis=1)[:, 0] * 100
            print(f"{part}: marginalised - stored {difference.mean():+.2f} ± {difference.std(ddof=1):.2f} points "
                  f"(better in {int((difference > 0).sum())}, worse in {int((difference < 0).sum())} of {len(pairs)})")


if __name__ == "__main__":
    main()

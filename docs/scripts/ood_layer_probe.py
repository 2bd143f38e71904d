"""Which layer's features make an OOD flag that says when the predictions break, and stays quiet when they hold?

``python docs/scripts/ood_layer_probe.py RUN [RUN ...]`` (e.g. ``runs/cv/fold_0``): for each run's checkpoint, the
Mahalanobis OOD score of ``monai_mtl.trust`` fitted on each candidate layer's pooled features of the training part
(clean, as calibration does), its threshold at the 99% quantile of the clean validation part's scores, then the share of
the validation part flagged under each artifact of the robustness sweep (its default strengths, same seed) and on the
three other grids. Beside it, the condition's validation accuracy and MAE with the stored weights, and whether the
condition *breaks* the predictions (accuracy below 97% or MAE more than 1.0 above clean: the resolution target of
"Scans from other scanners") or *holds* them. One table per run on stdout, one row per condition, one column per layer,
and a summary: the mean share flagged where the predictions break and where they hold. Validation parts only: the
layer is chosen without the test parts (docs/experiments.md, session 30).
"""
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from ignite.engine import Events

from monai_mtl.cohort import to_datalist
from monai_mtl.evaluation import CheckpointPredictor, PredictionCollector, report_from_predictions
from monai_mtl.robustness import DEFAULT_GRIDS, DEFAULT_STRENGTHS, ArtifactScand, regrid_subjects
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir
from monai_mtl.trust import FeatureRecorder, fit_ood, ood_scores

LAYERS = ("encoder", "response_head.block", "severity_head.block", "response_head.pool", "severity_head.pool",
          "response_head.mlp.3", "severity_head.mlp.3")


def features_and_predictions(model: CheckpointPredictor, records: list[dict], acquisition=()) -> tuple[dict, pd.DataFrame]:
    """Every candidate layer's pooled features (the last forward of each batch, as calibration records them) and the
    predictions table of ``records``."""
    evaluator = model._evaluator(records, acquisition)
    collector = PredictionCollector(None)
    recorders = {layer: FeatureRecorder(model.network, layer) for layer in LAYERS}
    features = {layer: [] for layer in LAYERS}

    def keep(engine):
        collector(engine)
        for layer, recorder in recorders.items():
            features[layer].append(recorder.last.numpy())

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep)
    with ExitStack() as hooks:
        for recorder in recorders.values():
            hooks.enter_context(recorder)
        evaluator.run()
    return {layer: np.concatenate(f) for layer, f in features.items()}, collector.table()


def probe(run: Path) -> pd.DataFrame:
    cohort_dir = run_dataset_dir(run)
    table = read_run_cohort(run, cohort_dir)
    split = json.loads((run / "split.json").read_text())
    model = CheckpointPredictor(run / "model.pt")
    train_features, train_table = features_and_predictions(model, to_datalist(table, split["train"]))
    fitted = {layer: fit_ood(train_features[layer], train_table["true_response"].to_numpy()) for layer in LAYERS}
    validation = to_datalist(table, split["validation"])
    clean_features, clean = features_and_predictions(model, validation)
    thresholds = {layer: np.quantile(ood_scores(clean_features[layer], *fitted[layer]), 0.99) for layer in LAYERS}
    clean_report = report_from_predictions(clean)
    conditions = [(kind, f"{s:g}", validation, [ArtifactScand(kind, s, 0)]) for kind, values in DEFAULT_STRENGTHS.items()
                  for s in values]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        conditions += [("grid", "x".join(map(str, g)), regrid_subjects(cohort_dir, split["validation"], g, Path(tmp) / str(g)), [])
                       for g in DEFAULT_GRIDS]
        for kind, strength, records, acquisition in conditions:
            feats, predictions = features_and_predictions(model, records, acquisition)
            report = report_from_predictions(predictions)
            breaks = report["accuracy"] < 0.97 or report["severity_mae"] > clean_report["severity_mae"] + 1.0
            row = {"kind": kind, "strength": strength, "accuracy": report["accuracy"], "severity_mae": report["severity_mae"],
                   "breaks": breaks}
            row.update({layer: float((ood_scores(feats[layer], *fitted[layer]) > thresholds[layer]).mean()) for layer in LAYERS})
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    summaries = []
    for run in map(Path, sys.argv[1:]):
        result = probe(run)
        print(f"\n{run}\n" + result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        summary = result.groupby("breaks")[list(LAYERS)].mean().rename(index={True: "breaks", False: "holds"})
        summary.insert(0, "run", str(run))
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
        summaries.append(summary.reset_index())
    if len(summaries) > 1:
        print("\nmean over the runs\n" + pd.concat(summaries).groupby("breaks")[list(LAYERS)].mean().to_string(
            float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

"""Models on other grids of one split part, without and with the batch-norm adaptation (monai_mtl.adaptation).

Usage: ``python docs/scripts/adaptation_on_grids.py PART RUN [RUN ...]`` (PART: validation or test). Each run's
subjects of PART are re-rendered by the generator on the native grid and three others with the same field of view
(``monai_mtl.robustness.regrid_subjects``), predicted by the run's checkpoint as stored, then again after
``CheckpointPredictor.adapt_batchnorm`` on those same scans (the default weight). docs/experiments.md quotes it.
"""
import json, sys, tempfile
from pathlib import Path
from monai_mtl.evaluation import CheckpointPredictor, report_from_predictions
from monai_mtl.robustness import regrid_subjects

dataset = Path("data/synthetic")
part = sys.argv[1]
for run in sys.argv[2:]:
    run = Path(run)
    subjects = json.loads((run / "split.json").read_text())[part]
    for grid in [(64, 64, 16), (80, 72, 24), (48, 48, 12), (128, 128, 32)]:
        with tempfile.TemporaryDirectory() as tmp:
            datalist = regrid_subjects(dataset, subjects, grid, Path(tmp))
            p = CheckpointPredictor(run / "model.pt")
            a = report_from_predictions(p.predict(datalist))
            p.adapt_batchnorm(datalist)
            b = report_from_predictions(p.predict(datalist))
        print(run.name, "x".join(map(str, grid)), f"plain {a['accuracy']:.3f}/{a['severity_mae']:.2f}",
              f"adapted {b['accuracy']:.3f}/{b['severity_mae']:.2f}", flush=True)

"""Which part of a held-out site's acquisition moves a leave-site-out model: each part undone in turn.

Re-renders the first ``N`` subjects of site ``SITE`` of a multi-site cohort (``generate --sites K``) with the site's
acquisition as recorded in ``cohort.json``, then with one part of it undone at a time (slabs, grid, bias field,
contrast, Rician noise, artifact), predicts each set with the checkpoint of the leave-site-out run that held that site
out, and prints accuracy, mean severity error (predicted - true) and MAE per variant. docs/experiments.md, "Several
scanners", quotes its output for site 0 of the README's cohort:

    python docs/scripts/held_out_site_diagnosis.py data/sites4 runs/loso_multisite/site_0 0 120
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import pandas as pd

from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.io import nifti_image
from monai_mtl.synthetic import SiteAcquisition, config_from_dict, render_subject


def variants(acquisition: SiteAcquisition, cohort_shape, cohort_spacing) -> dict[str, SiteAcquisition]:
    """The site's acquisition, then with one part undone (a slab of 0 mm: each slice point-sampled, as the cohort's)."""
    return {
        "site as scanned": acquisition,
        "no slab (point sampled)": replace(acquisition, slice_thickness_mm=0.0),
        "cohort grid, no slab": replace(acquisition, shape=cohort_shape, spacing_mm=cohort_spacing, slice_thickness_mm=0.0),
        "no bias field": replace(acquisition, bias_coefficients=tuple(0.0 for _ in acquisition.bias_coefficients)),
        "gamma 1": replace(acquisition, gamma=1.0),
        "no Rician noise": replace(acquisition, rician_std=0.0),
        "no artifact": replace(acquisition, artifact="none", artifact_strength=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path, help="multi-site cohort folder (labels.csv with a site column, cohort.json)")
    parser.add_argument("run", type=Path, help="the leave-site-out run that held SITE out (its model.pt)")
    parser.add_argument("site", type=int)
    parser.add_argument("subjects", type=int, help="how many of the site's subjects, first in labels.csv order")
    args = parser.parse_args()
    meta = json.loads((args.cohort / "cohort.json").read_text())
    config = config_from_dict(meta["parameters"])
    acquisition = SiteAcquisition(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["sites"][args.site].items()})
    labels = pd.read_csv(args.cohort / "labels.csv")
    ids = labels[labels.site == args.site].subject_id.tolist()[: args.subjects]
    predictor = CheckpointPredictor(args.run / "model.pt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variants(acquisition, config.shape, config.spacing_mm).items():
            grid = replace(config, shape=variant.shape, spacing_mm=variant.spacing_mm)
            records = []
            for sid in ids:
                subject, image = render_subject(config, int(sid.removeprefix("sub-")), variant)
                path = Path(tmp) / f"{sid}.nii.gz"
                nib.save(nifti_image(image, grid.affine), path)
                records.append({"image": str(path), "response": subject.response, "severity": subject.severity,
                                "subject_id": sid})
            table = predictor.predict(records)
            error = table.pred_severity - table.true_severity
            rows.append({"variant": name, "accuracy": (table.pred_response == table.true_response).mean(),
                         "mean severity error": error.mean(), "severity MAE": error.abs().mean()})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()

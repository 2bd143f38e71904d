"""How far a trained model holds on scans from other scanners: an artifact sweep, other grids, leave-one-site-out.

* **Artifact sweep** (:func:`artifact_sweep`): the run's own test part, each scan degraded by one
  artifact of :data:`monai_mtl.artifacts.ARTIFACT_KINDS` at several strengths, in the scan's own
  grid before the checkpoint's preprocessing, exactly as another scanner would hand it over.
* **Other grids** (synthetic cohorts only): the same test subjects re-rendered by the generator on
  other grids with the same field of view (``grid`` rows), the strongest test of a preprocessing
  defined in physical space.
* **Leave-one-site-out** (:func:`leave_site_out`): on a multi-site cohort, one training per site
  with that site held out as the test part (child bundle runs, like ``cv``), beside the same
  sites' figures in a within-site cross-validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_mtl.artifacts import ARTIFACT_KINDS, apply_artifact
from monai_mtl.cohort import CohortError, read_cohort, to_datalist
from monai_mtl.errors import ConfigError
from monai_mtl.evaluation import CheckpointPredictor, report_from_predictions
from monai_mtl.io import atomic_write_csv, atomic_write_text, nifti_image
from monai_mtl.run_folder import RunLock, read_run_cohort, requested_config
from monai_mtl.transforms import ResampleToFieldOfViewd

logger = logging.getLogger(__name__)

#: strengths of the sweep per artifact kind (meaning: :data:`~monai_mtl.artifacts.ARTIFACT_KINDS`); the
#: first row of each kind in the table is the clean scan
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    "resolution": (1.5, 2.0, 3.0),
    "slice_thickness": (1.5, 2.0, 3.0),
    "bias_field": (0.1, 0.2, 0.4),
    "contrast": (0.7, 0.85, 1.2, 1.5),
    "noise": (0.02, 0.05, 0.1),
    "motion": (0.1, 0.2, 0.4),
    "gibbs": (0.2, 0.4, 0.6),
}
#: grids for the ``grid`` rows: the test subjects re-rendered on them with the cohort's field of view
DEFAULT_GRIDS: tuple[tuple[int, int, int], ...] = ((80, 72, 24), (48, 48, 12), (128, 128, 32))


class ArtifactScand(MapTransform):
    """Degrade a loaded, channel-first scan by one artifact at a fixed strength, in its own grid.

    ``resolution`` resamples the scan to voxels ``strength`` times larger over the same field of view
    (:class:`~monai_mtl.transforms.ResampleToFieldOfViewd`, the grid centred where the scan's is), which the
    preprocessing then resamples to the model's grid, like a scan acquired at that resolution.
    Random artifacts (bias field, noise) draw from a generator seeded by ``seed`` and the file name,
    so a scan gets the same draw whatever the order or batch.

    Args:
        kind: one of :data:`~monai_mtl.artifacts.ARTIFACT_KINDS`.
        strength: its strength.
        seed: random seed of the draws.
    """

    def __init__(self, kind: str, strength: float, seed: int = 0, keys: KeysCollection = "image") -> None:
        super().__init__(keys)
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {sorted(ARTIFACT_KINDS)}, got {kind!r}")
        self.kind, self.strength, self.seed = kind, float(strength), int(seed)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.kind == "resolution":
                pixdim = np.asarray(image.pixdim, dtype=float) * self.strength
                shape = [max(1, int(round(n / self.strength))) for n in image.shape[1:]]
                d[key] = ResampleToFieldOfViewd(key, pixdim, shape)(d)[key]
                continue
            name = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
            array = np.asarray(image.detach().cpu().numpy()[0], dtype=np.float32)
            degraded = torch.as_tensor(apply_artifact(array, self.kind, self.strength, rng)[None], dtype=torch.float32)
            d[key] = MetaTensor(degraded, meta=dict(image.meta)) if isinstance(image, MetaTensor) else degraded
        return d


def _metrics_row(table: pd.DataFrame, **columns) -> dict:
    report = report_from_predictions(table)
    return {**columns, "n": report["n"], "accuracy": report["accuracy"], "severity_mae": report["severity_mae"]}


#: the sweep's columns for a checkpoint with trust settings: does the model say when a scanner's scans are beyond it?
FLAGGED_COLUMNS = ("ood_flagged", "unflagged_accuracy", "unflagged_severity_mae")


def _flagged_row(table: pd.DataFrame) -> dict:
    """The share of a row's scans that the checkpoint's OOD score flags, and the accuracy and MAE of the scans it does
    not flag: what a user who sets the flagged predictions aside is left with (NaN when every scan is flagged)."""
    flagged = table["ood"].astype(bool).to_numpy()
    rest = table[~flagged]
    if rest.empty:
        return dict(zip(FLAGGED_COLUMNS, (1.0, float("nan"), float("nan"))))
    report = report_from_predictions(rest)
    return dict(zip(FLAGGED_COLUMNS, (float(flagged.mean()), report["accuracy"], report["severity_mae"])))


def regrid_subjects(
    dataset_dir: str | os.PathLike, subject_ids: Sequence[str], shape: Sequence[int], output_dir: str | os.PathLike
) -> list[dict]:
    """Re-render synthetic subjects on another grid with the cohort's field of view; their datalist records.

    The generator's subject ``sub-00012`` is index 12 of the cohort in ``cohort.json``: its class,
    severity and affine nuisance are the same; its smooth deformation and noise are drawn on the new grid.

    Raises:
        CohortError: the cohort was not made by the generator (no ``cohort.json``), or an id is not one of its.
    """
    from monai_mtl.synthetic import COHORT_JSON, config_from_dict, render_subject

    dataset_dir = Path(dataset_dir)
    meta_path = dataset_dir / COHORT_JSON
    if not meta_path.is_file():
        raise CohortError(f"{dataset_dir}: no {COHORT_JSON}; re-rendering on other grids needs a synthetic cohort")
    meta = json.loads(meta_path.read_text())
    if meta.get("sites"):
        raise CohortError(f"{dataset_dir} is a multi-site cohort: re-rendering on other grids needs a single-site one")
    config = config_from_dict(meta["parameters"])
    fov = np.asarray(config.shape) * np.asarray(config.spacing_mm)
    grid = replace(config, shape=tuple(int(n) for n in shape), spacing_mm=tuple(float(v) for v in fov / np.asarray(shape)))
    labels = read_cohort(dataset_dir).set_index("subject_id")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for sid in subject_ids:
        try:
            index = int(str(sid).removeprefix("sub-"))
        except ValueError:
            raise CohortError(f"{sid} is not a generator subject id (sub-<index>)") from None
        subject, image = render_subject(grid, index)
        if abs(subject.severity - float(labels.at[sid, "severity"])) > 1e-6:
            raise CohortError(f"{sid}: re-rendered severity {subject.severity} differs from labels.csv; is cohort.json this cohort's?")
        path = output_dir / f"{sid}.nii.gz"
        nib.save(nifti_image(image, grid.affine), path)
        records.append({"image": str(path), "response": subject.response, "severity": subject.severity, "subject_id": sid})
    return records


def artifact_sweep(
    run_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    strengths: Mapping[str, Sequence[float]] | None = None,
    grids: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    part: str = "test",
    adapt_batchnorm: bool = False,
    adapt_min_scans: int | None = None,
) -> pd.DataFrame:
    """Accuracy and severity MAE of a run's best checkpoint on its test part, clean and degraded.

    ``part="validation"`` sweeps the validation part instead: the part to compare candidate models
    (an augmentation preset, a normalisation) on, so the test part is read once, for the chosen one.

    Writes ``robustness.csv`` (``kind``, ``strength``, ``n``, ``accuracy``, ``severity_mae``; the
    ``clean`` row first) and ``robustness.png`` into ``output_dir``. A checkpoint calibrated with trust settings
    (every training run's) adds :data:`FLAGGED_COLUMNS`: the share of the row's scans its OOD score flags
    (``ood_flagged``) and the accuracy and MAE of the others, so the table says whether the model warns where an
    artifact breaks it. With a synthetic single-site
    cohort, ``grids`` adds one ``grid`` row per grid (``strength`` like ``80x72x24``), the test
    subjects re-rendered there.

    ``adapt_batchnorm``: each row also predicted after the checkpoint's batch-norm statistics were moved to those
    of that row's scans (:mod:`monai_mtl.adaptation`, the stored statistics again for the next row), in
    ``adapted_accuracy`` and ``adapted_severity_mae``: what inference's ``adapt_batchnorm`` gives a folder of
    scans that all carry one artifact. The part needs ``adapt_min_scans`` scans (default: inference's 20).
    """
    from monai_mtl.adaptation import DEFAULT_MIN_SCANS
    from monai_mtl.checkpoints import check_no_leakage
    from monai_mtl.figures import robustness_figure

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise CohortError(f"{run_dir}: no split.json (expected a training run's output folder)")
    if part not in ("test", "validation"):
        raise ValueError(f"part must be 'test' or 'validation', got {part!r}")
    subject_ids = json.loads(split_file.read_text())[part]
    checkpoint = run_dir / "model.pt"
    if part == "test":
        check_no_leakage(checkpoint, subject_ids)
    min_scans = DEFAULT_MIN_SCANS if adapt_min_scans is None else adapt_min_scans
    if adapt_batchnorm and len(subject_ids) < min_scans:
        raise ConfigError(f"--adapt-batchnorm needs at least {min_scans} scans, {run_dir}'s {part} part has {len(subject_ids)}")
    cohort = read_run_cohort(run_dir, dataset_dir)  # before anything is written: refuses another cohort
    with RunLock(output_dir):
        model = CheckpointPredictor(checkpoint, device)
        datalist = model.with_covariates(to_datalist(cohort, subject_ids), cohort)

        def _row(records: list[dict], acquisition=(), **columns) -> dict:
            predictions = model.predict(records, acquisition)
            row = _metrics_row(predictions, **columns)
            if model.trust is not None:
                row.update(_flagged_row(predictions))
            if adapt_batchnorm:
                stored = {k: v.clone() for k, v in model.network.state_dict().items()}
                model.adapt_batchnorm(records, acquisition, min_scans=min_scans)
                adapted = _metrics_row(model.predict(records, acquisition))
                model.network.load_state_dict(stored)
                row.update(adapted_accuracy=adapted["accuracy"], adapted_severity_mae=adapted["severity_mae"])
                logger.info("robustness: %s %s adapted: accuracy %.4f, MAE %.2f", columns["kind"], columns["strength"] or "",
                            adapted["accuracy"], adapted["severity_mae"])
            return row

        rows = [_row(datalist, kind="clean", strength="")]
        logger.info("robustness: clean %s part: accuracy %.4f, MAE %.2f", part, rows[0]["accuracy"], rows[0]["severity_mae"])
        for kind, values in (DEFAULT_STRENGTHS if strengths is None else strengths).items():
            for strength in values:
                row = _row(datalist, [ArtifactScand(kind, strength, seed)], kind=kind, strength=f"{strength:g}")
                logger.info("robustness: %s %g: accuracy %.4f, MAE %.2f", kind, strength, row["accuracy"], row["severity_mae"])
                rows.append(row)
        if grids and (Path(dataset_dir) / "cohort.json").is_file():
            with tempfile.TemporaryDirectory(prefix="regrid-") as tmp:
                for shape in grids:
                    records = regrid_subjects(dataset_dir, subject_ids, shape, Path(tmp) / "x".join(map(str, shape)))
                    records = model.with_covariates(records, cohort)
                    row = _row(records, kind="grid", strength="x".join(map(str, shape)))
                    logger.info("robustness: grid %s: accuracy %.4f, MAE %.2f", row["strength"], row["accuracy"], row["severity_mae"])
                    rows.append(row)
        elif grids:
            logger.info("robustness: no cohort.json in %s (not a synthetic cohort): no grid rows", dataset_dir)
        table = pd.DataFrame(rows, columns=["kind", "strength", "n", "accuracy", "severity_mae",
                                            *(FLAGGED_COLUMNS if model.trust is not None else ()),
                                            *(["adapted_accuracy", "adapted_severity_mae"] if adapt_batchnorm else [])])
        output_dir.mkdir(parents=True, exist_ok=True)
        robustness_figure(table, output_dir / "robustness.png")
        atomic_write_csv(output_dir / "robustness.csv", table)
    logger.info("robustness table -> %s", output_dir / "robustness.csv")
    return table


def leave_site_out(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config_files: Sequence[str],
    overrides: Mapping[str, object] | None = None,
    folds: int = 5,
    overwrite: bool = False,
    jobs: int = 1,
) -> pd.DataFrame:
    """One training per site with that site as the test part, beside the within-site CV figures per site.

    Runs ``site_<s>/`` (``held_out_site`` s) and a ``folds``-fold cross-validation in ``cv/`` (skipped
    where finished), then writes ``leave_site_out.csv`` / ``.md``: per site, the held-out accuracy and
    MAE, the same site's subjects' accuracy and MAE in the CV (trained with every site), and the ratio
    of the MAEs, and the held-out site's mean severity error (predicted - true); the same three held-out
    figures (``held_out_adapted_*``) after the site's model adapted its batch-norm statistics to the site's
    scans (:mod:`monai_mtl.adaptation`, as inference's ``adapt_batchnorm`` does). ``folds`` 0 runs the
    held-out-site trainings only (about half the time, to compare candidate recipes on a cohort kept for
    choosing), without the within-site columns.
    """
    from monai_mtl.crossval import fold_dir, fold_request, summarize
    from monai_mtl.runs import RunRequest, run_trainings

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    # the labels as the trainings will read them: the label columns and session the config files and overrides name
    requested = requested_config(config_files, dataset_dir, output_dir, overrides)
    labels = read_cohort(dataset_dir, requested.get("response_column", "response"),
                         requested.get("severity_column", "severity"), requested.get("bids_session"))
    if "site" not in labels.columns or labels["site"].nunique() < 2:
        raise CohortError(f"{dataset_dir / 'labels.csv'}: leave-one-site-out needs a 'site' column with at least two sites")
    sites = sorted(labels["site"].astype(str).unique())
    if folds < 0 or folds == 1:
        raise ValueError(f"folds must be 0 (held-out sites only) or at least 2, got {folds}")
    held_out, models = {}, {}
    with RunLock(output_dir), RunLock(output_dir / "cv") if folds else contextlib.nullcontext():
        # the held-out-site runs and the within-site folds are independent: one queue, ``jobs`` at a time
        requests = [RunRequest(config_files, dataset_dir, output_dir / f"site_{site}",
                               {**(overrides or {}), "held_out_site": site}, overwrite) for site in sites]
        requests += [fold_request(i, folds, dataset_dir, output_dir / "cv", config_files, overrides, overwrite)
                     for i in range(folds)]
        runs = run_trainings(requests, jobs)
        for site, run in zip(sites, runs):
            held_out[site] = pd.read_csv(run / "test_predictions.csv", dtype={"subject_id": str})
            models[site] = run / "model.pt"
        if folds:
            summarize(output_dir / "cv", folds, dataset_dir=dataset_dir)
    rows = []
    for site in sites:
        out, table = _metrics_row(held_out[site], site=site), held_out[site]
        # the mean error: the offset a scanner moves every severity by (the MAE mixes it with the spread)
        rows.append({"site": site, "n": out["n"], "held_out_accuracy": out["accuracy"],
                     "held_out_severity_mae": out["severity_mae"],
                     "held_out_mean_severity_error": float((table["pred_severity"] - table["true_severity"]).mean()),
                     **_adapted_held_out(models[site], labels, list(table["subject_id"]))})
    if folds:
        cv = pd.concat([pd.read_csv(fold_dir(output_dir / "cv", i) / "test_predictions.csv", dtype={"subject_id": str})
                        for i in range(folds)])
        site_of = labels.set_index("subject_id")["site"].astype(str)
        for row in rows:
            inside = _metrics_row(cv[cv["subject_id"].map(site_of) == row["site"]])
            row.update({"within_site_cv_accuracy": inside["accuracy"], "within_site_cv_severity_mae": inside["severity_mae"],
                        "mae_ratio": row["held_out_severity_mae"] / max(inside["severity_mae"], 1e-9)})
    table = pd.DataFrame(rows)
    atomic_write_csv(output_dir / "leave_site_out.csv", table)
    atomic_write_text(output_dir / "leave_site_out.md", table.to_markdown(index=False, floatfmt=".4g") + "\n")
    logger.info("leave-one-site-out -> %s\n%s", output_dir / "leave_site_out.md", table.to_string(index=False))
    return table


def _adapted_held_out(checkpoint: Path, labels: pd.DataFrame, subject_ids: list[str]) -> dict:
    """The held-out site's figures after the model's batch-norm statistics were re-estimated on its scans, without
    their labels (:mod:`monai_mtl.adaptation`): what a user with a folder of the new scanner's scans gets."""
    from monai_mtl.adaptation import DEFAULT_MIN_SCANS

    if len(subject_ids) < DEFAULT_MIN_SCANS:  # what inference would refuse: no figures rather than noisy statistics
        logger.warning("%s: %d held-out scans, fewer than the %d the batch-norm adaptation needs: no adapted figures",
                       checkpoint.parent, len(subject_ids), DEFAULT_MIN_SCANS)
        return dict.fromkeys(("held_out_adapted_accuracy", "held_out_adapted_severity_mae",
                              "held_out_adapted_mean_severity_error"), float("nan"))
    predictor = CheckpointPredictor(checkpoint)
    datalist = predictor.with_covariates(to_datalist(labels, subject_ids), labels)
    predictor.adapt_batchnorm(datalist)
    out = predictor.predict(datalist)
    report = _metrics_row(out)
    return {"held_out_adapted_accuracy": report["accuracy"], "held_out_adapted_severity_mae": report["severity_mae"],
            "held_out_adapted_mean_severity_error": float((out["pred_severity"] - out["true_severity"]).mean())}


__all__ = ["DEFAULT_STRENGTHS", "DEFAULT_GRIDS", "ArtifactScand", "regrid_subjects", "artifact_sweep", "leave_site_out"]

"""Baselines on the same split as a training run: single-task CNNs, ResNet-18, class-median severity, scikit-learn.

* ``single-task-response`` / ``single-task-severity``: the same network and training with one task
  path only (``bundle/configs/baselines/single_task_*.json`` over ``train.json``); the paper's
  central claim is that the two tasks help each other, and these runs measure it.
* ``resnet18``: MONAI's 3D ResNet-18 as the encoder with the two heads (``baselines/resnet18.json``).

* ``class-median``: each test subject's severity is predicted as the median severity of the training
  subjects of its **true** class (no imaging). It measures how much of a severity MAE comes from the
  class alone; its response "prediction" is the true class, so its accuracy is not a result.
* ``classical``: per atlas region, the mean and standard deviation of the z-scored intensity (18
  features on the synthetic atlas); logistic regression for the response and ridge regression for the
  severity (scikit-learn pipelines with standardisation), fit on the run's train + validation parts.
* ``covariates-only``: the same two scikit-learn models on the clinical covariates alone (no imaging),
  encoded by :class:`~monai_mtl.covariates.CovariateEncoding` fitted on the train + validation parts
  (standardised numbers, one-hot categories, missing indicators, and the count steps of the reference run's
  ``covariate_count_levels``, so that it sees the features the fused network saw). The columns: ``covariates``
  given, else the reference run's ``covariates`` setting, else those ``generate --covariates`` recorded in
  ``cohort.json``.

All write ``test_metrics.json`` and ``test_predictions.csv`` in the format of the training run. With a
cross-validation folder as the reference (:func:`run_baselines_cv`) they run on each fold's split and are
summarized like ``cv`` (``cv_folds.csv``, ``cv_summary.json``).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from monai_mtl.cohort import CohortError
from monai_mtl.evaluation import report_from_predictions
from monai_mtl.io import atomic_write_csv, atomic_write_json
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, prediction_table
from monai_mtl.run_folder import RunLock, read_run_cohort, run_setting

logger = logging.getLogger(__name__)

NETWORK_CONFIGS = {
    "single-task-response": "single_task_response.json",
    "single-task-severity": "single_task_severity.json",
    "resnet18": "resnet18.json",
}
KINDS = ("class-median", "classical", "covariates-only", *NETWORK_CONFIGS)


def region_features(image_path: str, atlas: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of the z-scored intensity in every non-background atlas region."""
    volume = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
    if volume.shape != atlas.shape:
        raise CohortError(f"{image_path}: shape {volume.shape} is not the atlas grid {atlas.shape}")
    volume = (volume - volume.mean()) / max(float(volume.std()), 1e-8)
    labels = [k for k in np.unique(atlas) if k != 0]
    return np.array([volume[atlas == k].mean() for k in labels] + [volume[atlas == k].std() for k in labels])


def run_network_baseline(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: dict | None = None, overwrite: bool = False,
) -> dict:
    """Train and test network baseline ``kind`` with the bundle, on exactly the split of ``split_file``.

    The split's settings (seed, fractions, folds) are passed to the run, and its ``split.json`` is
    checked against ``split_file`` afterwards.
    """
    from monai_mtl.runs import run_trainings

    run_trainings([network_baseline_request(kind, dataset_dir, split_file, output_dir, overrides, overwrite)])
    return network_baseline_metrics(kind, split_file, output_dir)


def network_baseline_request(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: dict | None = None, overwrite: bool = False,
):
    """The child run of network baseline ``kind``: ``baselines/<kind>.json`` over ``train.json``, with the split's
    settings and the reference run's way of reading the cohort (its label columns and BIDS session, where not the
    defaults), so that it learns from the same scans and labels."""
    from monai_mtl.run_folder import COHORT_READING, cohort_reading
    from monai_mtl.runs import CONFIG_DIR, DEFAULT_CONFIG, RunRequest

    settings = json.loads(Path(split_file).read_text()).get("settings", {})
    reading = {k: v for k, v in cohort_reading(Path(split_file).parent).items() if v != COHORT_READING[k]}
    config = str(CONFIG_DIR / "baselines" / NETWORK_CONFIGS[kind])
    return RunRequest([DEFAULT_CONFIG, config], dataset_dir, output_dir, {**reading, **settings, **(overrides or {})}, overwrite)


def network_baseline_metrics(kind: str, split_file: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """A finished network baseline's test metrics, once its split is checked to be ``split_file``'s."""
    reference = json.loads(Path(split_file).read_text())
    out = Path(output_dir)
    produced = json.loads((out / "split.json").read_text())
    if any(produced[k] != reference[k] for k in ("train", "validation", "test")):
        raise CohortError(f"{out / 'split.json'} differs from {split_file}: the baseline did not use the same split")
    metrics = json.loads((out / "test_metrics.json").read_text())
    logger.info("baseline %s: accuracy %.4f, severity MAE %.2f (n=%d) -> %s", kind, metrics["accuracy"],
                metrics["severity_mae"], metrics["n"], out / "test_metrics.json")
    return metrics


def run_baselines(
    kinds: list[str], dataset_dir: str | os.PathLike, split_file: str | os.PathLike,
    output_dirs: list[str | os.PathLike], overrides: dict | None = None, overwrite: bool = False, jobs: int = 1,
    covariates: Sequence[str] | None = None,
) -> dict[str, dict]:
    """:func:`run_baseline` of each of ``kinds`` (into ``output_dirs``); the network baselines ``jobs`` at a time."""
    from monai_mtl.runs import run_trainings

    for kind in kinds:
        _check_kind(kind, split_file)
    results = {kind: _fit_classical_baseline(kind, dataset_dir, split_file, out, covariates)
               for kind, out in zip(kinds, output_dirs) if kind not in NETWORK_CONFIGS}
    networks = [(kind, out) for kind, out in zip(kinds, output_dirs) if kind in NETWORK_CONFIGS]
    run_trainings([network_baseline_request(kind, dataset_dir, split_file, out, overrides, overwrite)
                   for kind, out in networks], jobs)
    results.update({kind: network_baseline_metrics(kind, split_file, out) for kind, out in networks})
    return {kind: results[kind] for kind in kinds}


def run_baselines_cv(
    kinds: list[str], dataset_dir: str | os.PathLike, cv_dir: str | os.PathLike,
    output_dirs: list[str | os.PathLike], overrides: dict | None = None, overwrite: bool = False, jobs: int = 1,
    covariates: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Each of ``kinds`` on every fold of the cross-validation in ``cv_dir`` (its ``fold_<i>/split.json``).

    ``output_dirs[k]/fold_<i>`` gets fold ``i``'s baseline, ``output_dirs[k]`` the summary of
    :func:`monai_mtl.crossval.summarize` (``cv_folds.csv``...), so ``results`` pairs it with ``cv_dir`` fold by fold.
    Network baselines run ``jobs`` at a time (all folds in one queue).
    """
    from monai_mtl.crossval import fold_dir, summarize
    from monai_mtl.runs import run_trainings

    num_folds = len(sorted(Path(cv_dir).glob("fold_*/split.json")))
    if num_folds < 2:
        raise CohortError(f"{cv_dir}: no cross-validation folds with a split.json (run `python -m monai_mtl cv` first)")
    splits = [fold_dir(cv_dir, i) / "split.json" for i in range(num_folds)]
    missing = [str(f) for f in splits if not f.is_file()]
    if missing:
        raise CohortError(f"{cv_dir}: folds are numbered 0 to {num_folds - 1}, but {missing[0]} is missing")
    for kind in kinds:
        _check_kind(kind, splits[0])
    requests = []
    for kind, out in zip(kinds, output_dirs):
        for fold, split_file in enumerate(splits):
            if kind in NETWORK_CONFIGS:
                requests.append(network_baseline_request(kind, dataset_dir, split_file, fold_dir(out, fold), overrides, overwrite))
            else:
                _fit_classical_baseline(kind, dataset_dir, split_file, fold_dir(out, fold), covariates)
    run_trainings(requests, jobs)
    summaries = {}
    for kind, out in zip(kinds, output_dirs):
        if kind in NETWORK_CONFIGS:
            for fold, split_file in enumerate(splits):
                network_baseline_metrics(kind, split_file, fold_dir(out, fold))
        summaries[kind] = summarize(out, num_folds, dataset_dir=dataset_dir)
    return summaries


def _check_kind(kind: str, split_file: str | os.PathLike) -> None:
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    if not Path(split_file).is_file():
        raise CohortError(f"no split file {split_file}: train the reference run first, or pass --split")


def run_baseline(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: dict | None = None, overwrite: bool = False, covariates: Sequence[str] | None = None,
) -> dict:
    """Fit baseline ``kind`` on the train + validation parts of ``split_file`` and test it on its test part.

    ``overrides`` (bundle keys such as ``max_epochs``) and ``overwrite`` apply to the network
    baselines only (bundle runs, whose folder their run locks); the others lock ``output_dir`` to write.
    ``covariates``: the columns of the ``covariates-only`` baseline (default: see :func:`_covariate_columns`).
    """
    _check_kind(kind, split_file)
    if kind in NETWORK_CONFIGS:
        return run_network_baseline(kind, dataset_dir, split_file, output_dir, overrides, overwrite)
    return _fit_classical_baseline(kind, dataset_dir, split_file, output_dir, covariates)


def _covariate_columns(dataset_dir: str | os.PathLike, split_file: str | os.PathLike, given: Sequence[str] | None) -> list[str]:
    """The ``covariates-only`` baseline's columns: ``given``, else the reference run's setting, else ``cohort.json``'s."""
    if given:
        return list(given)
    columns = run_setting(Path(split_file).parent, "covariates")
    if columns:
        return list(columns)
    cohort_file = Path(dataset_dir) / "cohort.json"
    if cohort_file.is_file():
        columns = (json.loads(cohort_file.read_text()).get("covariates") or {}).get("columns")
        if columns:
            return list(columns)
    raise CohortError(f"the covariates-only baseline needs covariate columns: {split_file}'s run used none and "
                      f"{cohort_file} records none; pass --covariates COLUMN ...")


def _fit_linear_models(x_fit: np.ndarray, fit, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression (response probabilities) and ridge regression (severity, clipped to 0-100), standardised inputs."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(x_fit, fit["response"])
    probabilities = np.zeros((len(x_test), NUM_RESPONSE_CLASSES))
    probabilities[:, classifier.classes_] = classifier.predict_proba(x_test)  # a class absent from a small fit part stays 0
    regressor = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    regressor.fit(x_fit, fit["severity"])
    return probabilities, np.clip(regressor.predict(x_test), 0.0, 100.0)


def _fit_classical_baseline(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike,
    covariates: Sequence[str] | None = None,
) -> dict:
    # its own model on the run's split: the cohort may have gained columns (covariates) since the run; the ids are checked
    table = read_run_cohort(Path(split_file).parent, dataset_dir, same_cohort=False).set_index("subject_id", drop=False)
    split = json.loads(Path(split_file).read_text())
    missing = sorted(set(split["test"] + split["train"] + split["validation"]) - set(table.index))[:3]
    if missing:
        raise CohortError(f"{split_file} names subjects that {dataset_dir} does not have, e.g. {missing}")
    fit, test = table.loc[split["train"] + split["validation"]], table.loc[split["test"]]
    facts: dict = {}
    if kind == "class-median":
        medians = fit.groupby("response")["severity"].median()
        probabilities = np.eye(NUM_RESPONSE_CLASSES)[test["response"].to_numpy()]
        pred_severity = medians.loc[test["response"]].to_numpy()
    elif kind == "covariates-only":
        from monai_mtl.covariates import CovariateEncoding

        columns = _covariate_columns(dataset_dir, split_file, covariates)
        source = str(dataset_dir)
        count_levels = int(run_setting(Path(split_file).parent, "covariate_count_levels") or 0)
        # train + validation parts: the test part never changes it
        encoding = CovariateEncoding.fit(fit, columns, source, count_levels)
        probabilities, pred_severity = _fit_linear_models(encoding.encode(fit, source), fit, encoding.encode(test, source))
        facts = {"covariates": columns, "features": encoding.feature_names}
    else:
        atlas_path = Path(dataset_dir) / "atlas.nii.gz"
        if not atlas_path.is_file():
            raise CohortError(f"the classical baseline needs region labels: no {atlas_path}")
        atlas = np.asarray(nib.load(atlas_path).dataobj)
        with ThreadPoolExecutor(max_workers=4) as pool:
            features = dict(zip(table.index, pool.map(lambda p: region_features(p, atlas), table["image"])))
        probabilities, pred_severity = _fit_linear_models(
            np.stack([features[s] for s in fit.index]), fit, np.stack([features[s] for s in test.index]))
    predictions = prediction_table(probabilities, pred_severity, {"subject_id": test["subject_id"].to_numpy()},
                                   true_response=test["response"].to_numpy(), true_severity=test["severity"].to_numpy())
    metrics = {"baseline": kind, "split": str(Path(split_file).absolute()), **facts, **report_from_predictions(predictions)}
    out = Path(output_dir)
    with RunLock(out):  # taken once the inputs passed their checks: a refused run leaves no folder
        atomic_write_csv(out / "test_predictions.csv", predictions)
        atomic_write_json(out / "test_metrics.json", metrics)
    logger.info("baseline %s: accuracy %.4f, severity MAE %.2f (n=%d) -> %s", kind, metrics["accuracy"],
                metrics["severity_mae"], metrics["n"], out / "test_metrics.json")
    return metrics

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

Both write ``test_metrics.json`` and ``test_predictions.csv`` in the format of the training run.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from monai_mtl.cohort import CohortError, read_cohort
from monai_mtl.evaluation import report_from_predictions
from monai_mtl.io import atomic_write_csv, atomic_write_json
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, prediction_table
from monai_mtl.run_folder import RunLock

logger = logging.getLogger(__name__)

NETWORK_CONFIGS = {
    "single-task-response": "single_task_response.json",
    "single-task-severity": "single_task_severity.json",
    "resnet18": "resnet18.json",
}
KINDS = ("class-median", "classical", *NETWORK_CONFIGS)


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
    """The child run of network baseline ``kind``: ``baselines/<kind>.json`` over ``train.json``, with the split's settings."""
    from monai_mtl.runs import CONFIG_DIR, DEFAULT_CONFIG, RunRequest

    settings = json.loads(Path(split_file).read_text()).get("settings", {})
    config = str(CONFIG_DIR / "baselines" / NETWORK_CONFIGS[kind])
    return RunRequest([DEFAULT_CONFIG, config], dataset_dir, output_dir, {**settings, **(overrides or {})}, overwrite)


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
) -> dict[str, dict]:
    """:func:`run_baseline` of each of ``kinds`` (into ``output_dirs``); the network baselines ``jobs`` at a time."""
    from monai_mtl.runs import run_trainings

    for kind in kinds:
        _check_kind(kind, split_file)
    results = {kind: run_baseline(kind, dataset_dir, split_file, out)
               for kind, out in zip(kinds, output_dirs) if kind not in NETWORK_CONFIGS}
    networks = [(kind, out) for kind, out in zip(kinds, output_dirs) if kind in NETWORK_CONFIGS]
    run_trainings([network_baseline_request(kind, dataset_dir, split_file, out, overrides, overwrite)
                   for kind, out in networks], jobs)
    results.update({kind: network_baseline_metrics(kind, split_file, out) for kind, out in networks})
    return {kind: results[kind] for kind in kinds}


def _check_kind(kind: str, split_file: str | os.PathLike) -> None:
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    if not Path(split_file).is_file():
        raise CohortError(f"no split file {split_file}: train the reference run first, or pass --split")


def run_baseline(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike,
    overrides: dict | None = None, overwrite: bool = False,
) -> dict:
    """Fit baseline ``kind`` on the train + validation parts of ``split_file`` and test it on its test part.

    ``overrides`` (bundle keys such as ``max_epochs``) and ``overwrite`` apply to the network
    baselines only (bundle runs, whose folder their run locks); the others lock ``output_dir`` to write.
    """
    _check_kind(kind, split_file)
    if kind in NETWORK_CONFIGS:
        return run_network_baseline(kind, dataset_dir, split_file, output_dir, overrides, overwrite)
    return _fit_classical_baseline(kind, dataset_dir, split_file, output_dir)


def _fit_classical_baseline(
    kind: str, dataset_dir: str | os.PathLike, split_file: str | os.PathLike, output_dir: str | os.PathLike
) -> dict:
    table = read_cohort(dataset_dir).set_index("subject_id", drop=False)
    split = json.loads(Path(split_file).read_text())
    missing = sorted(set(split["test"] + split["train"] + split["validation"]) - set(table.index))[:3]
    if missing:
        raise CohortError(f"{split_file} names subjects that {dataset_dir} does not have, e.g. {missing}")
    fit, test = table.loc[split["train"] + split["validation"]], table.loc[split["test"]]
    if kind == "class-median":
        medians = fit.groupby("response")["severity"].median()
        probabilities = np.eye(NUM_RESPONSE_CLASSES)[test["response"].to_numpy()]
        pred_severity = medians.loc[test["response"]].to_numpy()
    else:
        atlas_path = Path(dataset_dir) / "atlas.nii.gz"
        if not atlas_path.is_file():
            raise CohortError(f"the classical baseline needs region labels: no {atlas_path}")
        atlas = np.asarray(nib.load(atlas_path).dataobj)
        with ThreadPoolExecutor(max_workers=4) as pool:
            features = dict(zip(table.index, pool.map(lambda p: region_features(p, atlas), table["image"])))
        x_fit = np.stack([features[s] for s in fit.index])
        x_test = np.stack([features[s] for s in test.index])
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        classifier.fit(x_fit, fit["response"])
        probabilities = classifier.predict_proba(x_test)
        regressor = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        regressor.fit(x_fit, fit["severity"])
        pred_severity = np.clip(regressor.predict(x_test), 0.0, 100.0)
    predictions = prediction_table(probabilities, pred_severity, {"subject_id": test["subject_id"].to_numpy()},
                                   true_response=test["response"].to_numpy(), true_severity=test["severity"].to_numpy())
    metrics = {"baseline": kind, "split": str(Path(split_file).absolute()), **report_from_predictions(predictions)}
    out = Path(output_dir)
    with RunLock(out):  # taken once the inputs passed their checks: a refused run leaves no folder
        atomic_write_csv(out / "test_predictions.csv", predictions)
        atomic_write_json(out / "test_metrics.json", metrics)
    logger.info("baseline %s: accuracy %.4f, severity MAE %.2f (n=%d) -> %s", kind, metrics["accuracy"],
                metrics["severity_mae"], metrics["n"], out / "test_metrics.json")
    return metrics

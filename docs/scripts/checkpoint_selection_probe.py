"""Which epoch's weights should become ``model.pt``? Checkpoint selection rules compared on a CV's validation parts.

Needs a CV made with every epoch's validation network saved (``docs/scripts/save_every_epoch.json`` merged after
``train.json``: ``python -m monai_mtl cv --folds 5 --jobs 2 --output-dir CV --config-file bundle/configs/train.json
docs/scripts/save_every_epoch.json``; the saver changes nothing in the training).

``python docs/scripts/checkpoint_selection_probe.py CV [--test] [--averaged]``: each fold's validation (and with ``--test``
test) scans, with their covariates for a fused model, are predicted by every saved epoch, in one pass and moved by
``train.json``'s ``test_time_shifts`` (cached in ``CV/fold_K/epoch_predictions.npz``; runs that predict in one pass:
that pass only, ``epoch_predictions_one_pass.npz``). Each rule then picks an epoch on
one half of the validation part (halves drawn by subject, seeded by the fold) and is measured on the other half, both
ways, so that the luck that made an epoch look best is not also what measures it (docs/experiments.md, "Which epoch
becomes the model"). The measurement is the runs' own: averaged over the moves when their ``test_time_shifts`` has any,
one pass when it is empty (the fused recipe); ``--averaged`` measures averaged whatever the runs predict.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from monai_mtl import SEVERITY_SCALE
from monai_mtl.cohort import to_datalist
from monai_mtl.engines import COVARIATES_KEY
from monai_mtl.evaluation import CheckpointPredictor, load_weights
from monai_mtl.run_folder import read_run_cohort, run_dataset_dir
from monai_mtl.trust import calibrated_shifts

SHIFTS = json.loads((Path(__file__).parents[2] / "bundle" / "configs" / "train.json").read_text())["test_time_shifts"]
PARTS = ("validation", "test")


def epoch_of(path: Path) -> int:
    return int(path.stem.split("=")[-1])


#: a network's inputs: the preprocessed scans and, for a fused model, their encoded covariates (else None)
Inputs = tuple[torch.Tensor, "torch.Tensor | None"]


def labelled_scans(run: Path, predictor: CheckpointPredictor, part: str) -> tuple[Inputs, np.ndarray, np.ndarray]:
    """``part``'s scans of ``run``'s split through the checkpoint's preprocessing (with their covariate vectors, encoded
    as the checkpoint's training did, when it has covariates), their classes and severities (0-100)."""
    table = read_run_cohort(run, run_dataset_dir(run))
    records = predictor.with_covariates(to_datalist(table, json.loads((run / "split.json").read_text())[part]), table)
    transform = Compose(predictor.preprocessing.transforms(severity_key="severity"))
    scans = torch.stack([torch.as_tensor(transform(r)["image"]) for r in records])
    covariates = (torch.as_tensor(np.stack([r[COVARIATES_KEY] for r in records]), dtype=torch.float32)
                  if predictor.covariates is not None else None)
    return (scans, covariates), np.array([r["response"] for r in records]), np.array([r["severity"] for r in records], dtype=float)


def passes(network: torch.nn.Module, inputs: Inputs, shifts: list = SHIFTS) -> np.ndarray:
    """(passes, scans, classes + 1): the outputs for the scans moved by each of ``shifts`` (``torch.roll``, as
    ``ShiftAveragingInferer``; the covariates do not move), then as they are (the last pass)."""
    scans, covariates = inputs
    with torch.no_grad():
        return torch.stack([network(torch.roll(scans, m, dims=(2, 3, 4)), covariates) for m in shifts]
                           + [network(scans, covariates)]).numpy()


def predicts_averaged(run: Path) -> bool:
    """Whether ``run``'s product averages over moves: the ``test_time_shifts`` its ``model.pt`` was calibrated with."""
    return bool(calibrated_shifts(run / "model.pt"))


def predictions(run: Path, averaged: bool = True) -> dict[str, np.ndarray]:
    """``{part}_outputs`` (epochs, passes, scans, classes + 1): :func:`passes` per saved epoch (``averaged`` False: the
    one pass only, five times cheaper); ``{part}_response`` / ``{part}_severity``: the truth."""
    cache = run / ("epoch_predictions.npz" if averaged else "epoch_predictions_one_pass.npz")
    if cache.exists():
        return dict(np.load(cache))
    predictor = CheckpointPredictor(run / "model.pt")
    network = predictor.network.eval()
    files = sorted((run / "epochs").glob("*.pt"), key=epoch_of)
    out = {"epochs": np.array([epoch_of(f) for f in files])}
    for part in PARTS:
        inputs, out[f"{part}_response"], out[f"{part}_severity"] = labelled_scans(run, predictor, part)
        per_epoch = []
        for f in files:
            load_weights(network, f)
            per_epoch.append(passes(network, inputs, SHIFTS if averaged else []))
        out[f"{part}_outputs"] = np.stack(per_epoch)
        print(f"{run.name} {part}: {len(files)} epochs predicted", flush=True)
    np.savez_compressed(cache, **out)
    return out


def scores(outputs: np.ndarray, response: np.ndarray, severity: np.ndarray, averaged: bool) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and severity MAE (0-100) per epoch of ``outputs`` (epochs, passes, scans, 4)."""
    o = outputs.mean(axis=1) if averaged else outputs[:, -1]
    accuracy = (o[..., :3].argmax(-1) == response).mean(axis=1)
    mae = np.abs(o[..., 3] * SEVERITY_SCALE - severity).mean(axis=1)
    return accuracy, mae


def trailing_mean(values: np.ndarray, window: int = 3) -> np.ndarray:
    return np.array([values[max(0, i - window + 1): i + 1].mean() for i in range(len(values))])


#: rule name -> (the epoch index it picks, given one-pass and averaged (accuracy, MAE) per epoch on the selecting scans)
RULES = {
    "S0 best one-pass score (current)": lambda one, avg: int(np.argmax(one[0] - one[1] / SEVERITY_SCALE)),
    "S1 last epoch": lambda one, avg: len(one[0]) - 1,
    "S2 best trailing 3-epoch mean score": lambda one, avg: int(np.argmax(trailing_mean(one[0] - one[1] / SEVERITY_SCALE))),
    "S3 best shift-averaged score": lambda one, avg: int(np.argmax(avg[0] - avg[1] / SEVERITY_SCALE)),
}


def main() -> None:
    cv = Path(sys.argv[1])
    show_test = "--test" in sys.argv
    folds = sorted(p for p in cv.glob("fold_*") if p.is_dir())
    results = {name: [] for name in RULES}
    for run in folds:
        averaged = "--averaged" in sys.argv or predicts_averaged(run)
        p = predictions(run, averaged)  # one pass only: S3 is S0
        out, response, severity = p["validation_outputs"], p["validation_response"], p["validation_severity"]
        halves = np.array_split(np.random.default_rng(int(run.name.split("_")[1])).permutation(len(response)), 2)
        for name, rule in RULES.items():
            measured = []
            for pick_on, measure_on in ((halves[0], halves[1]), (halves[1], halves[0])):
                sub = out[:, :, pick_on]
                epoch = rule(scores(sub, response[pick_on], severity[pick_on], False),
                             scores(sub, response[pick_on], severity[pick_on], True))
                acc, mae = scores(out[epoch:epoch + 1, :, measure_on], response[measure_on], severity[measure_on], averaged)
                measured.append((acc[0], mae[0]))
            whole = rule(scores(out, response, severity, False), scores(out, response, severity, True))
            row = {"fold": run.name, "accuracy": float(np.mean([m[0] for m in measured])),
                   "mae": float(np.mean([m[1] for m in measured])), "epoch": int(p["epochs"][whole])}
            if show_test:
                acc, mae = scores(p["test_outputs"][whole:whole + 1], p["test_response"], p["test_severity"], averaged)
                row.update(test_accuracy=float(acc[0]), test_mae=float(mae[0]))
            results[name].append(row)
    reference = results[next(iter(RULES))]
    for name, rows in results.items():
        diff = [r["mae"] - q["mae"] for r, q in zip(rows, reference)]
        gain = [100 * (r["accuracy"] - q["accuracy"]) for r, q in zip(rows, reference)]
        line = (f"{name:40s} validation (other half): accuracy {100 * np.mean([r['accuracy'] for r in rows]):6.2f}% "
                f"(vs S0 {np.mean(gain):+.2f} points, higher in {sum(g > 0 for g in gain)}/{len(rows)}, lower in {sum(g < 0 for g in gain)}/{len(rows)}) "
                f"MAE {np.mean([r['mae'] for r in rows]):.3f} (vs S0 {np.mean(diff):+.3f}, lower in {sum(d < 0 for d in diff)}/{len(rows)})"
                f"; epochs {[r['epoch'] for r in rows]}")
        if show_test:
            line += (f"; test {100 * np.mean([r['test_accuracy'] for r in rows]):.2f}% / "
                     f"{np.mean([r['test_mae'] for r in rows]):.3f}")
        print(line)
        for r in rows:
            print(f"    {r['fold']}: {100 * r['accuracy']:.2f}% / {r['mae']:.3f} (epoch {r['epoch']}"
                  + (f"; test {100 * r['test_accuracy']:.2f}% / {r['test_mae']:.3f})" if show_test else ")"))


if __name__ == "__main__":
    main()

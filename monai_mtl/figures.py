"""Matplotlib figures (PNG): the cohort montage, and the evaluation figures of the paper."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from monai_mtl import RESPONSE_NAMES  # noqa: E402


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (temp name, then rename) and close it."""
    from monai_mtl.io import atomic_write

    try:
        return atomic_write(path, lambda partial: fig.savefig(partial, dpi=dpi, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    # RAS array (x, y, z): show x to the right and anterior up
    return volume[:, :, k].T


def cohort_montage(dataset_dir: str | os.PathLike, output: str | os.PathLike, slices: tuple[int, ...] | None = None) -> Path:
    """A few axial slices of the first subject of each class, with the atlas outline.

    Args:
        dataset_dir: a cohort written by :func:`monai_mtl.synthetic.generate_cohort`.
        output: PNG path.
        slices: axial slice indices (default: through the hippocampi, the caudate and the upper brain).
    """
    dataset_dir = Path(dataset_dir)
    labels = pd.read_csv(dataset_dir / "labels.csv")
    atlas_img = nib.load(dataset_dir / "atlas.nii.gz")
    atlas = np.asarray(atlas_img.dataobj)
    zooms = atlas_img.header.get_zooms()[:3]
    nz = atlas.shape[2]
    slices = slices or (int(round(nz * 0.33)), int(round(nz * 0.52)), int(round(nz * 0.7)))
    fig, axes = plt.subplots(len(RESPONSE_NAMES), len(slices), figsize=(2.6 * len(slices), 3.0 * len(RESPONSE_NAMES)))
    for row, name in enumerate(RESPONSE_NAMES):
        subject = labels[labels["response_name"] == name].iloc[0]
        volume = np.asarray(nib.load(dataset_dir / subject["image"]).dataobj, dtype=np.float32)
        for col, k in enumerate(slices):
            ax = axes[row, col]
            ax.imshow(_axial(volume, k), cmap="gray", origin="lower", vmin=0, vmax=1, aspect=zooms[1] / zooms[0])
            # outline of the regions the severity and class effects act on
            ax.contour(
                _axial(np.isin(atlas, (5, 6, 7, 8, 9)).astype(float), k), levels=[0.5], colors="tab:orange", linewidths=0.7
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{name}\nseverity {subject['severity']:.1f}", fontsize=9)
            if row == 0:
                ax.set_title(f"axial slice {k}", fontsize=9)
    fig.suptitle("Synthetic cohort: one subject per class (orange: PFC, hippocampi, caudate atlas)", fontsize=10)
    return save_figure(fig, output)


def saliency_overlay(volume: np.ndarray, maps: dict[str, np.ndarray], output: str | os.PathLike, num_slices: int = 4) -> Path:
    """PNG of a few axial slices of ``volume`` with each saliency map overlaid (one row per map).

    Arrays are in the scan's own voxel order; slices are taken along its third axis.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]
    nz = volume.shape[2]
    ks = np.linspace(nz * 0.25, nz * 0.75, num_slices).round().astype(int)
    fig, axes = plt.subplots(len(maps), num_slices, figsize=(2.2 * num_slices, 2.4 * len(maps)), squeeze=False)
    for row, (head, data) in enumerate(maps.items()):
        for col, k in enumerate(ks):
            ax = axes[row, col]
            ax.imshow(_axial(volume, k), cmap="gray", origin="lower")
            ax.imshow(_axial(data, k), cmap="jet", alpha=0.4, origin="lower", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{head}, slice {k}", fontsize=8)
    return save_figure(fig, output)


def confusion_matrix_figure(matrix: np.ndarray | list, output: str | os.PathLike, title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows: true class) with counts in each cell."""
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(matrix, cmap="Blues")
    names = [n.replace("_", " ") for n in RESPONSE_NAMES]
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, int(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_title(title)
    return save_figure(fig, output)


def reliability_diagram(curves: dict[str, pd.DataFrame], output: str | os.PathLike) -> Path:
    """Accuracy against confidence per bin (:func:`monai_mtl.trust.reliability_bins`), one line per curve.

    A calibrated model lies on the diagonal; marker area grows with the number of scans in the bin.
    """
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    for label, bins in curves.items():
        ax.plot(bins["confidence"], bins["accuracy"], marker="o", lw=1.2, label=label)
        ax.scatter(bins["confidence"], bins["accuracy"], s=8 + 120 * bins["n"] / max(int(bins["n"].sum()), 1), alpha=0.3)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability of the response probabilities")
    return save_figure(fig, output)


def severity_figures(true: np.ndarray, pred: np.ndarray, scatter: str | os.PathLike, histogram: str | os.PathLike) -> tuple[Path, Path]:
    """Predicted-vs-actual severity scatter with the identity line, and the error histogram (the paper's Figure 4)."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    mae = float(np.abs(pred - true).mean())
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(true, pred, s=10, alpha=0.7)
    ax.plot([0, 100], [0, 100], "r--", lw=1, label="identity")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("actual severity")
    ax.set_ylabel("predicted severity")
    ax.set_title(f"Severity (MAE {mae:.2f})")
    ax.legend(loc="upper left")
    first = save_figure(fig, scatter)
    fig, ax = plt.subplots(figsize=(4.4, 3.4))
    ax.hist(pred - true, bins=30, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("predicted − actual severity")
    ax.set_ylabel("subjects")
    ax.set_title(f"Severity error (MAE {mae:.2f})")
    return first, save_figure(fig, histogram)


def training_curves(scalars: dict[str, list[tuple[int, float]]], output: str | os.PathLike) -> Path:
    """Accuracy, severity MAE and losses per epoch, train and validation (the paper's Figure 2).

    Args:
        scalars: tag -> [(epoch, value)], e.g. read from the run's TensorBoard events.
    """
    panels = [
        ("Response accuracy", ("train_accuracy", "val_accuracy")),
        ("Severity MAE (0-100)", ("train_severity_mae", "val_severity_mae")),
        ("Loss", ("train_loss", "val_loss")),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (title, tags) in zip(axes, panels):
        for tag in tags:
            if scalars.get(tag):
                epochs, values = zip(*scalars[tag])
                ax.plot(epochs, values, marker=".", label=tag.split("_")[0])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    return save_figure(fig, output)


def robustness_figure(table: pd.DataFrame, output: str | os.PathLike) -> Path:
    """Accuracy and severity MAE per artifact kind against its strength, the clean scan as a dashed line.

    Args:
        table: ``robustness.csv``'s rows (``kind``, ``strength``, ``accuracy``, ``severity_mae``; a ``clean`` row);
            with ``ood_flagged``, the share of scans the OOD score flags is drawn in the accuracy panels too.
    """
    clean = table[table["kind"] == "clean"].iloc[0]
    kinds = [k for k in dict.fromkeys(table["kind"]) if k != "clean"]
    fig, axes = plt.subplots(2, max(len(kinds), 1), figsize=(2.3 * max(len(kinds), 1), 4.6), squeeze=False)
    for col, kind in enumerate(kinds):
        rows = table[table["kind"] == kind]
        for row, (metric, label) in enumerate((("accuracy", "accuracy"), ("severity_mae", "severity MAE"))):
            ax = axes[row, col]
            ax.plot(range(len(rows)), rows[metric].to_numpy(), marker="o", label=label)
            ax.axhline(clean[metric], color="k", ls="--", lw=0.8)
            if row == 0 and "ood_flagged" in rows:
                ax.plot(range(len(rows)), rows["ood_flagged"].to_numpy(), marker="x", ls=":", color="tab:red",
                        label="flagged OOD")
                if col == 0:
                    ax.legend(fontsize=6, loc="lower left")
            ax.set_xticks(range(len(rows)), [str(s) for s in rows["strength"]], fontsize=7, rotation=30)
            if row == 0:
                ax.set_title(kind.replace("_", " "), fontsize=9)
                ax.set_ylim(0, 1.02)
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle("Test part under scanner artifacts (dashed: clean scans)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output)


def importance_figure(importance: dict[str, dict[str, float]], output: str | os.PathLike,
                      units: dict[str, str] | None = None) -> Path:
    """Horizontal bars of each covariate's mean absolute attribution, one panel per task.

    Args:
        importance: ``{task: {column: mean |attribution|}}`` (:func:`monai_mtl.attribution.importance`).
        units: the x-axis label of each task's panel.
    """
    tasks = list(importance)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 0.45 * max(map(len, importance.values())) + 1.4),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        columns = list(importance[task])[::-1]  # the first column at the top
        ax.barh(columns, [importance[task][c] for c in columns], color="tab:blue" if task == "response" else "tab:orange")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel(f"mean |attribution| ({(units or {}).get(task, 'output units')})", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle("Covariate importance on the evaluated part (integrated gradients)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, output)

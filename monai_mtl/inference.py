"""Inference on new scans: input discovery with per-file checks, a predictions CSV, and Grad-CAM saliency maps.

Every input file is read once, by the same transforms as in training, and checked on that copy
(:class:`monai_mtl.transforms.CheckImaged`); a file that cannot be read or fails a check gets its
row in ``predictions.csv`` with the ``error`` column filled, and the others are still processed.
Saliency maps are computed on the model's grid and resampled, through the affines MONAI tracks,
back onto each input scan's own grid, so they overlay the scan in any NIfTI viewer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import SpatialResample
from monai.visualize import GradCAM
from torch import nn

from monai_mtl.bids import PARTICIPANTS, is_bids_root, read_participants, t1w_images
from monai_mtl.covariates import check_columns, stored_covariates  # noqa: F401 (inference.json's `covariate_encoding` names it here)
from monai_mtl.engines import COVARIATES_KEY
from monai_mtl.errors import CohortError, ConfigError
from monai_mtl.images import unreadable_error
from monai_mtl.io import atomic_write_csv, atomic_write_nifti, nifti_image
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, PROBABILITY_COLUMNS, prediction_table, split_output
from monai_mtl.trust import TRUST_COLUMNS, FeatureRecorder, TrustSettings, annotate, decode_calibrated

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PREDICTION_COLUMNS = (
    "image", "pred_response", "pred_response_name", *PROBABILITY_COLUMNS, "pred_severity", *TRUST_COLUMNS, "error",
)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _record(index: int, path: str) -> dict:
    """A datalist record for input ``index``; with ``error`` when the path cannot be a readable file at all."""
    record = {"image": path, "input_index": index}
    target = Path(path)
    if target.is_dir():
        record["error"] = f"{path}: is a folder, not a NIfTI file"
    elif not target.exists():
        record["error"] = f"{path}: does not exist" + (" (a broken symbolic link)" if target.is_symlink() else "")
    return record


def input_datalist(dataset_dir: str | os.PathLike, image_column: str = "image", covariates=None,
                   session: str | None = None) -> list[dict]:
    """One record per input, in order: every NIfTI-named entry of a folder (sorted), every row of a CSV, or
    each subject's T1w image of a BIDS dataset (:func:`monai_mtl.bids.t1w_images`; ``session``: the
    ``bids_session`` key, that session's image, as training picks it; unset, each subject's first session).

    Nothing is dropped: a blank ``image`` cell, a missing file, a broken link or a folder named like
    a NIfTI file (``.nii``, ``.nii.gz``, any case) gets a record with ``error`` set, which becomes its
    row of ``predictions.csv``. Each record carries ``input_index``, its position among the inputs.

    ``covariates``: the checkpoint's :class:`~monai_mtl.covariates.CovariateEncoding`, when it was trained
    with covariates: the input must then be a CSV with those columns or a BIDS dataset whose ``participants.tsv``
    has them, and each record gets its vector (a BIDS subject without a ``participants.tsv`` row gets an ``error``).

    Raises:
        CohortError: nothing there, a folder without NIfTI-named entries, or a CSV without the image column or rows;
            with ``covariates``, a folder of scans, or a CSV or ``participants.tsv`` without one of the checkpoint's
            covariate columns.
    """
    source = Path(dataset_dir)
    if covariates is not None and not (source.is_file() and source.suffix.lower() == ".csv") and not is_bids_root(source):
        raise CohortError(f"{source}: the checkpoint was trained with the covariates {covariates.columns}; give a CSV "
                          f"with an '{image_column}' column and those columns, or a BIDS dataset with them in "
                          f"{PARTICIPANTS}")
    if source.is_file() and source.suffix.lower() == ".csv":
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        if image_column not in table.columns:
            raise CohortError(f"{source}: no '{image_column}' column (columns: {list(table.columns)})")
        if table.empty:
            raise CohortError(f"{source}: the '{image_column}' column is empty")
        if covariates is not None:
            vectors = covariates.encode(table.replace("", np.nan), str(source))  # refuses a missing column
            return [{**record, COVARIATES_KEY: vector} for record, vector in zip(_csv_records(source, table, image_column), vectors)]
        return _csv_records(source, table, image_column)
    if source.is_dir() and is_bids_root(source):
        images = t1w_images(source, session)  # labels are not needed: every subject with a T1w image, in subject order
        if not images:
            raise CohortError(f"{source}: a BIDS dataset without T1w images (sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz])")
        records = [_record(i, images[subject]) for i, subject in enumerate(sorted(images))]
        return records if covariates is None else _participant_covariates(source, sorted(images), records, covariates)
    if source.is_dir():
        entries = sorted(str(p) for p in source.iterdir() if _is_nifti(p))
        if not entries:
            raise CohortError(f"{source}: no NIfTI files (*.nii, *.nii.gz) in this folder")
        return [_record(i, path) for i, path in enumerate(entries)]
    raise CohortError(f"{source}: not a folder of NIfTI files nor a CSV file")


def _participant_covariates(root: Path, subjects: list[str], records: list[dict], covariates) -> list[dict]:
    """``records`` (one per subject, in order) with each subject's covariate vector from the BIDS dataset's
    ``participants.tsv``, as training read it (:func:`monai_mtl.bids.read_participants`)."""
    source = str(root / PARTICIPANTS)
    participants = read_participants(root).rename(columns={"participant_id": "subject_id"}).set_index("subject_id", drop=False)
    check_columns(participants, covariates.columns, source)
    listed = [s for s in subjects if s in participants.index]
    vectors = dict(zip(listed, covariates.encode(participants.loc[listed], source))) if listed else {}
    for record, subject in zip(records, subjects):
        if subject in vectors:
            record[COVARIATES_KEY] = vectors[subject]
        elif "error" not in record:
            record["error"] = f"{source}: no row for {subject}, so its covariates {covariates.columns} are unknown"
    return records


def _csv_records(source: Path, table: pd.DataFrame, image_column: str) -> list[dict]:
    records = []
    for i, cell in enumerate(table[image_column].str.strip()):
        if not cell:
            records.append({"image": "", "input_index": i, "error": f"{source} line {i + 2}: empty '{image_column}' cell"})
        else:
            records.append(_record(i, cell if Path(cell).is_absolute() else str(source.parent / cell)))
    return records


def find_inputs(dataset_dir: str | os.PathLike, image_column: str = "image") -> list[str]:
    """The input paths of :func:`input_datalist` (``""`` for a blank CSV cell)."""
    return [record["image"] for record in input_datalist(dataset_dir, image_column)]


def unique_stems(paths: Sequence[str]) -> dict[str, str]:
    """A file-name stem per input path for its saliency files, distinct for every path.

    Inputs with distinct file names keep their stem (``scan.nii.gz`` -> ``scan``); inputs that share
    one (``a/scan.nii.gz``, ``b/scan.nii.gz``) get their folders' names in front (``a_scan``, ``b_scan``)
    until they differ, so no input's maps overwrite another's.
    """
    paths = list(dict.fromkeys(p for p in paths if p))
    stems: dict[str, str] = {}
    by_stem: dict[str, list[str]] = {}
    for path in paths:
        by_stem.setdefault(_stem(path), []).append(path)
    for stem, group in by_stem.items():
        if len(group) == 1:
            stems[group[0]] = stem
            continue
        parts = [Path(p).parent.parts for p in group]
        depth = 1
        while depth <= max(map(len, parts)):
            names = ["_".join((*part[-depth:], stem)) for part in parts]
            if len(set(names)) == len(names):
                break
            depth += 1
        else:
            names = [f"{stem}_{i}" for i in range(len(group))]
        stems.update(zip(group, names))
    return stems


def _input_error(path: str, err: BaseException) -> str:
    """The message of the first :class:`CohortError` in an exception chain, else "cannot read" with the innermost cause."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 20:
            break
    for link in chain:
        if isinstance(link, CohortError):
            return str(link)
    return str(unreadable_error(path, chain[-1]))


class TolerantDataset(Dataset):
    """A MONAI ``Dataset`` that turns a failing input into ``{"image": path, "error": message}``.

    Each scan is read once, by the transforms, and checked there (``CheckImaged``); a file that
    fails does not stop the run: its error travels to ``predictions.csv`` through
    :class:`UsableCollate`, and the other inputs are still predicted.
    """

    def _transform(self, index: int) -> dict:
        record = self.data[index]
        if "error" in record:  # known before reading (blank cell, missing file, folder)
            logger.warning("skipping %s", record["error"])
            return dict(record)
        try:
            return super()._transform(index)
        except Exception as err:  # any reader or transform failure is this file's error, not the run's
            path = str(record["image"])
            message = _input_error(path, err)
            logger.warning("skipping %s", message)
            return {"image": path, "input_index": record.get("input_index"), "error": message}


class UsableCollate:
    """Collate the usable items of a :class:`TolerantDataset` batch; the failed ones go to ``batch["errors"]``.

    A batch with no usable item gets an empty image batch ``(0, 1, *spatial_size)``, which the
    network passes through, so the evaluator's loop needs no special case.
    """

    def __init__(self, spatial_size: Sequence[int], num_covariates: int = 0) -> None:
        self.spatial_size = tuple(int(n) for n in spatial_size)
        self.num_covariates = int(num_covariates)

    def __call__(self, items: list[dict]) -> dict:
        usable = [item for item in items if "error" not in item]
        errors = [{"image": item["image"], "input_index": item.get("input_index"), "error": item["error"]}
                  for item in items if "error" in item]
        if usable:
            batch = list_data_collate(usable)
        else:
            batch = {"image": MetaTensor(torch.zeros(0, 1, *self.spatial_size), meta={"filename_or_obj": []})}
            if self.num_covariates:
                batch[COVARIATES_KEY] = torch.zeros(0, self.num_covariates)
        batch["errors"] = errors
        return batch


class HeadSelector(nn.Module):
    """Wrap a multi-task network so its forward returns one head, as ``GradCAM`` expects.

    ``head="response"`` returns the ``(B, num_classes)`` logits; ``head="severity"`` returns ``(B, 1)``.
    """

    def __init__(self, network: nn.Module, head: str, num_classes: int = NUM_RESPONSE_CLASSES) -> None:
        super().__init__()
        if head not in ("response", "severity"):
            raise ValueError(f"head must be 'response' or 'severity', got {head!r}")
        self.network, self.head, self.num_classes = network, head, num_classes
        # MONAI's CAM/gradient tools restore the wrapper's mode after each call, recursively: a wrapper
        # left in the default train mode would switch the wrapped network to training mode
        self.train(network.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, severity = split_output(self.network(x), self.num_classes)
        return logits if self.head == "response" else severity[:, None]


SALIENCY_METHODS = ("gradcam", "gradient", "smoothgrad")


def input_gradient_saliency(
    network: nn.Module, inputs: torch.Tensor, head: str, class_idx: torch.Tensor | None = None,
    samples: int = 0, noise: float = 0.1, seed: int = 0,
) -> torch.Tensor:
    """``|d output / d input|`` per voxel for one head, batched, scaled to [0, 1] per sample.

    ``samples > 0`` averages over that many copies with Gaussian noise of ``noise`` times each
    input's intensity range (SmoothGrad). MONAI's ``VanillaGrad``/``SmoothGrad`` accept one sample at
    a time; in eval mode the samples of a batch are independent, so one backward pass of the summed
    outputs gives every sample's gradient at once.

    Args:
        network: a multi-task network returning ``(B, num_classes + 1)``.
        inputs: ``(B, C, H, W, D)`` on the network's device.
        head: ``"response"`` (the logit of ``class_idx`` per sample) or ``"severity"``.
        class_idx: ``(B,)`` class per sample for the response head.
    """
    was_training = network.training
    network.eval()  # batch-norm statistics per sample would make each map depend on the rest of the batch
    selector = HeadSelector(network, head)
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    spread = noise * (inputs.amax(dim=(1, 2, 3, 4), keepdim=True) - inputs.amin(dim=(1, 2, 3, 4), keepdim=True))
    total = torch.zeros_like(inputs)
    for _ in range(max(samples, 1)):
        x = inputs if samples <= 0 else inputs + spread * torch.randn(inputs.shape, generator=generator, device=inputs.device)
        x = x.detach().clone().requires_grad_(True)
        out = selector(x)
        target = out.gather(1, class_idx.view(-1, 1).long()) if head == "response" else out
        (grad,) = torch.autograd.grad(target.sum(), x)
        total += grad.abs()
    network.train(was_training)
    peak = total.amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-12)
    return (total / peak).detach()


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class PredictionWriter:
    """Collect predictions of an inference evaluator and write ``predictions.csv`` when it completes.

    Inputs that failed to load or failed their checks (``batch["errors"]``, from :class:`UsableCollate`)
    get their row too, with ``error`` filled; rows follow the order of ``inputs`` when it is given. A
    run in which no input was usable raises :class:`CohortError` and writes nothing.
    Optionally computes Grad-CAM saliency per head and writes it as NIfTI in each input's space
    (``<output_dir>/saliency/<stem>_response.nii.gz`` and ``<stem>_severity.nii.gz``), PNG overlays of
    the first ``saliency_png`` inputs, and, when ``atlas`` is given and an input lies on its grid,
    the mean saliency per atlas region (``saliency/region_saliency.csv``).

    Args:
        output_dir: folder for ``predictions.csv`` and ``saliency/``.
        inputs: the datalist the evaluator reads (for the row order).
        saliency: compute and write saliency maps.
        method: ``"gradcam"`` (Grad-CAM on ``target_layer``), ``"gradient"`` (input gradients, full
            resolution) or ``"smoothgrad"`` (input gradients averaged over ``saliency_samples`` noisy copies).
        target_layer: network layer Grad-CAM reads; ``{head}`` in the name is replaced by the head
            (``"{head}_head.block"``: each task path's own last block).
        atlas: optional atlas NIfTI (the synthetic cohort's ``atlas.nii.gz``).
        saliency_png: how many inputs get a PNG overlay.
        trust: the checkpoint's :class:`~monai_mtl.trust.TrustSettings` (:func:`~monai_mtl.trust.read_trust`):
            calibrated probabilities, a severity interval, a class set and the OOD flag per input; ``None``
            (a checkpoint without them) leaves those columns empty.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        inputs: list[dict] | None = None,
        saliency: bool = False,
        target_layer: str = "{head}_head.block",
        atlas: str | os.PathLike | None = None,
        saliency_png: int = 3,
        method: str = "gradcam",
        saliency_samples: int = 8,
        trust: TrustSettings | None = None,
    ) -> None:
        if method not in SALIENCY_METHODS:
            raise ValueError(f"saliency method must be one of {SALIENCY_METHODS}, got {method!r}")
        self.method, self.saliency_samples = method, saliency_samples
        self.output_dir = Path(output_dir)
        self.stems = unique_stems([str(item["image"]) for item in inputs or []])
        self.error_rows: list[dict] = []
        if saliency and any(COVARIATES_KEY in item for item in inputs or []):
            # Grad-CAM and the gradient maps call the network on the image alone
            raise ConfigError("saliency maps are not available for a model trained with covariates yet: "
                              "run without --saliency")
        self.saliency, self.target_layer, self.saliency_png = saliency, target_layer, saliency_png
        self.atlas_path = Path(atlas) if atlas and Path(atlas).is_file() else None
        self.rows: list[dict] = []
        self.region_rows: list[dict] = []
        self.region_names: dict[int, str] = {}
        self._cams: dict[str, GradCAM] = {}
        self._pngs_written = 0
        self.trust = trust
        self._recorder: FeatureRecorder | None = None

    def attach(self, engine: Engine) -> None:
        if self.trust is not None:  # MONAI attaches handlers before the engine has its network: hook it on start
            engine.add_event_handler(Events.STARTED, self._record_features)
            engine.add_event_handler(Events.TERMINATE, lambda e: self._recorder and self._recorder.__exit__())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _record_features(self, engine: Engine) -> None:
        # the OOD features of the evaluator's own forward pass, read in _collect before saliency runs the network again
        self._recorder = FeatureRecorder(engine.network, self.trust.ood_layer).__enter__()

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        self.error_rows.extend(batch.get("errors", []))
        image = batch["image"]
        if image.shape[0] == 0:
            return
        paths = list(image.meta["filename_or_obj"])
        indices = batch.get("input_index")
        indices = [int(i) for i in indices] if indices is not None else [None] * len(paths)
        probabilities, pred_severity = decode_calibrated(engine.state.output["pred"], self.trust)
        table = prediction_table(probabilities, pred_severity, {"image": paths, "input_index": indices})
        features = self._recorder.last.numpy() if self._recorder is not None and self._recorder.last is not None else None
        table = annotate(table, features, self.trust)
        self.rows.extend(table.assign(error="").to_dict("records"))
        if self.saliency:
            self._write_saliency(engine, image, torch.as_tensor(probabilities.argmax(axis=1)))

    def _gradcam(self, network: nn.Module, head: str) -> GradCAM:
        if head not in self._cams:
            layer = self.target_layer.format(head=head)
            self._cams[head] = GradCAM(nn_module=HeadSelector(network, head), target_layers=f"network.{layer}")
        return self._cams[head]

    def _write_saliency(self, engine: Engine, image: MetaTensor, predicted: torch.Tensor) -> None:
        network = engine.network
        network.eval()
        inputs = image.as_tensor().to(engine.state.device)
        predicted = predicted.to(inputs.device)
        if self.method == "gradcam":
            maps = {
                "response": self._gradcam(network, "response")(inputs, class_idx=predicted),
                "severity": self._gradcam(network, "severity")(inputs, class_idx=0),
            }
        else:
            samples = self.saliency_samples if self.method == "smoothgrad" else 0
            maps = {head: input_gradient_saliency(network, inputs, head, predicted, samples) for head in ("response", "severity")}
        folder = self.output_dir / "saliency"
        folder.mkdir(parents=True, exist_ok=True)
        resample = SpatialResample(mode="bilinear", padding_mode="zeros")
        for i in range(inputs.shape[0]):
            path = image.meta["filename_or_obj"][i]
            source = nib.load(path)
            dst_affine = torch.as_tensor(source.affine, dtype=torch.float64)
            in_space = {}
            for head, cam in maps.items():
                on_model_grid = MetaTensor(cam[i].detach().float().cpu(), affine=image.affine[i])
                resampled = resample(on_model_grid, dst_affine=dst_affine, spatial_size=source.shape[:3])
                data = np.asarray(resampled[0].detach().cpu().numpy(), dtype=np.float32)
                in_space[head] = data
                atomic_write_nifti(folder / f"{self._stem(path)}_{head}.nii.gz", nifti_image(data, source.affine))
            self._region_means(path, source, in_space)
            if self._pngs_written < self.saliency_png:
                from monai_mtl.figures import saliency_overlay

                self._pngs_written += 1
                saliency_overlay(np.asanyarray(source.dataobj), in_space, folder / f"{self._stem(path)}_saliency.png")

    def _stem(self, path: str) -> str:
        return self.stems.get(path) or _stem(path)

    def _region_means(self, path: str, source: nib.Nifti1Image, maps: dict[str, np.ndarray]) -> None:
        if self.atlas_path is None:
            return
        atlas = nib.load(self.atlas_path)
        if atlas.shape[:3] != source.shape[:3] or not np.allclose(atlas.affine, source.affine, atol=1e-4):
            return
        labels = np.asarray(atlas.dataobj)
        names = self.region_names or atlas_region_names(self.atlas_path)
        self.region_names = names
        for head, data in maps.items():
            row = {"image": path, "head": head}
            row.update({names.get(int(k), f"region_{int(k)}"): float(data[labels == k].mean()) for k in np.unique(labels)})
            self.region_rows.append(row)

    def _write(self, engine: Engine) -> None:
        if self._recorder is not None:
            self._recorder.__exit__()
        if not self.rows:
            total = len(self.error_rows)
            first = self.error_rows[0]["error"] if self.error_rows else "no input"
            raise CohortError(f"none of the {total} input file(s) is usable; first error: {first}")
        last = len(self.rows) + len(self.error_rows)
        rows = sorted(self.rows + self.error_rows,
                      key=lambda row: row["input_index"] if row.get("input_index") is not None else last)
        table = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
        table["error"] = table["error"].fillna("")
        atomic_write_csv(self.output_dir / "predictions.csv", table)
        logger.info("wrote %d predictions (%d errors) to %s", len(self.rows), len(self.error_rows), self.output_dir / "predictions.csv")
        if self.region_rows:
            regions = pd.DataFrame(self.region_rows)
            atomic_write_csv(self.output_dir / "saliency" / "region_saliency.csv", regions)


def atlas_region_names(atlas: str | os.PathLike) -> dict[int, str]:
    """Region names of an atlas's labels, from ``atlas_labels`` of the ``cohort.json`` beside it (the synthetic cohort's).

    Labels without a name (an atlas of one's own, with no ``cohort.json``) are called ``region_<label>``.
    """
    description = Path(atlas).parent / "cohort.json"
    try:
        names = json.loads(description.read_text()).get("atlas_labels", {})
        return {int(k): str(v) for k, v in names.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def find_atlas(dataset_dir: str | os.PathLike) -> str | None:
    """The synthetic cohort's ``atlas.nii.gz`` next to the inputs (or next to the CSV), if there is one."""
    source = Path(dataset_dir)
    folder = source.parent if source.is_file() else source
    for candidate in (folder / "atlas.nii.gz", folder.parent / "atlas.nii.gz"):
        if candidate.is_file():
            return str(candidate)
    return None

"""Read and validate a cohort's ``labels.csv`` into MONAI datalists; stratified splits.

The images themselves are checked by :mod:`monai_mtl.images`.

A cohort is a folder with a ``labels.csv`` holding at least ``subject_id``, ``image`` (relative to the
CSV's folder, or absolute), ``response`` (0/1/2) and ``severity`` (0-100). Every problem is reported
as a :class:`CohortError` naming the file, the CSV row (as a line number of the file) and the column.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from monai_mtl import RESPONSE_NAMES, SEVERITY_SCALE
from monai_mtl.errors import CohortError
from monai_mtl.handlers import is_rank_zero
from monai_mtl.images import check_images
from monai_mtl.io import atomic_write_json

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("subject_id", "image", "response", "severity")
SPLIT_KEYS = ("train", "validation", "test")


def _line(index: int) -> int:
    # the CSV's line number of DataFrame row `index` (line 1 is the header)
    return int(index) + 2


def read_labels(csv_path: str | os.PathLike, response_column: str = "response", severity_column: str = "severity") -> pd.DataFrame:
    """Read and validate ``labels.csv``; returns it with ``image`` made absolute and typed columns.

    ``response_column`` / ``severity_column``: the CSV's columns that hold the labels (renamed to
    ``response`` and ``severity``).

    Raises:
        CohortError: a missing or empty file, a missing column, a response not in 0/1/2, a severity
            that is not a number in [0, 100], a duplicate subject id, or an image path that does not exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CohortError(f"{csv_path}: no such labels file (expected a CSV with columns {', '.join(REQUIRED_COLUMNS)})")
    try:
        table = pd.read_csv(csv_path, dtype={"subject_id": str, "image": str}, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise CohortError(f"{csv_path}: the file is empty (expected a header with {', '.join(REQUIRED_COLUMNS)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CohortError(f"{csv_path}: not a readable CSV ({err})") from None
    if response_column != "response" or severity_column != "severity":
        absent = [c for c in (response_column, severity_column) if c not in table.columns]
        if absent:
            raise CohortError(f"{csv_path}: no column(s) {absent} (response_column / severity_column), "
                              f"columns are {list(table.columns)}")
        table = table.drop(columns=[c for c in ("response", "severity") if c in table.columns])
        table = table.rename(columns={response_column: "response", severity_column: "severity"})
    return validate_labels(table, csv_path)


def validate_labels(table: pd.DataFrame, csv_path: str | os.PathLike) -> pd.DataFrame:
    """Check a labels table read from ``csv_path`` (a ``labels.csv`` or a BIDS ``participants.tsv``).

    Row ``i`` of ``table`` is line ``i + 2`` of that file. Returns the table with typed ``response`` and
    ``severity`` and absolute ``image`` paths (relative ones taken from the file's folder).

    Raises:
        CohortError: as :func:`read_labels`.
    """
    csv_path = Path(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CohortError(f"{csv_path}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    if table.empty:
        raise CohortError(f"{csv_path}: no subjects (no rows with an image and labels)")

    for column in ("subject_id", "image"):
        blank = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if blank.any():
            raise CohortError(f"{csv_path} line {_line(blank.idxmax())}: empty '{column}'")
    duplicated = table["subject_id"].duplicated(keep=False)
    if duplicated.any():
        ids = sorted(table.loc[duplicated, "subject_id"].unique())[:5]
        lines = [_line(i) for i in table.index[duplicated]][:6]
        raise CohortError(f"{csv_path}: duplicate subject_id {ids} on lines {lines}")

    response = pd.to_numeric(table["response"], errors="coerce")
    bad = response.isna() | ~response.isin(range(len(RESPONSE_NAMES)))
    if bad.any():
        i = bad.idxmax()
        raise CohortError(
            f"{csv_path} line {_line(i)} (subject {table.at[i, 'subject_id']}): response {table.at[i, 'response']!r} "
            f"is not one of {list(range(len(RESPONSE_NAMES)))} ({', '.join(RESPONSE_NAMES)})"
        )
    severity = pd.to_numeric(table["severity"], errors="coerce")
    bad = severity.isna() | ~np.isfinite(severity) | (severity < 0) | (severity > SEVERITY_SCALE)
    if bad.any():
        i = bad.idxmax()
        raise CohortError(
            f"{csv_path} line {_line(i)} (subject {table.at[i, 'subject_id']}): severity {table.at[i, 'severity']!r} "
            f"is not a number in [0, {SEVERITY_SCALE:g}]"
        )

    table = table.copy()
    table["response"] = response.astype(int)
    table["severity"] = severity.astype(float)
    table["image"] = [str(p if Path(p).is_absolute() else (csv_path.parent / p)) for p in table["image"].astype(str)]
    exists = table["image"].map(os.path.isfile)
    if not exists.all():
        i = (~exists).idxmax()
        raise CohortError(
            f"{csv_path} line {_line(i)} (subject {table.at[i, 'subject_id']}): image file {table.at[i, 'image']} does not exist"
            + (f" ({int((~exists).sum())} missing in all)" if (~exists).sum() > 1 else "")
        )
    same_file = table["image"].map(os.path.realpath)
    shared = same_file.duplicated(keep=False)
    if shared.any():
        first = same_file[shared].iloc[0]
        lines = [_line(i) for i in table.index[same_file == first]][:6]
        raise CohortError(
            f"{csv_path}: lines {lines} point at the same image file {first}: one scan would count as several "
            f"subjects (and could land in training and test); keep one row per scan"
            + (f" ({int(shared.sum())} rows share files in all)" if shared.sum() > len(lines) else "")
        )
    return table


def stratified_split(
    table: pd.DataFrame,
    test_fraction: float = 0.15,
    validation_fraction: float = 0.15,
    seed: int = 42,
    num_folds: int = 0,
    fold: int = 0,
    held_out_site: object = None,
) -> dict[str, list[str]]:
    """Stratified ``train`` / ``validation`` / ``test`` subject ids.

    ``test_fraction`` of the cohort is held out first; ``validation_fraction`` of the rest is carved
    from the training side (it drives early stopping, checkpoint selection and LR scheduling).
    With ``num_folds > 1`` the test part is instead fold ``fold`` of a stratified k-fold partition
    (seeded), and the validation part is carved from the other folds. With ``held_out_site`` the
    test part is every subject of that ``site`` (leave-one-site-out), and the other sites are split
    into training and validation.
    """
    for name, fraction in (("test_fraction", test_fraction), ("validation_fraction", validation_fraction)):
        if not 0.0 < fraction < 1.0:
            raise CohortError(f"{name} must be in (0, 1), got {fraction}")
    counts = table["response"].value_counts()
    smallest = int(counts.min())
    if len(counts) < 2 or smallest < 3:
        detail = ", ".join(f"{RESPONSE_NAMES[k]}: {int(v)}" for k, v in counts.sort_index().items())
        raise CohortError(
            f"cannot stratify a train/validation/test split: every response class needs at least 3 subjects "
            f"and at least 2 classes are needed (class counts: {detail})"
        )
    ids = table["subject_id"].to_numpy()
    if num_folds > 1 and not 0 <= fold < num_folds:
        raise CohortError(f"fold {fold} is out of range for {num_folds} folds (0 to {num_folds - 1})")
    if num_folds > 1 and smallest < num_folds:
        raise CohortError(f"cannot make {num_folds} stratified folds: the smallest class has {smallest} subjects")
    if held_out_site is not None:
        if "site" not in table.columns:
            raise CohortError(f"held_out_site {held_out_site!r} needs a 'site' column in labels.csv")
        at_site = (table["site"].astype(str) == str(held_out_site)).to_numpy()
        if not at_site.any() or at_site.all():
            sites = sorted(table["site"].astype(str).unique())
            raise CohortError(f"held_out_site {held_out_site!r} must be one of several sites in labels.csv, which has {sites}")
    try:
        if held_out_site is not None:
            rest, test = ids[~at_site], ids[at_site]
        elif num_folds > 1:
            folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
            rest_index, test_index = list(folds.split(ids, table["response"]))[fold]
            rest, test = ids[rest_index], ids[test_index]
        else:
            rest, test = train_test_split(ids, test_size=test_fraction, stratify=table["response"], random_state=seed)
        rest_labels = table.set_index("subject_id").loc[rest, "response"]
        train, validation = train_test_split(rest, test_size=validation_fraction, stratify=rest_labels, random_state=seed)
    except ValueError as err:  # a class too small for the requested fractions
        raise CohortError(f"cannot stratify the split with these class counts ({counts.to_dict()}): {err}") from None
    split = {"train": sorted(train.tolist()), "validation": sorted(validation.tolist()), "test": sorted(test.tolist())}
    check_disjoint(split)
    return split


def check_disjoint(split: dict[str, list[str]]) -> None:
    """Raise ``CohortError`` if any subject is in two parts of a split."""
    for i, a in enumerate(SPLIT_KEYS):
        for b in SPLIT_KEYS[i + 1 :]:
            shared = set(split.get(a, [])) & set(split.get(b, []))
            if shared:
                raise CohortError(f"split parts '{a}' and '{b}' share {len(shared)} subject(s), e.g. {sorted(shared)[:3]}")


def read_cohort(
    dataset_dir: str | os.PathLike, response_column: str = "response", severity_column: str = "severity",
    session: str | None = None,
) -> pd.DataFrame:
    """The validated labels table of a cohort folder: a BIDS dataset (:mod:`monai_mtl.bids`) or a ``labels.csv`` folder.

    ``session``: the BIDS session to use when subjects have several (default: the first of each).
    """
    from monai_mtl.bids import PARTICIPANTS, is_bids_root, read_bids_cohort

    dataset_dir = Path(dataset_dir)
    if is_bids_root(dataset_dir) and not (dataset_dir / "labels.csv").is_file():
        table = read_bids_cohort(dataset_dir, response_column, severity_column, session)
        return validate_labels(table, dataset_dir / PARTICIPANTS)
    return read_labels(dataset_dir / "labels.csv", response_column, severity_column)


def to_datalist(table: pd.DataFrame, subject_ids: list[str] | None = None) -> list[dict]:
    """MONAI datalist records ``{"image", "response", "severity", "subject_id"}`` in ``subject_ids`` order."""
    rows = table.set_index("subject_id", drop=False)
    if subject_ids is not None:
        rows = rows.loc[subject_ids]
    return [
        {"image": r.image, "response": int(r.response), "severity": float(r.severity), "subject_id": str(r.subject_id)}
        for r in rows.itertuples(index=False)
    ]


def ensure_cohort(
    dataset_dir: str | os.PathLike, synthetic_dir: str | os.PathLike | None = None,
    shape: tuple[int, int, int] | None = None, spacing: tuple[float, float, float] | None = None,
    num_samples: int | None = None, covariates: bool = False,
) -> Path:
    """Return ``dataset_dir``, generating the paper's synthetic cohort first when it is ``synthetic_dir`` and empty.

    ``shape`` / ``spacing``: the grid to render it on (default: the paper's 64 x 64 x 16 at 2.5 x 3 x 8 mm;
    ``highres.json`` renders the same anatomy at 1.5 mm). ``num_samples`` (default 1500) and ``covariates``
    (``generate --covariates``: the multimodal cohort of ``multimodal.json``) as in ``generate``; a cohort already in
    ``synthetic_dir`` made otherwise than these ask is refused. Any other folder without ``labels.csv`` is an
    error: real cohorts are never invented.
    """
    from monai_mtl.bids import is_bids_root

    dataset_dir = Path(dataset_dir)
    if (dataset_dir / "labels.csv").is_file() or is_bids_root(dataset_dir):
        if synthetic_dir is not None and dataset_dir.absolute() == Path(synthetic_dir).absolute():
            _check_made_as_asked(dataset_dir, shape, spacing, num_samples, covariates)
        if covariates:
            _warn_if_made_without_ageing(dataset_dir)
        return dataset_dir
    if synthetic_dir is not None and dataset_dir.absolute() == Path(synthetic_dir).absolute():
        from monai_mtl.synthetic import CohortConfig, generate_cohort

        grid = {k: tuple(v) for k, v in (("shape", shape), ("spacing_mm", spacing)) if v is not None}
        config = replace(CohortConfig(), **grid, **({"num_samples": int(num_samples)} if num_samples else {}))
        logger.info("no cohort in %s yet: generating the paper's synthetic cohort (%d volumes, seed %d, %s voxels of %s mm%s)",
                    dataset_dir, config.num_samples, config.seed, "x".join(map(str, config.shape)),
                    "x".join(f"{v:g}" for v in config.spacing_mm), ", with clinical covariates" if covariates else "")
        generate_cohort(dataset_dir, config, covariates=bool(covariates))
        return dataset_dir
    raise CohortError(f"{dataset_dir}: no labels.csv and not a BIDS dataset (no dataset_description.json); "
                      "see README 'Bring your own scans'")


def _check_made_as_asked(dataset_dir: Path, shape, spacing, num_samples, covariates: bool) -> None:
    """Refuse a generated cohort in ``synthetic_dir`` made otherwise than the config asks (grid, size, covariates).

    Only what the config sets is compared (``None``: whatever is there). Without this a training asked for
    ``highres.json``'s grid, or 300 subjects, would train on whatever an earlier command left in the folder.
    """
    try:
        recorded = json.loads((dataset_dir / "cohort.json").read_text())
    except (OSError, ValueError):
        return  # not a cohort of our generator: nothing recorded to compare
    if recorded.get("generator") != "monai_mtl.synthetic":
        return
    made = recorded.get("parameters", {})
    asked, found = [], []
    if shape is not None and list(map(int, shape)) != list(made.get("shape", [])):
        asked.append(f"synthetic_shape {list(map(int, shape))}")
        found.append(f"shape {made.get('shape')}")
    if spacing is not None and not np.allclose(np.asarray(spacing, float), np.asarray(made.get("spacing_mm", [np.nan] * 3), float)):
        asked.append(f"synthetic_spacing {[float(v) for v in spacing]}")
        found.append(f"spacing_mm {made.get('spacing_mm')}")
    if num_samples is not None and int(num_samples) != made.get("num_samples"):
        asked.append(f"synthetic_num_samples {int(num_samples)}")
        found.append(f"num_samples {made.get('num_samples')}")
    if covariates and "covariates" not in recorded:
        asked.append("synthetic_covariates true")
        found.append("no clinical covariates")
    if asked:
        raise CohortError(f"{dataset_dir}/cohort.json: this synthetic cohort was made with {', '.join(found)}, but the config "
                          f"asks for {', '.join(asked)}; make it again (python -m monai_mtl generate --output {dataset_dir} "
                          "... --overwrite) or set synthetic_dir to another folder")


def _warn_if_made_without_ageing(dataset_dir: Path) -> None:
    # a multimodal cohort of generator 0.1.0 has no age-related atrophy: the figures of multimodal.json's
    # README section are not made on it, and the fused model's severity has nothing to gain from the age there
    try:
        recorded = json.loads((dataset_dir / "cohort.json").read_text())
    except (OSError, ValueError):
        return  # not a synthetic cohort of ours
    if recorded.get("generator") == "monai_mtl.synthetic" and "covariates" in recorded \
            and recorded.get("parameters", {}).get("age_atrophy_per_year") is None:
        logger.warning("%s was generated by monai-mtl %s, without the age-related atrophy of generate --covariates "
                       "since 0.2.0; make it again with generate --covariates --overwrite to train on the current cohort",
                       dataset_dir, recorded.get("version", "?"))


class Datalists(dict):
    """``{"train": [...], "validation": [...], "test": [...]}``, with the covariate encoding fitted on the training part (or ``None``)."""

    covariates = None


def prepare_datalists(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 42,
    test_fraction: float = 0.15,
    validation_fraction: float = 0.15,
    validate_images: bool = True,
    num_folds: int = 0,
    fold: int = 0,
    held_out_site: object = None,
    response_column: str = "response",
    severity_column: str = "severity",
    bids_session: str | None = None,
    covariates: Sequence[str] = (),
    covariate_count_levels: int = 0,
) -> Datalists:
    """Validate the cohort in ``dataset_dir``, split it and write ``<output_dir>/split.json``.

    An existing ``split.json`` made with the same seed and fractions for the same subjects is reused
    (so a resumed or re-evaluated run sees the same split); anything else is an error, to keep one
    run folder from mixing two splits.

    With ``num_folds > 1`` the test part is fold ``fold`` of a stratified k-fold partition
    (cross-validation); ``test_fraction`` is then unused. With ``held_out_site`` the test part is
    that site's subjects (leave-one-site-out). ``dataset_dir`` may be a BIDS dataset; ``response_column``,
    ``severity_column`` and ``bids_session``: see :func:`read_cohort`. ``covariates``: columns encoded by
    :class:`~monai_mtl.covariates.CovariateEncoding` fitted on the training part (``datalists.covariates``);
    each record gets its vector under ``"covariates"``; ``covariate_count_levels``: its ``count_levels``
    (``column>=k`` steps for whole-number columns with at most that many levels; 0: none).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` MONAI datalists.
    """
    table = read_cohort(dataset_dir, response_column, severity_column, bids_session)
    if validate_images:
        check_images(table)
    settings = {"seed": int(seed), "test_fraction": float(test_fraction), "validation_fraction": float(validation_fraction)}
    if num_folds > 1:
        settings.update(num_folds=int(num_folds), fold=int(fold))
    if held_out_site is not None:
        settings.update(held_out_site=str(held_out_site))
    split_path = Path(output_dir) / "split.json"
    split = stratified_split(table, test_fraction, validation_fraction, seed, num_folds, fold, held_out_site)
    if split_path.is_file():
        stored = json.loads(split_path.read_text())
        if {k: stored.get(k) for k in SPLIT_KEYS} != split or stored.get("settings") != settings:
            raise CohortError(
                f"{split_path} holds another split (other subjects, seed or fractions) than this cohort gives; "
                "use a new output_dir, or delete the old run folder"
            )
    elif is_rank_zero():  # under torch.distributed only rank 0 writes files
        response = table.set_index("subject_id")["response"]
        counts = {k: np.bincount(response.loc[v], minlength=len(RESPONSE_NAMES)).tolist() for k, v in split.items()}
        atomic_write_json(
            split_path,
            {**split, "settings": settings, "dataset_dir": str(Path(dataset_dir).absolute()), "class_counts": counts},
        )
    logger.info("split: %s", {k: len(v) for k, v in split.items()})
    datalists = Datalists({k: to_datalist(table, split[k]) for k in SPLIT_KEYS})
    if covariates:
        from monai_mtl.covariates import CovariateEncoding
        from monai_mtl.engines import COVARIATES_KEY

        source = str(dataset_dir)
        rows = table.set_index("subject_id", drop=False)
        datalists.covariates = CovariateEncoding.fit(rows.loc[split["train"]], list(covariates), source,
                                                     covariate_count_levels)  # training part only
        vectors = dict(zip(table["subject_id"], datalists.covariates.encode(table, source)))
        for records in datalists.values():
            for record in records:
                record[COVARIATES_KEY] = vectors[record["subject_id"]]
        logger.info("covariates %s -> %d features, fitted on the training part", list(covariates), datalists.covariates.size)
    return datalists

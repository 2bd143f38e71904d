"""BIDS datasets as cohorts: ``participants.tsv`` plus ``sub-<label>[/ses-<label>]/anat/*_T1w.nii[.gz]``.

Read with pybids (``BIDSLayout``), the reference implementation of the BIDS specification's file
naming, rather than a glob of our own: it knows entities (subject, session, run, acquisition),
extensions and what to ignore (``.bidsignore``, ``derivatives/``, ``sourcedata/``), and its
``validate=True`` indexes only files whose names the BIDS validator's rules accept. A subject's T1w
image is chosen as follows: the session named by ``session`` (the ``bids_session`` config key) when
given, else the first session in sorted order; within it the first run. Every choice among several is
logged, never silent.

Labels come from ``participants.tsv``: ``response_column`` and ``severity_column`` name its columns
(defaults ``response`` and ``severity``); its other columns (``site``, ``age``...) are kept. Subjects
with labels but no T1w image, and subjects with an image but no labels, are left out and listed in one
message; a missing labels column or a bad value is a :class:`~monai_mtl.errors.CohortError` naming the
file, line and column.

:func:`write_layout` turns a generated cohort folder into a BIDS dataset (``generate --layout bids``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from monai_mtl.errors import CohortError, ConfigError

logger = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
PARTICIPANTS = "participants.tsv"
DESCRIPTION = "dataset_description.json"
T1W_EXTENSIONS = (".nii.gz", ".nii")


def is_bids_root(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a BIDS dataset (it has ``dataset_description.json``)."""
    return (Path(folder) / DESCRIPTION).is_file()


def read_participants(root: str | os.PathLike) -> pd.DataFrame:
    """``participants.tsv`` as strings, ``n/a`` (BIDS) and empty cells as missing."""
    path = Path(root) / PARTICIPANTS
    if not path.is_file():
        raise CohortError(f"{path}: no such file (a BIDS cohort needs participants.tsv with participant_id and its labels)")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", ""])
    if "participant_id" not in table.columns:
        raise CohortError(f"{path}: no participant_id column (BIDS requires it first), columns are {list(table.columns)}")
    return table


def t1w_images(root: str | os.PathLike, session: str | None = None) -> dict[str, str]:
    """``{participant_id: T1w image path}`` of every subject with one (one image each, choices logged)."""
    try:
        from bids import BIDSLayout
    except ImportError:
        raise ConfigError(f"{root} is a BIDS dataset; reading it needs pybids: pip install 'monai-mtl[bids]'") from None

    layout = BIDSLayout(str(root), validate=True)
    files = layout.get(suffix="T1w", datatype="anat", extension=list(T1W_EXTENSIONS))
    by_subject: dict[str, list] = {}
    for f in files:
        by_subject.setdefault(f"sub-{f.entities['subject']}", []).append(f)
    chosen, several = {}, []
    for subject, candidates in by_subject.items():
        sessions = sorted({str(f.entities.get("session", "")) for f in candidates})
        if session is not None:
            candidates = [f for f in candidates if str(f.entities.get("session", "")) == str(session)]
            if not candidates:
                continue  # listed with the subjects without an image
        elif len(sessions) > 1:
            several.append(subject)
            candidates = [f for f in candidates if str(f.entities.get("session", "")) == sessions[0]]
        candidates.sort(key=lambda f: (str(f.entities.get("run", "")), f.path))
        chosen[subject] = candidates[0].path
    if several:
        logger.info("%d subjects have several sessions; the first of each is used (set bids_session to choose): %s",
                    len(several), _some(several))
    return chosen


def read_bids_cohort(
    root: str | os.PathLike, response_column: str = "response", severity_column: str = "severity", session: str | None = None,
) -> pd.DataFrame:
    """The labels table of a BIDS dataset: ``subject_id`` (``sub-<label>``), ``image``, ``response``, ``severity``, the rest.

    Values are not checked here: :func:`monai_mtl.cohort.validate_labels` does, as for a ``labels.csv``.
    """
    root = Path(root)
    participants = read_participants(root)
    path = root / PARTICIPANTS
    missing = [c for c in (response_column, severity_column) if c not in participants.columns]
    if missing:
        raise CohortError(f"{path}: no column(s) {missing} (response_column / severity_column), "
                          f"columns are {list(participants.columns)}")
    images = t1w_images(root, session)
    labelled = participants[response_column].notna() & participants[severity_column].notna()
    has_image = participants["participant_id"].isin(images)
    left_out = []
    no_image = participants.loc[~has_image, "participant_id"].tolist()
    if no_image:
        left_out.append(f"{len(no_image)} without a T1w image" + (f" in session {session}" if session else "")
                        + f": {_some(no_image)}")
    no_labels = participants.loc[has_image & ~labelled, "participant_id"].tolist()
    if no_labels:
        left_out.append(f"{len(no_labels)} without {response_column}/{severity_column}: {_some(no_labels)}")
    unlisted = sorted(set(images) - set(participants["participant_id"]))
    if unlisted:
        left_out.append(f"{len(unlisted)} with an image but not in participants.tsv: {_some(unlisted)}")
    if left_out:
        logger.warning("%s: subjects left out of the cohort: %s", root, "; ".join(left_out))
    keep = participants[has_image & labelled]
    table = keep.rename(columns={"participant_id": "subject_id", response_column: "response", severity_column: "severity"})
    table.insert(1, "image", [images[s] for s in keep["participant_id"]])
    return table


def _some(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_layout(folder: str | os.PathLike, labels: pd.DataFrame, name: str = "monai-mtl synthetic cohort") -> None:
    """Rewrite a generated cohort folder (``images/``, ``labels.csv``) as a BIDS dataset, in place.

    Images move to ``sub-<label>/anat/sub-<label>_T1w.nii.gz``; the labels become ``participants.tsv``
    (with ``participants.json`` describing its columns); ``cohort.json`` and ``atlas.nii.gz`` stay at
    the root, listed in ``.bidsignore`` (they are the generator's, not BIDS files).
    """
    folder = Path(folder)
    for row in labels.itertuples(index=False):
        anat = folder / row.subject_id / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        (folder / row.image).rename(anat / f"{row.subject_id}_T1w.nii.gz")
    (folder / "images").rmdir()
    (folder / "labels.csv").unlink()
    participants = labels.drop(columns=["image"]).rename(columns={"subject_id": "participant_id"})
    participants.to_csv(folder / PARTICIPANTS, sep="\t", index=False, na_rep="n/a")
    columns = {
        "participant_id": {"Description": "subject label"},
        "response": {"Description": "medication-response class", "Levels": {"0": "non_responder", "1": "partial_responder",
                                                                            "2": "responder"}},
        "response_name": {"Description": "name of the response class"},
        "severity": {"Description": "disease severity", "Units": "points on a 0-100 scale"},
        "site": {"Description": "acquisition site (generate --sites)"},
    }
    (folder / "participants.json").write_text(json.dumps({k: v for k, v in columns.items() if k in participants}, indent=2) + "\n")
    description = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
                   "GeneratedBy": [{"Name": "monai-mtl", "Description": "python -m monai_mtl generate --layout bids"}]}
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    (folder / ".bidsignore").write_text("cohort.json\natlas.nii.gz\n")


__all__ = ["is_bids_root", "read_participants", "t1w_images", "read_bids_cohort", "write_layout", "BIDS_VERSION"]

"""Clinical covariates as network inputs: an encoding fitted on the training part and stored in the checkpoint.

The ``covariates`` config key lists ``labels.csv`` (or ``participants.tsv``) columns. On the training
part only, :meth:`CovariateEncoding.fit` decides each column's kind and its parameters:

- **numeric** (every present value parses as a number): standardised with the training part's mean and
  standard deviation; a missing value becomes 0 (the training mean);
- **text**: one-hot over the categories seen in the training part (sorted); a missing value is all zeros;
  a category the training part never had is all zeros too, and logged (with the subject) by
  :meth:`CovariateEncoding.encode`;
- **count steps** (``count_levels`` > 0): a numeric column whose training values are whole numbers with
  3 to ``count_levels`` distinct levels (a count, a grade, a score on a short scale) also gets one indicator
  ``column>=k`` per training level ``k`` above its lowest (a thermometer code; 0 where the value is missing).
  A rule that changes at one level (e.g. "three or more failed treatments") is then one feature for the
  network to weight, not a step it has to carve from a standardised value with ReLUs under weight decay;
  the standardised value stays beside it. scikit-learn's ``KBinsDiscretizer`` one-hot codes bins, which
  puts each level apart instead of "this level or more", so the steps are made here;
- and for every column a **missing indicator** (1 where the value is missing or an unknown category), so
  the network can tell "average" from "unknown".

A value missing in a column is the column's **missing code**: its features all 0 but the indicator (the
training mean, no category, no step). :class:`CovariateDropout` (the ``covariate_dropout`` config key) writes
that code over randomly chosen columns of the training batches: a network that sees a column missing in 5%
of its training subjects reads "missing" from a few dozen examples; dropped values give it many more, drawn
from the very subjects whose value it otherwise knows (the reading a missing-completely-at-random value
deserves, the way modality dropout trains a multimodal network for an absent input).

A test-part value never changes the encoding (it is fitted before the other parts are encoded); the
encoding is stored in ``model.pt`` beside the preprocessing, so evaluation and inference encode exactly
as training did. A listed column absent from the table is a :class:`~monai_mtl.errors.CohortError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from monai_mtl.errors import CohortError, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class CovariateEncoding:
    """How each covariate column becomes network inputs (see the module's documentation)."""

    columns: list[str]
    numeric: dict[str, list[float]] = field(default_factory=dict)  # column -> [mean, std]
    categories: dict[str, list[str]] = field(default_factory=dict)  # column -> training categories
    steps: dict[str, list[float]] = field(default_factory=dict)  # numeric column -> levels k of its ``column>=k`` indicators

    @classmethod
    def fit(cls, table: pd.DataFrame, columns: Sequence[str], source: str = "labels.csv",
            count_levels: int = 0) -> CovariateEncoding:
        """Fit the encoding of ``columns`` on ``table`` (the training part); ``count_levels``: see the module's count steps."""
        check_columns(table, columns, source)
        if isinstance(count_levels, bool) or not isinstance(count_levels, (int, np.integer)) or count_levels < 0:
            raise ConfigError(f"covariate_count_levels must be a whole number, 0 (no count steps) or more, got {count_levels!r}")
        numeric, categories, steps = {}, {}, {}
        for column in columns:
            present = table[column].dropna()
            values = pd.to_numeric(present, errors="coerce")
            if len(present) and values.notna().all():
                std = float(values.std(ddof=0)) if len(values) > 1 else 0.0
                numeric[column] = [float(values.mean()), std if std > 0 else 1.0]
                levels = np.unique(values.to_numpy(dtype=float))
                if 3 <= len(levels) <= count_levels and np.all(levels == np.round(levels)):
                    steps[column] = [float(k) for k in levels[1:]]
            else:
                categories[column] = sorted({str(v).strip() for v in present})
        return cls(list(columns), numeric, categories, steps)

    @property
    def feature_names(self) -> list[str]:
        """The name of each encoded feature, in order (one-hot: ``column=category``; indicators: ``column:missing``)."""
        names = []
        for column in self.columns:
            names += [column] if column in self.numeric else [f"{column}={c}" for c in self.categories[column]]
            names += [f"{column}>={k:g}" for k in self.steps.get(column, [])]
            names.append(f"{column}:missing")
        return names

    @property
    def size(self) -> int:
        return len(self.feature_names)

    @property
    def column_widths(self) -> list[int]:
        """How many features each column encodes to (its value or categories, its steps, its missing indicator)."""
        return [(1 if column in self.numeric else len(self.categories[column])) + len(self.steps.get(column, [])) + 1
                for column in self.columns]

    @property
    def column_of_feature(self) -> list[int]:
        """For each encoded feature, the index in :attr:`columns` of the column it encodes."""
        return [i for i, width in enumerate(self.column_widths) for _ in range(width)]

    @property
    def missing_code(self) -> np.ndarray:
        """The features of a subject whose every column is missing: 0 but each column's missing indicator (its last)."""
        return np.concatenate([np.eye(1, width, width - 1, dtype=np.float32)[0] for width in self.column_widths]
                              or [np.zeros(0, np.float32)])

    def encode(self, table: pd.DataFrame, source: str = "labels.csv") -> np.ndarray:
        """``(len(table), size)`` float32 features of ``table``'s rows; unknown categories logged with their subjects."""
        check_columns(table, self.columns, source)
        blocks = []
        for column in self.columns:
            raw = table[column]
            missing = raw.isna().to_numpy()
            if column in self.numeric:
                mean, std = self.numeric[column]
                values = pd.to_numeric(raw, errors="coerce")
                bad = values.isna().to_numpy() & ~missing
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise CohortError(f"{source}: column '{column}' is numeric in the training part, but "
                                      f"{_who(table, i)} has {raw.iloc[i]!r}")
                block = ((values.fillna(mean).to_numpy(dtype=float) - mean) / std)[:, None]
                if self.steps.get(column):  # NaN >= k is False: a missing count has no steps, its indicator says why
                    present = values.to_numpy(dtype=float)[:, None]
                    block = np.concatenate([block, present >= np.asarray(self.steps[column])[None, :]], axis=1)
            else:
                known = self.categories[column]
                text = raw.astype(object).where(~raw.isna(), None)
                text = np.array([None if v is None else str(v).strip() for v in text], dtype=object)
                block = np.stack([(text == c) for c in known], axis=1).astype(float) if known else np.zeros((len(raw), 0))
                unknown = np.array([v is not None and v not in known for v in text])
                if unknown.any():
                    logger.warning("%s: column '%s' has categories the training part did not have, encoded as missing: %s",
                                   source, column, ", ".join(f"{_who(table, i)}: {text[i]!r}" for i in np.flatnonzero(unknown)[:5]))
                    missing = missing | unknown
            blocks += [block, missing[:, None].astype(float)]
        return np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((len(table), 0), np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CovariateEncoding:
        # an encoding stored before count steps existed has none
        return cls(list(data["columns"]), dict(data.get("numeric", {})), dict(data.get("categories", {})),
                   dict(data.get("steps", {})))


class CovariateDropout:
    """Training augmentation of encoded covariates: each subject's column read as missing with ``probability``.

    Drawn independently per subject and column on the batch (torch's random stream, as the scanner
    augmentation); a dropped column gets its missing code (see the module's documentation), so the network
    learns what an absent value leaves to infer. ``probability`` 0 draws nothing (runs without it are
    reproduced exactly).

    Args:
        encoding: the run's :class:`CovariateEncoding` (the feature layout).
        probability: chance that a column of a subject is dropped, in [0, 1).
    """

    def __init__(self, encoding: CovariateEncoding, probability: float) -> None:
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability < 1:
            raise ConfigError(f"covariate_dropout must be a probability in [0, 1), got {probability!r}")
        self.probability = float(probability)
        self.num_columns = len(encoding.columns)
        self.column_of_feature = torch.as_tensor(encoding.column_of_feature, dtype=torch.long)
        self.missing_code = torch.as_tensor(encoding.missing_code)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.probability == 0 or self.num_columns == 0:
            return features
        dropped = torch.rand(features.shape[0], self.num_columns) < self.probability
        dropped = dropped[:, self.column_of_feature].to(features.device)
        return torch.where(dropped, self.missing_code.to(features), features)


def covariate_dropout(encoding: CovariateEncoding | None, probability: float) -> CovariateDropout | None:
    """The bundle's ``covariate_dropout`` key: a :class:`CovariateDropout`, or ``None`` for an imaging-only run or 0."""
    if encoding is None:
        if probability:
            logger.warning("covariate_dropout %s ignored: the run has no covariates", probability)
        return None
    dropout = CovariateDropout(encoding, probability)
    return dropout if dropout.probability > 0 else None


def check_columns(table: pd.DataFrame, columns: Sequence[str], source: str = "labels.csv") -> None:
    """Refuse covariate columns that ``table`` lacks, naming them and the columns it has."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CohortError(f"{source}: covariate column(s) {missing} (the covariates key) not found; "
                          f"its columns are {list(table.columns)}")


def _who(table: pd.DataFrame, i: int) -> str:
    return f"subject {table['subject_id'].iloc[i]}" if "subject_id" in table.columns else f"row {i + 1}"


def stored_covariates(checkpoint: str | os.PathLike) -> CovariateEncoding | None:
    """The covariate encoding a checkpoint was trained with, or ``None`` (imaging only, or no such file)."""
    from monai_mtl.checkpoints import read_run_metadata

    stored = read_run_metadata(checkpoint).get("covariates") if Path(checkpoint).is_file() else None
    return CovariateEncoding.from_dict(stored) if stored else None


__all__ = ["CovariateDropout", "CovariateEncoding", "check_columns", "covariate_dropout", "stored_covariates"]

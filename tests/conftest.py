"""Shared fixtures: tiny synthetic cohorts generated once per session."""

from __future__ import annotations

import pytest

from monai_mtl.synthetic import CohortConfig, generate_cohort

TINY = CohortConfig(num_samples=24, seed=7)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """24 subjects at the paper's grid, generated with two workers."""
    root = tmp_path_factory.mktemp("cohort") / "tiny"
    generate_cohort(root, TINY, workers=2, progress=False)
    return root

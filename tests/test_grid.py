"""The hyper-parameter grid: fixed trial order, one trial as its own run, ranking by validation loss."""

from __future__ import annotations

import pandas as pd
import pytest

from monai_mtl.__main__ import main
from monai_mtl.grid import PAPER_GRID, collect, grid_points, trial_dir


def test_paper_grid_has_36_points_in_a_fixed_order():
    points = grid_points()
    assert len(points) == 36 and len({tuple(p.values()) for p in points}) == 36
    assert points[0] == {"learning_rate": 1e-3, "focal_alpha": 0.25, "focal_gamma": 1.5, "grad_clip_norm": 0.5}
    assert points[1]["grad_clip_norm"] == 1.0  # the last key varies fastest
    assert set(points[-1].values()) == {1e-4, 0.5, 2.0}
    assert {k: sorted({p[k] for p in points}) for k in PAPER_GRID} == {k: sorted(v) for k, v in PAPER_GRID.items()}


@pytest.mark.slow
def test_one_trial_runs_and_is_ranked_by_validation_loss(train_cohort, tmp_path):
    out = tmp_path / "grid"
    args = ["grid", "--dataset-dir", str(train_cohort), "--output-dir", str(out), "--max-epochs", "2",
            "--lr", "1e-3", "--alpha", "0.25", "--gamma", "2", "--clipnorm", "0.5", "1",
            "--override", "batch_size=8", "cache_workers=1"]
    assert main([*args, "--trial", "1"]) == 0
    points = grid_points({"learning_rate": [1e-3], "focal_alpha": [0.25], "focal_gamma": [2.0], "grad_clip_norm": [0.5, 1.0]})
    finished = trial_dir(out, 1, points[1])
    assert finished.name == "trial_01_lr0.001_a0.25_g2_clip1"
    assert (finished / "model.pt").is_file() and not trial_dir(out, 0, points[0]).exists()
    ranking = pd.read_csv(out / "grid_results.csv")
    assert ranking[["rank", "trial", "grad_clip_norm", "epochs_run"]].values.tolist() == [[1, 1, 1.0, 2]]
    assert ranking["best_epoch"].iloc[0] in (1, 2) and ranking["best_val_loss"].iloc[0] > 0
    assert "1 of 2 trials finished" in (out / "grid_results.md").read_text()
    # collecting again ranks the same finished trial without rerunning it
    stamp = (finished / "test_metrics.json").stat().st_mtime_ns
    assert collect(out, points)["trial"].tolist() == [1]
    assert (finished / "test_metrics.json").stat().st_mtime_ns == stamp


def test_trial_out_of_range_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--trial", "36", "--output-dir", str(tmp_path / "g")])
    assert exit_info.value.code == 2 and "the grid has 36 trials" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()

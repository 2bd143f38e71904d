"""The results table is generated from the runs' JSON outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from monai_mtl.__main__ import main
from monai_mtl.report import END, START

REPO = Path(__file__).resolve().parents[1]


def _metrics(path, accuracy, mae):
    path.mkdir(parents=True, exist_ok=True)
    (path / "test_metrics.json").write_text(json.dumps({"n": 9, "accuracy": accuracy, "severity_mae": mae}))


def _readme_and_bundle(tmp_path, readme_block: str, bundle_block: str, after: str = ""):
    """A README (then ``after``) and a bundle (this repository's configs) whose results blocks hold the given text."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\n{readme_block}\n{END}\n{after}")
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "docs").mkdir()
    (bundle / "docs" / "README.md").write_text(f"# bundle\n{START}\n{bundle_block}\n{END}\n")
    return readme, bundle


def test_results_table_from_run_outputs_and_readme_block(trained_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "train")
    (runs / "train" / "training_curves.png").write_bytes(b"\x89PNG a figure of the run")
    ours = json.loads((runs / "train" / "test_metrics.json").read_text())
    _metrics(runs / "baselines" / "single-task-response", 0.875, 12.0)
    (runs / "train" / "floor.json").write_text(json.dumps({"severity_mae": 0.123, "bootstrap_95": [0.1, 0.15],
                                                           "severity_mae_anatomy_unknown": 0.271,
                                                           "anatomy_unknown_bootstrap_95": [0.26, 0.28]}))
    _metrics(runs / "baselines" / "class-median", 1.0, 8.51)
    (runs / "cv" / "fold_0").mkdir(parents=True)
    (runs / "cv" / "cv_summary.json").write_text(json.dumps({
        "num_folds": 2, "accuracy": {"mean": 0.995, "std": 0.005}, "severity_mae": {"mean": 3.5, "std": 0.25}}))
    settings = json.loads((runs / "train" / "run_settings.json").read_text())
    settings["config"].update(num_folds=2, fold=0)  # a fold differs from the reference run in its split only
    (runs / "cv" / "fold_0" / "run_settings.json").write_text(json.dumps(settings))
    readme, bundle = _readme_and_bundle(tmp_path, "old table", "typed by hand", after="\nafter\n")

    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "table.md"), "--readme", str(readme),
                 "--bundle", str(bundle)]) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| paper") and "8.03" in rows[1]
    assert rows[2].startswith("| information limit:") and "0.12 (0.10–0.15)" in rows[2]
    assert rows[3].startswith("| information limit of a model") and "| 0.27 (0.26–0.28) |" in rows[3]
    rows.pop(3)  # the anatomy-unknown bound, below the first limit; the rest as before
    assert f"{100 * ours['accuracy']:.1f}%" in rows[3] and f"{ours['severity_mae']:.2f}" in rows[3]
    assert "99.5% ± 0.5" in rows[3] and "3.50 ± 0.25" in rows[3] and "2 (model 2)" in rows[3]  # the epoch model.pt holds: the last
    assert "87.5%" in rows[4] and "— (not trained)" in rows[4]
    # the header names the machine each trained run was made on (a CV: its folds'; this one's fold stored none)
    from monai_mtl.run_folder import run_machines

    assert f"`runs/train`: {run_machines(runs / 'train')[0]}" in table
    assert "`runs/cv`: not recorded (trained before bundle 0.10.1)" in table  # a CV: its folds' machines
    assert "runs/baselines" not in table.split("\n\n")[0]  # no network trained there: no machine to name
    assert "— (true class given)" in rows[5] and "8.51" in rows[5]
    assert len(rows) == 6  # rows without outputs (ResNet-18, ...) are left out, not invented
    text = readme.read_text()
    assert "old table" not in text and table in text and text.startswith("# title") and text.endswith("after\n")
    assert table in (bundle / "docs" / "README.md").read_text()
    assert (tmp_path / "docs" / "results" / "training_curves.png").read_bytes() == (runs / "train" / "training_curves.png").read_bytes()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["eval_metrics"] == {
        "test_accuracy": round(ours["accuracy"], 4), "test_severity_mae": round(ours["severity_mae"], 2),
        "cv_accuracy_mean": 0.995, "cv_severity_mae_mean": 3.5,
    }

    # a CV made with other hyper-parameters is not shown as the reference model's
    settings["config"]["learning_rate"] = 0.1
    (runs / "cv" / "fold_0" / "run_settings.json").write_text(json.dumps(settings))
    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "table.md")]) == 0
    assert "99.5% ± 0.5" not in (tmp_path / "table.md").read_text()


def test_results_table_keeps_the_rows_of_runs_made_elsewhere(trained_run, tmp_path):
    """Only the reference run here: the rows of runs absent here (the ResNet-18, the information limit) are kept from
    the block as it stood, verbatim, and the header says so; a row no longer in the table's models is not."""
    from monai_mtl.report import results_table

    shutil.copytree(trained_run, tmp_path / "runs" / "train")
    resnet = "| MONAI 3D ResNet-18, two heads | `python -m monai_mtl baseline --kind resnet18` | 100.0% | 5.84 (5.30–6.38) | — | — | 30 (model 28) | 77.5 min |"
    floor = ("| information limit: an observer who knows everything but the noise | `python -m monai_mtl floor --split "
             "runs/train/split.json` | — | 0.10 (0.09–0.12) | — | — | — | — |")
    anatomy = ("| information limit of a model: an observer who must also read the anatomy (pose, size, deformation) from "
               "the scan (Cramér–Rao) | `python -m monai_mtl floor --split runs/train/split.json` | — | 0.27 (0.26–0.28) "
               "| — | — | — | — |")
    previous = ("Generated by ...\n\n| model | command | test accuracy | test severity MAE (95% CI) | 5-fold CV accuracy "
                "| 5-fold CV MAE | epochs (the model's) | training wall time |\n|---|---|---|---|---|---|---|---|\n"
                f"| paper | — | 100% | 8.03 | > 99% | 7.9–8.4 | — | — |\n{floor}\n{anatomy}\n"
                "| **ours**: `DualPathNet` multi-task | old | 1.0% | 9.99 | — | — | — | — |\n"
                f"{resnet}\n| a model no longer shown | x | 1% | 1 | — | — | — | — |\n")
    table = results_table(tmp_path, previous=previous)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[2] == floor and rows[3] == anatomy and resnet in rows and "9.99" not in table and "no longer shown" not in table
    assert rows[4].startswith("| **ours**") and len(rows) == 6
    assert "The rows of `runs/baselines/resnet18`, `runs/train/floor.json` (absent where this was made) are kept" in table
    assert results_table(tmp_path, previous=table) == table  # made again from its own block: nothing changes


def test_robustness_and_leave_site_out_blocks(tmp_path):
    runs = tmp_path / "runs"
    for run, accuracy in (("train", 0.99), ("paper_preset", 0.5)):
        (runs / run / "robustness").mkdir(parents=True)
        pd.DataFrame({"kind": ["clean", "grid"], "strength": ["", "80x72x24"], "n": [9, 9], "accuracy": [1.0, accuracy],
                      "severity_mae": [3.0, 4.25]}).to_csv(runs / run / "robustness" / "robustness.csv", index=False)
    (runs / "loso_robust").mkdir()
    pd.DataFrame({"site": [0, 1], "n": [5, 4], "held_out_accuracy": [0.8, 0.75], "held_out_severity_mae": [6.0, 8.0],
                  "within_site_cv_accuracy": [1.0, 1.0], "within_site_cv_severity_mae": [3.0, 4.0], "mae_ratio": [2.0, 2.0]}
                 ).to_csv(runs / "loso_robust" / "leave_site_out.csv", index=False)
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- {n}:start -->\nold\n<!-- {n}:end -->\n" for n in ("results", "robustness", "leave-site-out"))
    readme.write_text(blocks)
    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "t.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| grid | 80x72x24 | 50.0% / 4.25 | 99.0% / 4.25 |" in text and "| clean | — | 100.0% / 3.00 | 100.0% / 3.00 |" in text
    assert "| 0 | 5 | 80.0% / 6.00 | 100.0% / 3.00 | 2.00 |" in text
    assert text.count("\nold\n") == 1 and text.startswith("<!-- results:start -->\nold\n")  # no runs/train: kept
    # the default model swept again with --adapt-batchnorm: its adapted figures get a column of their own
    pd.DataFrame({"kind": ["clean", "grid"], "strength": ["", "80x72x24"], "n": [9, 9], "accuracy": [1.0, 0.99],
                  "severity_mae": [3.0, 4.25], "adapted_accuracy": [1.0, 1.0], "adapted_severity_mae": [3.5, 3.25]}
                 ).to_csv(runs / "train" / "robustness" / "robustness.csv", index=False)
    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "t.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| artifact | strength | `paper` preset: accuracy / MAE | default (`robust`): accuracy / MAE | " \
           "default (`robust`), adapted: accuracy / MAE |" in text
    assert "| grid | 80x72x24 | 50.0% / 4.25 | 99.0% / 4.25 | 100.0% / 3.25 |" in text
    # the paper preset's sweep made on another machine: its column is kept from the block, the default's made again
    shutil.rmtree(runs / "paper_preset")
    (runs / "train" / "robustness" / "robustness.csv").write_text(
        "kind,strength,n,accuracy,severity_mae\nclean,,9,1.0,2.5\ngrid,80x72x24,9,0.875,3.5\n")
    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "t.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| grid | 80x72x24 | 50.0% / 4.25 | 87.5% / 3.50 |" in text and "| clean | — | 100.0% / 3.00 | 100.0% / 2.50 |" in text
    assert "the columns of `runs/paper_preset` (absent where this was made) kept as the table had them" in text
    assert "adapted" not in text  # the new sweep has no adapted figures: the old column is not the new model's


def test_leave_site_out_block_adds_the_adapted_column_and_keeps_the_columns_of_runs_made_elsewhere(tmp_path):
    """Only ``runs/loso_multisite`` here (with the batch-norm adaptation's figures): its columns made again, the
    ``robust`` and ``paper`` ones kept from the block as it stood, cell by cell, and the sources line says so."""
    from monai_mtl.report import leave_site_out_table

    (tmp_path / "runs" / "loso_multisite").mkdir(parents=True)
    pd.DataFrame({"site": [0, 1], "n": [5, 4], "held_out_accuracy": [0.8, 0.75], "held_out_severity_mae": [6.0, 8.0],
                  "held_out_mean_severity_error": [1.0, -1.0], "held_out_adapted_accuracy": [1.0, 0.5],
                  "held_out_adapted_severity_mae": [5.0, 7.5], "held_out_adapted_mean_severity_error": [0.5, 0.0],
                  "within_site_cv_accuracy": [1.0, 1.0], "within_site_cv_severity_mae": [3.0, 4.0], "mae_ratio": [2.0, 2.0]}
                 ).to_csv(tmp_path / "runs" / "loso_multisite" / "leave_site_out.csv", index=False)
    previous = """Generated by ... .

| held-out site | n | `multisite.json`: held out | `multisite.json`: within-site CV | MAE ratio | `robust`: held out | `robust`: within-site CV | MAE ratio | `paper`: held out | `paper`: within-site CV | MAE ratio |
|---|---|---|---|---|---|---|---|---|---|---|
| 0 | 5 | 1.0% / 9.00 | 2.0% / 9.00 | 1.00 | 88.5% / 13.55 | 98.6% / 4.83 | 2.81 | 38.5% / 30.83 | 98.9% / 4.20 | 7.34 |
| 1 | 4 | 1.0% / 9.00 | 2.0% / 9.00 | 1.00 | 98.8% / 5.55 | 97.7% / 4.93 | 1.12 | 99.4% / 6.38 | 98.5% / 4.41 | 1.45 |
"""
    block = leave_site_out_table(tmp_path, previous=previous)
    lines = block.splitlines()
    assert "`runs/loso_multisite/leave_site_out.csv`" in lines[0]
    assert "the columns of `runs/loso_robust`, `runs/loso_paper` (absent where this was made) kept" in lines[0]
    assert lines[2] == ("| held-out site | n | `multisite.json`: held out | `multisite.json`: held out, adapted | "
                        "`multisite.json`: within-site CV | `multisite.json`: MAE ratio | `robust`: held out | "
                        "`robust`: within-site CV | `robust`: MAE ratio | `paper`: held out | `paper`: within-site CV | "
                        "`paper`: MAE ratio |")
    assert lines[4] == ("| 0 | 5 | 80.0% / 6.00 | 100.0% / 5.00 | 100.0% / 3.00 | 2.00 | 88.5% / 13.55 | 98.6% / 4.83 | 2.81 | "
                        "38.5% / 30.83 | 98.9% / 4.20 | 7.34 |")
    assert lines[5].startswith("| 1 | 4 | 75.0% / 8.00 | 50.0% / 7.50 |") and lines[5].endswith("| 1.45 |")
    # the block it wrote is read back the same way: made again from it, nothing changes
    assert leave_site_out_table(tmp_path, previous=block) == block


def test_readme_without_markers_is_an_error(tmp_path, capsys):
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "t.md"), "--readme", str(tmp_path / "README.md")])
    assert exit_info.value.code == 2 and "results:start" in capsys.readouterr().err


def _fake_cv(folder, accuracy, mae, tests):
    for i, test in enumerate(tests):
        (folder / f"fold_{i}").mkdir(parents=True)
        (folder / f"fold_{i}" / "split.json").write_text(json.dumps({"train": [], "validation": [], "test": test}))
    pd.DataFrame({"fold": range(len(tests)), "n": [len(t) for t in tests], "accuracy": accuracy,
                  "severity_mae": mae}).to_csv(folder / "cv_folds.csv", index=False)


def test_cv_comparison_pairs_the_folds_and_counts_the_folds_ours_wins(tmp_path):
    from monai_mtl.report import cv_comparison_table

    runs, tests = tmp_path / "runs", [["a", "b"], ["c", "d"], ["e", "f"]]
    assert cv_comparison_table(tmp_path) is None  # no CV yet
    _fake_cv(runs / "cv", [1.0, 0.99, 0.98], [2.0, 3.0, 4.0], tests)
    assert cv_comparison_table(tmp_path) is None  # nothing to compare with
    _fake_cv(runs / "cv_single_task_severity", [0.3, 0.3, 0.3], [2.5, 2.5, 5.0], tests)
    _fake_cv(runs / "cv_paper", [0.98, 0.99, 0.99], [3.0, 3.0, 3.0], tests)
    _fake_cv(runs / "cv_resnet18", [0.9, 0.9, 0.9], [9.0, 9.0, 9.0], [["a", "b"], ["c", "e"], ["d", "f"]])  # other folds
    table = cv_comparison_table(tmp_path)
    # severity-only: ours - it = -0.5, +0.5, -1.0 -> mean -0.33, sd 0.76; ours at least as good on 2 of 3 folds
    assert "| single-task CNN, severity only |" in table and "— (not trained)" in table
    assert "-0.33 ± 0.76 (2/3)" in table
    # the paper's recipe: accuracy +2, 0, -1 points -> 0.3% ± 1.5, 2/3 folds; MAE -1, 0, +1 -> 0.00 ± 1.00, 2/3
    assert "0.3% ± 1.5 (2/3)" in table and "0.00 ± 1.00 (2/3)" in table
    assert "ResNet-18" not in table  # not the same folds: left out


def test_the_multimodal_comparison_names_the_fused_model_and_its_commands(tmp_path):
    from monai_mtl.report import MULTIMODAL_COMPARISONS, MULTIMODAL_REFERENCE, cv_comparison_table

    runs, tests = tmp_path / "runs", [["a", "b"], ["c", "d"]]
    _fake_cv(runs / "cv_multimodal", [1.0, 0.99], [3.0, 3.2], tests)
    _fake_cv(runs / "cv_multimodal_covariates_only", [0.6, 0.62], [15.0, 14.0], tests)
    table = cv_comparison_table(tmp_path, MULTIMODAL_REFERENCE, MULTIMODAL_COMPARISONS, cohort=" on data/multimodal")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| **fused**") and "multimodal.json --dataset-dir data/multimodal" in rows[1]
    assert rows[2].startswith("| covariates only") and "baseline --kind covariates-only" in rows[2]
    assert "-11.40 ± 0.85 (2/2)" in rows[2] and "38.5% ± 2.1 (2/2)" in rows[2] and "imaging only" not in table  # a CV not made yet is left out
    # a scikit-learn baseline's folds have no split.json: its predictions say which subjects each fold tested
    classical = runs / "cv_multimodal_classical"
    for i, test in enumerate(reversed([["d", "c"], ["b", "a"]])):
        (classical / f"fold_{i}").mkdir(parents=True)
        pd.DataFrame({"subject_id": test}).to_csv(classical / f"fold_{i}" / "test_predictions.csv", index=False)
    pd.DataFrame({"fold": [0, 1], "n": [2, 2], "accuracy": [0.7, 0.8], "severity_mae": [3.0, 3.0]}).to_csv(
        classical / "cv_folds.csv", index=False)
    assert "| imaging only, scikit-learn on atlas regions |" in cv_comparison_table(tmp_path, MULTIMODAL_REFERENCE, MULTIMODAL_COMPARISONS)
    assert "information limit" not in table  # floor not run on the folds

    # `floor --split runs/cv_multimodal --response-only` writes each fold's limit: a row, the fused model's gap to it
    for i, limit in enumerate((1.0, 0.99)):
        (runs / "cv_multimodal" / f"fold_{i}" / "floor.json").write_text(json.dumps({"response_accuracy_limit": limit}))
    limit_row = cv_comparison_table(tmp_path, MULTIMODAL_REFERENCE, MULTIMODAL_COMPARISONS).splitlines()[-1]
    assert limit_row.startswith("| information limit") and "--split runs/cv_multimodal --response-only" in limit_row
    assert "--dataset-dir data/multimodal" in limit_row and "| 99.5% ± 0.7 | — | 0.0% ± 0.0 |" in limit_row


def test_results_without_the_reference_run_leaves_the_results_block_its_file_and_the_bundle_as_they_are(tmp_path):
    _metrics(tmp_path / "runs" / "baselines" / "class-median", 1.0, 8.51)  # a baseline, but no runs/train (a fresh clone)
    figure = tmp_path / "runs" / "cv_multimodal" / "fold_0" / "covariate_importance.png"  # the fused model's, made again
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"the fused model's figure")
    readme, bundle = _readme_and_bundle(tmp_path, "the table of the runs made before", "the same table")
    metadata = (bundle / "configs" / "metadata.json").read_text()
    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "table.md"), "--readme", str(readme),
                 "--bundle", str(bundle)]) == 0
    assert "the table of the runs made before" in readme.read_text() and not (tmp_path / "table.md").exists()
    assert "the same table" in (bundle / "docs" / "README.md").read_text()
    assert (bundle / "configs" / "metadata.json").read_text() == metadata
    figures = readme.parent / "docs" / "results"  # the figure whose run is here is copied, no other is touched
    assert (figures / "covariate_importance.png").read_bytes() == b"the fused model's figure"
    assert sorted(p.name for p in figures.iterdir()) == ["covariate_importance.png"]


def test_robustness_block_shows_the_ood_flags_and_keeps_them_for_a_run_made_elsewhere(tmp_path):
    """A calibrated sweep's ``ood_flagged`` columns become a column of their own (the share flagged, then the rest's
    accuracy / MAE; "—" when every scan is flagged); when that run is absent, the column is kept from the block."""
    from monai_mtl.report import robustness_table

    (tmp_path / "runs" / "train" / "robustness").mkdir(parents=True)
    (tmp_path / "runs" / "paper_preset" / "robustness").mkdir(parents=True)
    pd.DataFrame({"kind": ["clean", "motion"], "strength": ["", "0.2"], "n": [8, 8], "accuracy": [1.0, 0.25],
                  "severity_mae": [2.5, 30.0], "ood_flagged": [0.0, 1.0], "unflagged_accuracy": [1.0, float("nan")],
                  "unflagged_severity_mae": [2.5, float("nan")]}
                 ).to_csv(tmp_path / "runs" / "paper_preset" / "robustness" / "robustness.csv", index=False)
    pd.DataFrame({"kind": ["clean", "motion"], "strength": ["", "0.2"], "n": [8, 8], "accuracy": [1.0, 0.5],
                  "severity_mae": [2.0, 20.0], "ood_flagged": [0.125, 0.5], "unflagged_accuracy": [1.0, 0.75],
                  "unflagged_severity_mae": [2.25, 6.5]}
                 ).to_csv(tmp_path / "runs" / "train" / "robustness" / "robustness.csv", index=False)
    block = robustness_table(tmp_path)
    lines = block.splitlines()
    assert lines[2] == ("| artifact | strength | `paper` preset: accuracy / MAE | `paper` preset: flagged OOD (the rest: "
                        "accuracy / MAE) | default (`robust`): accuracy / MAE | default (`robust`): flagged OOD (the rest: "
                        "accuracy / MAE) |")
    assert lines[4] == "| clean | — | 100.0% / 2.50 | 0.0% (100.0% / 2.50) | 100.0% / 2.00 | 12.5% (100.0% / 2.25) |"
    assert lines[5] == "| motion | 0.2 | 25.0% / 30.00 | 100.0% (—) | 50.0% / 20.00 | 50.0% (75.0% / 6.50) |"
    shutil.rmtree(tmp_path / "runs" / "paper_preset")
    again = robustness_table(tmp_path, previous=block)
    assert again.splitlines()[2:] == lines[2:]  # both of the absent run's columns kept, cell by cell
    assert "the columns of `runs/paper_preset` (absent where this was made) kept" in again.splitlines()[0]


def test_a_cvs_training_time_counts_folds_trained_side_by_side_once(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from monai_mtl.report import _cv_cells

    def fold(cv, index, start, end):
        with SummaryWriter(str(cv / f"fold_{index}" / "tensorboard")) as writer:
            for step, wall in enumerate((start, end), 1):
                writer.add_scalar("val_score", 0.5, step, walltime=1e9 + wall)

    for name, second_fold in (("side_by_side", (300, 900)), ("one_after_another", (1000, 1600))):
        cv = tmp_path / name
        fold(cv, 0, 0, 600)
        fold(cv, 1, *second_fold)
        (cv / "cv_summary.json").write_text(json.dumps({
            "num_folds": 2, "accuracy": {"mean": 1.0, "std": 0.0}, "severity_mae": {"mean": 2.0, "std": 0.1}}))
        # cv --jobs 2: 15 min of wall time, not the folds' 20 summed; one after another: the two spans, not the gap
        assert _cv_cells(cv)[2] == ("15.0 min" if name == "side_by_side" else "20.0 min")

"""The results table is generated from the runs' JSON outputs."""

from __future__ import annotations

import json
import shutil

import pytest

from monai_mtl.__main__ import main
from monai_mtl.report import END, START


def _metrics(path, accuracy, mae):
    path.mkdir(parents=True, exist_ok=True)
    (path / "test_metrics.json").write_text(json.dumps({"n": 9, "accuracy": accuracy, "severity_mae": mae}))


def test_results_table_from_run_outputs_and_readme_block(trained_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "train")
    ours = json.loads((runs / "train" / "test_metrics.json").read_text())
    _metrics(runs / "baselines" / "single-task-response", 0.875, 12.0)
    _metrics(runs / "baselines" / "class-median", 1.0, 8.51)
    (runs / "cv").mkdir()
    (runs / "cv" / "cv_summary.json").write_text(json.dumps({
        "num_folds": 2, "accuracy": {"mean": 0.995, "std": 0.005}, "severity_mae": {"mean": 3.5, "std": 0.25}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")

    assert main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "table.md"), "--readme", str(readme)]) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| paper") and "8.03" in rows[1]
    assert f"{100 * ours['accuracy']:.1f}%" in rows[2] and f"{ours['severity_mae']:.2f}" in rows[2]
    assert "99.5% ± 0.5" in rows[2] and "3.50 ± 0.25" in rows[2] and "2 (best " in rows[2]
    assert "87.5%" in rows[3] and "— (not trained)" in rows[3]
    assert "— (true class given)" in rows[4] and "8.51" in rows[4]
    assert len(rows) == 5  # rows without outputs (ResNet-18, ...) are left out, not invented
    text = readme.read_text()
    assert "old table" not in text and table in text and text.startswith("# title") and text.endswith("after\n")


def test_readme_without_markers_is_an_error(tmp_path, capsys):
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--root", str(tmp_path), "--output", str(tmp_path / "t.md"), "--readme", str(tmp_path / "README.md")])
    assert exit_info.value.code == 2 and "results:start" in capsys.readouterr().err

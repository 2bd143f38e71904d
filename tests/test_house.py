"""The house rules: one definition per concept, rank-aware handlers, no list positions in configs, a shippable package."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine

from conftest import BUNDLE_CONFIGS, TINY, run_bundle

REPO = Path(__file__).resolve().parents[1]


def test_inference_reproduces_the_runs_test_predictions(trained_run, train_cohort, tmp_path):
    """Training's test evaluation and inference feed the network the same tensors: same classes, same severities."""
    expected = pd.read_csv(trained_run / "test_predictions.csv")
    labels = pd.read_csv(train_cohort / "labels.csv").set_index("subject_id")
    inputs = tmp_path / "inputs.csv"
    pd.DataFrame({"image": [str(train_cohort / labels.loc[s, "image"]) for s in expected["subject_id"]]}).to_csv(inputs, index=False)
    run_bundle(
        "run", str(BUNDLE_CONFIGS / "inference.json"), dataset_dir=str(inputs), output_dir=str(tmp_path / "pred"),
        ckpt_path=str(trained_run / "model.pt"),
    )
    predicted = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(predicted) == len(expected) and (predicted["error"].fillna("") == "").all()
    assert predicted["pred_response"].tolist() == expected["pred_response"].tolist()
    np.testing.assert_allclose(predicted["pred_severity"], expected["pred_severity"], rtol=0, atol=1e-4)
    probabilities = [c for c in expected.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predicted[probabilities], expected[probabilities], rtol=0, atol=1e-5)
    # the trust columns too: the same calibration, intervals, sets and OOD score from the checkpoint
    np.testing.assert_allclose(predicted[["severity_low", "severity_high"]], expected[["severity_low", "severity_high"]], atol=1e-4)
    np.testing.assert_allclose(predicted["ood_score"], expected["ood_score"], rtol=1e-4)
    assert predicted["response_set"].astype(str).tolist() == expected["response_set"].astype(str).tolist()


def test_one_prediction_table_layout_for_evaluation_baselines_and_inference():
    from monai_mtl.inference import PREDICTION_COLUMNS
    from monai_mtl.outputs import PROBABILITY_COLUMNS, decode_output, prediction_table

    probabilities, severity = decode_output(torch.tensor([[2.0, 0.0, 0.0, 0.25], [0.0, 0.0, 3.0, 0.5]]))
    assert severity.tolist() == [25.0, 50.0]
    evaluated = prediction_table(probabilities, severity, {"subject_id": ["a", "b"]}, true_response=[0, 1], true_severity=[20, 60])
    assert list(evaluated.columns) == [
        "subject_id", "true_response", "true_response_name", "pred_response", "pred_response_name", *PROBABILITY_COLUMNS,
        "true_severity", "pred_severity",
    ]
    assert evaluated["pred_response"].tolist() == [0, 2] and evaluated["pred_response_name"].tolist() == ["non_responder", "responder"]
    from monai_mtl.trust import TRUST_COLUMNS, annotate

    inferred = annotate(prediction_table(probabilities, severity, {"image": ["a.nii.gz", "b.nii.gz"]}), None, None)
    assert list(inferred.columns) == list(PREDICTION_COLUMNS[:-1])  # inference adds the error column
    assert list(inferred.columns[-len(TRUST_COLUMNS):]) == list(TRUST_COLUMNS)


def test_no_list_positions_in_bundle_configs():
    """Configs name what they change (``train#named_handlers#validation``); a position would silently move."""
    positional = re.compile(r"#\d+(#|\b)|\[\s*-?\d*\s*:\s*|\[\s*\d+\s*\]")
    found = []
    for path in sorted(BUNDLE_CONFIGS.rglob("*.json")):
        def walk(node, where):
            if isinstance(node, dict):
                for key, value in node.items():
                    if positional.search(key):
                        found.append(f"{path.name}: key {key}")
                    walk(value, f"{where}#{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{where}[{i}]")
            elif isinstance(node, str) and "@" in node and positional.search(node.split("@", 1)[1]):
                found.append(f"{path.name} {where}: {node}")
        walk(json.loads(path.read_text()), "")
    assert not found, found
    train = json.loads((BUNDLE_CONFIGS / "train.json").read_text())
    assert isinstance(train["train"]["named_handlers"], dict) and isinstance(train["validate"]["named_handlers"], dict)


def test_handlers_for_rank_keep_the_computing_handlers_on_other_ranks(monkeypatch, tmp_path):
    from ignite.handlers import ProgressBar
    from monai.handlers import EarlyStopHandler, LrScheduleHandler, StatsHandler

    from monai_mtl import handlers
    from monai_mtl.checkpoints import BestModelSaver, TrainingStateCheckpoint
    from monai_mtl.handlers import GradientClipHandler, TensorBoardSliceHandler, handlers_for_rank

    network = torch.nn.Linear(2, 4)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    group = {
        "clip": GradientClipHandler(),
        "lr": LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 1)),
        "early_stop": EarlyStopHandler(patience=2, score_function=lambda e: 0.0),
        "state": TrainingStateCheckpoint(tmp_path / "state.pt", network, optimizer),
        "best": BestModelSaver(tmp_path / "model.pt", network),
        "stats": StatsHandler(),
        "slices": TensorBoardSliceHandler(summary_writer=None),
        "progress": ProgressBar(),
        "off": None,
    }
    assert handlers_for_rank(group) == [h for k, h in group.items() if k != "off"]
    monkeypatch.setattr(handlers, "process_rank", lambda: 1)
    assert handlers_for_rank(group) == [group[k] for k in ("clip", "lr", "early_stop", "state")]


def test_a_handler_is_switched_off_by_its_name(train_cohort, tmp_path):
    from ignite.handlers import ProgressBar
    from monai.bundle import ConfigWorkflow

    from monai_mtl.checkpoints import TrainingStateCheckpoint

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"), workflow_type="train", logging_file=False,
        dataset_dir=str(train_cohort), output_dir=str(tmp_path), validate_images=False,
        **{"train#named_handlers#progress": None},
    )
    workflow.initialize()
    attached = workflow.parser.get_parsed_content("train#trainer#train_handlers")
    assert len(attached) == 8 and not any(isinstance(h, ProgressBar) for h in attached)
    assert any(isinstance(h, TrainingStateCheckpoint) for h in attached)


def test_checkpoint_handlers_write_only_on_rank_zero(monkeypatch, tmp_path):
    from monai_mtl import handlers
    from monai_mtl.checkpoints import BestModelSaver, TrainingStateCheckpoint

    network = torch.nn.Linear(2, 4)
    engine = Engine(lambda e, b: None)
    from monai.data import DataLoader, Dataset

    engine.data_loader = DataLoader(Dataset([]))
    engine.state.epoch, engine.state.best_metric_epoch, engine.state.best_metric = 1, 1, 0.5
    engine.state.key_metric_name = "val_score"
    saver = BestModelSaver(tmp_path / "model.pt", network)
    state = TrainingStateCheckpoint(tmp_path / "state.pt", network, torch.optim.SGD(network.parameters(), lr=0.1))
    monkeypatch.setattr(handlers, "process_rank", lambda: 1)
    saver(engine)
    state.store(engine)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(handlers, "process_rank", lambda: 0)
    saver(engine)
    state.store(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "state.pt"]


@pytest.mark.parametrize("selection, expected_epoch, expected_metric", [("best", 1, 0.5), ("last", 2, 0.4)])
def test_the_saved_model_is_the_best_or_the_last_validated_epoch(tmp_path, caplog, selection, expected_epoch, expected_metric):
    import logging

    from monai.data import DataLoader, Dataset

    from monai_mtl.checkpoints import BestModelSaver, read_run_metadata

    network = torch.nn.Linear(2, 4)
    engine = Engine(lambda e, b: None)
    engine.data_loader = DataLoader(Dataset([]))
    engine.state.key_metric_name = "val_score"
    saver = BestModelSaver(tmp_path / "model.pt", network, selection=selection)
    engine.state.epoch, engine.state.best_metric_epoch, engine.state.best_metric = 1, 1, 0.5
    engine.state.metrics = {"val_score": 0.5}
    saver(engine)
    with torch.no_grad():
        network.weight.add_(1.0)  # the second epoch's weights, and a worse score
    engine.state.epoch, engine.state.metrics = 2, {"val_score": 0.4}
    with caplog.at_level(logging.INFO, logger="monai_mtl.checkpoints"):
        saver(engine)
    # a model saved past the best epoch names the best in the log (early stopping ends past it)
    assert ("best 0.5000 at epoch 1" in caplog.text) == (selection == "last")
    facts = read_run_metadata(tmp_path / "model.pt")
    assert (facts["epoch"], facts["metric"], facts["selection"]) == (expected_epoch, expected_metric, selection)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["weight"]
    assert torch.equal(saved, network.weight.detach()) == (selection == "last")


def test_an_unknown_checkpoint_selection_is_refused(tmp_path):
    from monai_mtl.checkpoints import BestModelSaver
    from monai_mtl.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_selection must be one of .'best', 'last'.*'median'"):
        BestModelSaver(tmp_path / "model.pt", torch.nn.Linear(2, 4), selection="median")


def _package_imports(module: str) -> set[str]:
    """The package modules ``module`` imports when it is imported (top-level imports, transitively)."""
    import ast

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = REPO / name.replace(".", "/") / "__init__.py"
        for node in ast.parse(path.read_text()).body:  # imports inside functions run only when called
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("monai_mtl"):
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names if (REPO / node.module.replace(".", "/") / f"{a.name}.py").is_file()]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("monai_mtl")]
    return seen


def test_module_boundaries():
    """Inference does not need the generator; the output layout and image checks have their own modules."""
    for module in ("monai_mtl.inference", "monai_mtl.adaptation", "monai_mtl.evaluation", "monai_mtl.losses", "monai_mtl.metrics"):
        assert "monai_mtl.synthetic" not in _package_imports(module), module
    assert "monai_mtl.outputs" in _package_imports("monai_mtl.inference")
    from monai_mtl import RESPONSE_NAMES, cohort, images, networks, outputs
    from monai_mtl.errors import CohortError, LeakageError

    assert outputs.NUM_RESPONSE_CLASSES == len(RESPONSE_NAMES) and networks.split_output is outputs.split_output
    assert not hasattr(cohort, "check_image") and callable(images.check_image)
    assert not issubclass(LeakageError, CohortError)


def test_region_names_come_from_the_cohort_description(tiny_cohort, tmp_path):
    from monai_mtl.inference import atlas_region_names

    names = atlas_region_names(tiny_cohort / "atlas.nii.gz")
    assert names[6] == "left_hippocampus" and len(names) == 10
    shutil.copy(tiny_cohort / "atlas.nii.gz", tmp_path / "atlas.nii.gz")
    assert atlas_region_names(tmp_path / "atlas.nii.gz") == {}  # an atlas of one's own: region_<label>


@pytest.mark.slow
def test_non_editable_install_runs_a_fold_from_another_folder(tmp_path):
    """``pip install .`` (no editable link to the checkout) ships the bundle: ``cv --help`` and a 1-epoch fold work."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("monai_mtl", "bundle"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "models"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, cwd=tmp_path,
    )
    assert (target / "monai_mtl" / "bundle" / "configs" / "train.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import monai_mtl.runs as r; print(r.__file__); print(r.CONFIG_DIR)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    help_text = subprocess.run([sys.executable, "-m", "monai_mtl", "cv", "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "--folds" in help_text

    from monai_mtl.synthetic import CohortConfig, generate_cohort

    generate_cohort(elsewhere / "cohort", CohortConfig(num_samples=30, seed=TINY.seed), workers=2, progress=False)
    fold = subprocess.run(
        [sys.executable, "-m", "monai_mtl", "cv", "--dataset-dir", "cohort", "--output-dir", "cv", "--folds", "3",
         "--fold", "0", "--max-epochs", "1", "--override", "batch_size=8", "cache_workers=1"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert fold.returncode == 0, fold.stderr[-3000:]
    metrics = json.loads((elsewhere / "cv" / "fold_0" / "test_metrics.json").read_text())
    assert metrics["n"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0

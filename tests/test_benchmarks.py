"""The benchmarks' own logic (not their timings: speed is measured by ``benchmarks/run.py``, never by a test)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def benchmarks():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_convolution_is_named_by_oneDNNs_problem_descriptor(benchmarks):
    problem = "mb16_ic16oc32_id32od16kd3sd2dd0pd1_ih32oh16kh3sh2dh0ph1_iw8ow4kw3sw2dw0pw1"
    assert benchmarks._convolution_label(problem) == "conv 16->32, 3x3x3 stride 2x2x2, 32x32x8 -> 16x16x4"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_the_kernels_benchmark_names_each_convolution_pass_and_its_implementation(benchmarks, capfd):
    rows = benchmarks.bench_kernels(argparse.Namespace(train_steps=8))
    labels = [what for what, _, _ in rows]
    assert "isa:" in labels[0]  # the instruction set oneDNN's kernels use here
    passes = [label for label in labels if label.strip().startswith(("conv", "2 x conv"))]
    assert any("forward [" in label for label in passes) and any("weight gradient [" in label for label in passes)
    # the default network's path per task: its blocks after the stem run once for each task
    assert any(label.strip().startswith("2 x conv 16->32") for label in passes)
    shares = [float(rate.split("%")[0]) for _, _, rate in rows[1:] if rate]
    assert all(0 <= share <= 100 for share in shares)
    assert "onednn_verbose" not in capfd.readouterr().out  # oneDNN's log went to the benchmark, not to the terminal


def test_side_by_side_children_each_time_their_steps(benchmarks):
    seconds = benchmarks._side_by_side_steps(processes=2, threads=1, steps=1)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)

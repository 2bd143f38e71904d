"""Is a run's network mirror-invariant? Its validation scans as scanned, mirrored left-right, and the two readings averaged.

Usage: ``python docs/scripts/mirror_probe.py RUN [DATASET]`` (default dataset ``data/synthetic``). The checkpoint
predicts its validation part twice: as the preprocessing hands the scans over, and with each volume mirrored on the
network's grid (``BatchScannerAugmentation.mirror``, what ``scanner_augmentation#flip_prob`` draws in training); then
the average of the two (class probabilities and severities), test-time mirroring. docs/experiments.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from monai_mtl.cohort import read_cohort, to_datalist
from monai_mtl.evaluation import CheckpointPredictor
from monai_mtl.outputs import PROBABILITY_COLUMNS
from monai_mtl.transforms import BatchScannerAugmentation


class Mirrored(torch.nn.Module):
    """``network`` reading each input mirrored; ``encoder`` exposed for the trust columns' feature recorder."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.encoder = network, network.encoder

    def forward(self, images: torch.Tensor, *args) -> torch.Tensor:
        return self.network(BatchScannerAugmentation.mirror(images), *args)


def main() -> None:
    run = Path(sys.argv[1])
    table = read_cohort(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("data/synthetic"))
    datalist = to_datalist(table, json.loads((run / "split.json").read_text())["validation"])
    model = CheckpointPredictor(run / "model.pt")
    plain = model.predict(datalist)
    model.network = Mirrored(model.network)
    mirrored = model.predict(datalist)
    truth_class, truth_severity = plain["true_response"].to_numpy(), plain["true_severity"].to_numpy()
    probabilities = (plain[list(PROBABILITY_COLUMNS)].to_numpy() + mirrored[list(PROBABILITY_COLUMNS)].to_numpy()) / 2
    severity = (plain["pred_severity"].to_numpy() + mirrored["pred_severity"].to_numpy()) / 2
    for name, predicted_class, predicted_severity in (
        ("as scanned", plain["pred_response"].to_numpy(), plain["pred_severity"].to_numpy()),
        ("mirrored", mirrored["pred_response"].to_numpy(), mirrored["pred_severity"].to_numpy()),
        ("both averaged", probabilities.argmax(axis=1), severity),
    ):
        print(f"{name}: accuracy {np.mean(predicted_class == truth_class):.4f}, "
              f"severity MAE {np.mean(np.abs(predicted_severity - truth_severity)):.2f}")


if __name__ == "__main__":
    main()

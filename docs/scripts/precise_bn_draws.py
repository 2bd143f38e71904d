"""How much the batch-norm statistics of precise BN move a trained model's validation figures.

Re-estimates the statistics of a run's ``model.pt`` from other draws of augmented training batches (and from
un-augmented training scans) and evaluates the validation part after each; docs/experiments.md, "A moving
average of the weights", quotes its output for ``runs/train``. Nothing is written into the run folder.

    python docs/scripts/precise_bn_draws.py runs/train
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from monai.bundle import ConfigParser
from monai.utils import set_determinism

from monai_mtl.evaluation import load_weights, predict, report_from_predictions
from monai_mtl.handlers import PreciseBatchNormHandler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="training run folder (model.pt, split.json)")
    parser.add_argument("--dataset-dir", default="data/synthetic")
    parser.add_argument("--config-file", default="bundle/configs/train.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:  # the bundle's parts write into output_dir: not the run's
        shutil.copy(args.run / "split.json", scratch)
        config = ConfigParser()
        config.read_config(args.config_file)
        config.update({"output_dir": scratch, "dataset_dir": args.dataset_dir, "cache": "memory"})
        network = config.get_parsed_content("network")
        evaluator = config.get_parsed_content("calibrate#validation_evaluator")
        trainer = config.get_parsed_content("train#trainer")
        trainer.state.device = config.get_parsed_content("device")  # the handler reads the trainer's device

        def validate(label: str) -> None:
            report = report_from_predictions(predict(evaluator))
            print(f"{label:<48} accuracy {report['accuracy']:.4f}  severity MAE {report['severity_mae']:.3f}")

        load_weights(network, args.run / "model.pt")
        validate("as saved")
        for batches in (25, len(trainer.data_loader)):  # the default; a whole epoch
            for seed in range(3):
                set_determinism(seed)
                PreciseBatchNormHandler(batches, network=network)(trainer)
                validate(f"{batches} augmented batches, draw {seed}")
        trainer.prepare_batch = config.get_parsed_content("prepare_batch")  # normalises, does not augment
        loader = config.get_parsed_content("calibrate#train_dataloader")
        PreciseBatchNormHandler(len(loader), network=network, data_loader=loader)(trainer)
        validate("every training scan, un-augmented")


if __name__ == "__main__":
    main()

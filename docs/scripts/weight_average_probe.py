"""The weights of a CV's last epochs averaged into one network, measured on the validation parts (SWA-like).

``python docs/scripts/weight_average_probe.py CV [--test]`` on a CV made with every epoch saved (see
``checkpoint_selection_probe.py``): for the last 5 and the last 10 epochs, the weights and the batch-norm buffers are
averaged (Izmailov et al. 2018 recompute the buffers for the average; averaging them is a cheap stand-in), and the
validation part is predicted as the product predicts (shift-averaged). No selection is involved, so the whole validation
part measures it (docs/experiments.md, "Which epoch becomes the model").
"""
import sys
from pathlib import Path

import torch
from checkpoint_selection_probe import epoch_of, labelled_scans, passes, scores

from monai_mtl.checkpoints import load_state_dict_file
from monai_mtl.evaluation import CheckpointPredictor

WINDOWS = (5, 10)


def averaged_state(files: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_state_dict_file(f, map_location="cpu") for f in files]
    states = [s.get("model", s) for s in states]
    out = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).mean(0)
        else:  # num_batches_tracked
            out[key] = value
    return out


def main() -> None:
    cv = Path(sys.argv[1])
    parts = ("validation", "test") if "--test" in sys.argv else ("validation",)
    for run in sorted(p for p in cv.glob("fold_*") if p.is_dir()):
        predictor = CheckpointPredictor(run / "model.pt")
        files = sorted((run / "epochs").glob("*.pt"), key=epoch_of)
        network = predictor.network.eval()
        for part in parts:
            inputs, response, severity = labelled_scans(run, predictor, part)
            line = []
            for window in WINDOWS:
                network.load_state_dict(averaged_state(files[-window:]))
                acc, mae = scores(passes(network, inputs)[None], response, severity, True)
                line.append(f"last {window}: {100 * acc[0]:.2f}% / {mae[0]:.3f}")
            print(f"{run.name} {part}: " + "; ".join(line), flush=True)

if __name__ == "__main__":
    main()

"""Command line: ``python -m monai_mtl {generate,montage,cv,baseline,grid,robustness,trust,floor,results} ...`` (also installed as ``monai-mtl``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from collections.abc import Sequence

from monai_mtl import RESPONSE_NAMES
from monai_mtl.errors import DEBUG_VARIABLE, MonaiMtlError, project_error

logger = logging.getLogger("monai_mtl")


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    from monai_mtl.synthetic import CohortConfig

    defaults = CohortConfig()
    p = subparsers.add_parser(
        "generate",
        help="write a synthetic cohort (NIfTI volumes, labels.csv, atlas, cohort.json)",
        description="Write a synthetic cohort following the paper's protocol. "
        f"Class order everywhere: {', '.join(f'{i}={n}' for i, n in enumerate(RESPONSE_NAMES))}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default="data/synthetic", help="cohort folder to write")
    p.add_argument("--num-samples", type=int, default=defaults.num_samples, help="number of subjects")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cohort folder")
    p.add_argument(
        "--class-proportions", type=float, nargs=3, default=list(defaults.class_proportions),
        metavar=("NON", "PARTIAL", "RESPONDER"), help="class proportions, summing to 1",
    )
    p.add_argument(
        "--severity-ranges", type=float, nargs=6,
        default=[v for r in defaults.severity_ranges for v in r],
        metavar=("NON_LO", "NON_HI", "PART_LO", "PART_HI", "RESP_LO", "RESP_HI"),
        help="[low, high) severity range of each class on 0-100, non-overlapping",
    )
    p.add_argument("--shape", type=int, nargs=3, default=list(defaults.shape), metavar=("X", "Y", "Z"), help="voxels")
    p.add_argument(
        "--spacing", type=float, nargs=3, default=list(defaults.spacing_mm), metavar=("X", "Y", "Z"), help="voxel size in mm"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--sites", type=int, default=1,
        help="acquisition sites: each has its own voxel size, slice thickness, bias field, contrast, Rician noise and "
        "artifact (recorded in cohort.json); labels.csv gets a 'site' column. 1: the paper's cohort",
    )
    p.add_argument("--covariates", action="store_true",
                   help="add clinical covariates (age, sex, baseline_score, genotype, prior_treatments) that change the "
                   "observed response for some subjects: see monai_mtl/clinical.py")
    p.add_argument("--layout", choices=("csv", "bids"), default="csv",
                   help="csv: images/ + labels.csv; bids: a BIDS dataset (participants.tsv, sub-<label>/anat/*_T1w.nii.gz)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from monai_mtl.synthetic import CohortConfig, generate_cohort

    ranges = args.severity_ranges
    config = CohortConfig(
        num_samples=args.num_samples,
        seed=args.seed,
        shape=tuple(args.shape),
        spacing_mm=tuple(args.spacing),
        class_proportions=tuple(args.class_proportions),
        severity_ranges=tuple((ranges[i], ranges[i + 1]) for i in range(0, 6, 2)),
    )
    generate_cohort(args.output, config, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress,
                    sites=args.sites, layout=args.layout, covariates=args.covariates)
    return 0


def _add_montage(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "montage",
        help="PNG of a few slices of one subject per class with the atlas outline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset-dir", default="data/synthetic", help="cohort folder (labels.csv, atlas.nii.gz)")
    p.add_argument("--output", default="docs/cohort_montage.png", help="PNG to write")
    p.set_defaults(func=_run_montage)


def _run_montage(args: argparse.Namespace) -> int:
    from monai_mtl.figures import cohort_montage

    cohort_montage(args.dataset_dir, args.output)
    return 0


def _add_cv(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cv",
        help="stratified k-fold cross-validation with the bundle's training config",
        description="Train and test one bundle run per fold (folds already finished are not rerun), "
        "then write cv_folds.csv, cv_summary.json and cv_summary.md to the output folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds")
    p.add_argument("--dataset-dir", default="data/synthetic", help="cohort folder with labels.csv")
    p.add_argument("--output-dir", default="runs/cv", help="folder for fold_<i>/ runs and the summary")
    p.add_argument("--fold", type=int, default=None, help="run only this fold (0-based), e.g. as one cluster job")
    _add_run_options(p)
    p.add_argument("--allow-split-overlap", action="store_true",
                   help="summarize even if a fold tested subjects its checkpoint was trained on (not recommended)")
    p.set_defaults(func=_run_cv)


def _add_run_options(p: argparse.ArgumentParser, config_file: bool = True) -> None:
    """The options shared by every command that launches bundle training runs."""
    p.add_argument("--max-epochs", type=int, default=None, help="budget: override max_epochs of every run (more than a finished run had: it continues "
                   "from its last epoch)")
    if config_file:
        p.add_argument("--config-file", nargs="+", default=None, help="bundle config files merged in order")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="more bundle overrides (KEY=VALUE)")
    p.add_argument("--overwrite", action="store_true",
                   help="train again runs that finished with other settings (otherwise they are refused, naming the difference)")
    p.add_argument("--jobs", type=int, default=1,
                   help="bundle runs at once; each gets the CPU cores divided by N as threads (at least 1; on a GPU they "
                   "share it) and writes its output to <run folder>.log. Whether it pays depends on the CPU: "
                   "python benchmarks/run.py --only threads; docs/real_size.md")


def _overrides(args: argparse.Namespace) -> dict:
    """Bundle overrides from ``--override KEY=VALUE ...`` and ``--max-epochs``."""
    bad = [item for item in args.override if "=" not in item]
    if bad:
        raise ValueError(f"--override takes KEY=VALUE items, got {bad}")
    overrides = dict(item.split("=", 1) for item in args.override)
    if args.max_epochs is not None:
        overrides["max_epochs"] = args.max_epochs
    return overrides


def _run_cv(args: argparse.Namespace) -> int:
    from monai_mtl.crossval import DEFAULT_CONFIG, cross_validate

    overrides = _overrides(args)
    if args.allow_split_overlap:
        overrides["allow_split_overlap"] = True
    cross_validate(
        args.folds, args.dataset_dir, args.output_dir, fold=args.fold,
        config_files=args.config_file or [DEFAULT_CONFIG], overrides=overrides, allow_overlap=args.allow_split_overlap,
        overwrite=args.overwrite, jobs=args.jobs,
    )
    return 0


def _add_baseline(subparsers: argparse._SubParsersAction) -> None:
    from monai_mtl.baselines import KINDS

    p = subparsers.add_parser(
        "baseline",
        help="baselines on a training run's split: single-task CNNs, ResNet-18, class-median, scikit-learn, covariates only",
        description="Train/fit one baseline on exactly the split of a training run and write test_metrics.json "
        "and test_predictions.csv like the run. Network baselines are bundle runs with "
        "bundle/configs/baselines/<kind>.json merged over train.json. With --split naming a cross-validation "
        "folder (python -m monai_mtl cv), the baseline runs on each fold's split and is summarized like cv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--kind", choices=KINDS, nargs="+", required=True,
                   help="which baseline(s); several network baselines run --jobs at a time")
    p.add_argument("--dataset-dir", default=None,
                   help="cohort folder with labels.csv (and atlas.nii.gz; default: the folder the split was made from, "
                        "as the split.json, or fold 0's, records it; else data/synthetic)")
    p.add_argument("--split", default="runs/train/split.json",
                   help="split.json of the run to compare with, or a cross-validation folder (its fold_<i>/split.json)")
    p.add_argument("--output-dir", default=None, help="where to write (default: runs/baselines/<kind>, or "
                   "<cv folder>_<kind> for a cross-validation; one --kind only)")
    p.add_argument("--covariates", nargs="+", default=None, metavar="COLUMN",
                   help="covariates-only: the columns (default: the reference run's covariates setting, else those "
                   "generate --covariates recorded in cohort.json)")
    _add_run_options(p, config_file=False)  # network baselines only
    p.set_defaults(func=_run_baseline)


def _run_baseline(args: argparse.Namespace) -> int:
    from monai_mtl.baselines import run_baselines, run_baselines_cv
    from monai_mtl.run_folder import run_dataset_dir

    kinds = list(dict.fromkeys(args.kind))
    cross_validation = Path(args.split).is_dir()
    split_file = Path(args.split) / "fold_0" / "split.json" if cross_validation else Path(args.split)
    args.dataset_dir = args.dataset_dir or run_dataset_dir(None, split_file)
    if args.output_dir is not None and len(kinds) > 1:
        raise ValueError(f"--output-dir names one folder, but {len(kinds)} kinds were given: leave it out "
                         "(each kind writes to its default folder)")
    defaults = [f"{Path(args.split)}_{kind.replace('-', '_')}" if cross_validation else f"runs/baselines/{kind}" for kind in kinds]
    output_dirs = [args.output_dir] if args.output_dir else defaults
    run = run_baselines_cv if cross_validation else run_baselines
    run(kinds, args.dataset_dir, args.split, output_dirs, _overrides(args), args.overwrite, args.jobs, args.covariates)
    return 0


def _add_grid(subparsers: argparse._SubParsersAction) -> None:
    from monai_mtl.grid import PAPER_GRID

    p = subparsers.add_parser(
        "grid",
        help="the paper's hyper-parameter grid (lr x alpha x gamma x clip norm) ranked by validation loss",
        description="One bundle training run per grid point (trials already finished are not rerun), then "
        "grid_results.csv/.md ranking every finished trial by its lowest validation loss. Trial i is always "
        "the same point, so --trial shards the grid across machines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset-dir", default="data/synthetic", help="cohort folder with labels.csv")
    p.add_argument("--output-dir", default="runs/grid", help="folder for trial_<i>_*/ runs and the ranking")
    p.add_argument("--trial", type=int, nargs="+", default=None, help="run only these trial indices (0-based)")
    p.add_argument("--lr", type=float, nargs="+", default=list(PAPER_GRID["learning_rate"]), help="learning rates")
    p.add_argument("--alpha", type=float, nargs="+", default=list(PAPER_GRID["focal_alpha"]), help="focal alphas")
    p.add_argument("--gamma", type=float, nargs="+", default=list(PAPER_GRID["focal_gamma"]), help="focal gammas")
    p.add_argument("--clipnorm", type=float, nargs="+", default=list(PAPER_GRID["grad_clip_norm"]), help="clip norms")
    p.add_argument("--list", action="store_true", help="print the trial indices and points, run nothing")
    _add_run_options(p)
    p.set_defaults(func=_run_grid)


def _run_grid(args: argparse.Namespace) -> int:
    from monai_mtl.grid import grid_points, run_grid
    from monai_mtl.runs import DEFAULT_CONFIG

    grid = {"learning_rate": args.lr, "focal_alpha": args.alpha, "focal_gamma": args.gamma, "grad_clip_norm": args.clipnorm}
    if args.list:
        for i, point in enumerate(grid_points(grid)):
            print(i, point)
        return 0
    run_grid(args.dataset_dir, args.output_dir, args.trial, grid, args.config_file or [DEFAULT_CONFIG], _overrides(args),
             args.overwrite, jobs=args.jobs)
    return 0


def _add_robustness(subparsers: argparse._SubParsersAction) -> None:
    from monai_mtl.artifacts import ARTIFACT_KINDS

    p = subparsers.add_parser(
        "robustness",
        help="scans from other scanners: artifact sweep on a run's test part, other grids, leave-one-site-out",
        description="With --run: the run's best checkpoint on its test part, clean and with each scanner artifact at "
        "several strengths (and, for a synthetic cohort, re-rendered on other grids with the same field of view) -> "
        "robustness.csv and robustness.png. With --leave-site-out: one training per site of a multi-site cohort "
        "with that site held out, beside a within-site cross-validation -> leave_site_out.csv/.md. Artifacts: "
        + "; ".join(f"{k}: {v}" for k, v in ARTIFACT_KINDS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", default=None, help="training run folder (model.pt, split.json) for the artifact sweep")
    p.add_argument("--dataset-dir", default=None,
                   help="cohort folder with labels.csv (default: with --run, the folder the run was trained on, as its "
                        "split.json records it; else data/synthetic)")
    p.add_argument("--output-dir", default=None, help="where to write (default: <run>/robustness or runs/leave_site_out)")
    p.add_argument("--kinds", nargs="+", choices=sorted(ARTIFACT_KINDS), default=None, help="artifact kinds (default: all)")
    p.add_argument("--grids", nargs="*", default=None, metavar="XxYxZ",
                   help="grids to re-render the test subjects on (synthetic cohorts; default 80x72x24 48x48x12 128x128x32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random artifacts")
    p.add_argument("--part", choices=("test", "validation"), default="test",
                   help="split part to sweep: validation to compare candidate models, test for the chosen one")
    p.add_argument("--adapt-batchnorm", action="store_true",
                   help="also predict each row after moving the batch-norm statistics to those of its scans (as inference's "
                        "--adapt_batchnorm True): adapted_accuracy, adapted_severity_mae (twice the time)")
    p.add_argument("--leave-site-out", action="store_true", help="one training per held-out site, and a within-site CV")
    p.add_argument("--folds", type=int, default=5,
                   help="folds of the within-site cross-validation (--leave-site-out; 0: none, the held-out sites only)")
    _add_run_options(p)
    p.set_defaults(func=_run_robustness)


def _run_robustness(args: argparse.Namespace) -> int:
    from monai_mtl.robustness import DEFAULT_GRIDS, DEFAULT_STRENGTHS, artifact_sweep, leave_site_out
    from monai_mtl.run_folder import run_dataset_dir
    from monai_mtl.runs import DEFAULT_CONFIG

    if args.run is None and not args.leave_site_out:
        raise ValueError("give --run RUN_DIR (artifact sweep), --leave-site-out, or both")
    args.dataset_dir = args.dataset_dir or run_dataset_dir(args.run)
    if args.run is not None:
        strengths = {k: DEFAULT_STRENGTHS[k] for k in (args.kinds or DEFAULT_STRENGTHS)}
        grids = DEFAULT_GRIDS if args.grids is None else [_grid(g) for g in args.grids]
        default_dir = f"{args.run}/robustness" + ("" if args.part == "test" else f"_{args.part}")
        artifact_sweep(args.run, args.dataset_dir, args.output_dir or default_dir, strengths, grids, args.seed,
                       part=args.part, adapt_batchnorm=args.adapt_batchnorm)
    if args.leave_site_out:
        leave_site_out(args.dataset_dir, args.output_dir or "runs/leave_site_out", args.config_file or [DEFAULT_CONFIG],
                       _overrides(args), args.folds, args.overwrite, jobs=args.jobs)
    return 0


def _add_floor(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "floor",
        help="the information limit: the severity MAE of an observer who knows everything but the noise, and the "
             "response accuracy of one who knows the class the scan shows",
        description="For each subject of a split part, re-render its own anatomy (from cohort.json and its index) at "
        "candidate severities and take the one whose noise-free render best explains the scan under the generator's "
        "noise model (maximum likelihood) -> floor.json (severity_mae, bootstrap_95) and floor_predictions.csv. "
        "Beside it the Cramer-Rao bound of an observer who must also read the anatomy (pose, size, ventricles, smooth "
        "deformation) from the scan, as a model must (severity_mae_anatomy_unknown, anatomy_unknown_bootstrap_95). "
        "Also the response's limit (response_accuracy_limit, response_bootstrap_95): the class the scan shows, through "
        "the covariates' rule on a cohort made with --covariates (a missing genotype leaves some subjects unknowable). "
        "The severity needs a synthetic single-site cohort.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset-dir", default=None,
                   help="cohort folder made by generate (cohort.json; default: the folder the split was made from, as "
                        "the split.json records it; else data/synthetic)")
    p.add_argument("--split", default="runs/train/split.json",
                   help="a run's split.json, or a cv output folder (each fold_K/split.json, written to its fold)")
    p.add_argument("--part", choices=("train", "validation", "test"), default="test", help="split part")
    p.add_argument("--output-dir", default=None, help="where to write (default: the split's folder)")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--response-only", action="store_true",
                   help="only the response's limit (no renders: seconds instead of minutes)")
    p.set_defaults(func=_run_floor)


def _run_floor(args: argparse.Namespace) -> int:
    from monai_mtl.floor import information_limit
    from monai_mtl.run_folder import run_dataset_dir

    split = Path(args.split)
    if split.is_dir():  # a cv folder: the limit on each fold's part, beside the fold's own figures
        splits = sorted(split.glob("fold_*/split.json"), key=lambda f: int(f.parent.name.split("_")[1]))
        if not splits:
            raise ValueError(f"{split}: no fold_K/split.json (a cv output folder, or give a run's split.json)")
        if args.output_dir is not None:
            raise ValueError("--output-dir goes with one split.json; a cv folder's limits are written to each fold")
    else:
        splits = [split]
    for split_file in splits:
        dataset_dir = args.dataset_dir or run_dataset_dir(None, split_file)
        information_limit(dataset_dir, split_file, args.part, args.output_dir, args.workers,
                          severity=not args.response_only)
    return 0


def _add_trust(subparsers: argparse._SubParsersAction) -> None:
    from monai_mtl.trust import OOD_KINDS

    p = subparsers.add_parser(
        "trust",
        help="how well a run's out-of-distribution flag separates its test scans from scans it should refuse",
        description="The run's best checkpoint (calibrated: temperature, conformal thresholds, OOD score) on its test "
        "part and on made-up scans of each kind -> ood.csv (AUROC of the OOD score, fraction flagged) and "
        "ood_scores.csv. Kinds: " + "; ".join(f"{k}: {v}" for k, v in OOD_KINDS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", default="runs/train", help="training run folder (model.pt, split.json)")
    p.add_argument("--dataset-dir", default=None,
                   help="cohort folder with labels.csv (default: the folder the run was trained on, as its split.json "
                        "records it; else data/synthetic)")
    p.add_argument("--output-dir", default=None, help="where to write (default: <run>/trust)")
    p.add_argument("--per-kind", type=int, default=40, help="scans of each made-up kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the made-up scans")
    p.set_defaults(func=_run_trust)


def _run_trust(args: argparse.Namespace) -> int:
    from monai_mtl.run_folder import run_dataset_dir
    from monai_mtl.trust import ood_report

    ood_report(args.run, args.dataset_dir or run_dataset_dir(args.run), args.output_dir, args.per_kind, args.seed)
    return 0


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--grids takes sizes like 80x72x24, got {text!r}")
    return tuple(int(p) for p in parts)


def _add_results(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "results",
        help="the README results table (paper vs ours vs baselines) from the runs' JSON outputs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", default=".", help="folder holding runs/train, runs/cv and runs/baselines/<kind>")
    p.add_argument("--output", default="docs/results/results_table.md", help="markdown file to write")
    p.add_argument("--readme", default=None, help="also replace the generated blocks of this README")
    p.add_argument("--bundle", default=None,
                   help="also write the results block of BUNDLE/docs/README.md and eval_metrics of BUNDLE/configs/metadata.json")
    p.set_defaults(func=_run_results)


def _run_results(args: argparse.Namespace) -> int:
    from monai_mtl.io import atomic_write_text
    from monai_mtl.report import write_all

    section = write_all(args.root, args.readme, args.bundle)
    if section is None:  # no runs/train: nothing of the results table is rewritten (write_all said so)
        return 0
    atomic_write_text(args.output, section)
    also = [a for a in (args.readme, args.bundle) if a]
    logging.getLogger(__name__).info("results table -> %s%s", args.output, f" and {', '.join(also)}" if also else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``monai_mtl`` argument parser with one sub-command per workflow step."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_mtl",
        description="monai-mtl: multi-task 3D prediction of medication response and disease severity. "
        "Training, evaluation and inference run as a MONAI bundle: python -m monai.bundle run training "
        "--config_file bundle/configs/train.json",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subparsers)
    _add_montage(subparsers)
    _add_cv(subparsers)
    _add_baseline(subparsers)
    _add_grid(subparsers)
    _add_robustness(subparsers)
    _add_trust(subparsers)
    _add_floor(subparsers)
    _add_results(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with one error line for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # its event reader logs every file it moves to (reading the runs' validation curves)
        logging.getLogger("tensorboard").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (MonaiMtlError, ValueError, OSError) as err:
        # bad input, settings or paths: one clear line as the last line of output, no traceback
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        parser.exit(2, f"{parser.prog} {args.command}: error: {project_error(err) or err}\n")
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of monai-mtl, printed as one table (run: ``python benchmarks/run.py``).

All rows are measured in the same process, one after another, so ratios between them are
comparable; absolute numbers depend on the machine (its cores and torch build are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
BENCHES: dict[str, Callable[[argparse.Namespace], list[tuple[str, str, str]]]] = {}


def bench(name: str):
    def register(fn):
        BENCHES[name] = fn
        return fn

    return register


@bench("generate")
def bench_generate(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    from monai_mtl.synthetic import CohortConfig, generate_cohort

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, os.cpu_count() or 1):
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            generate_cohort(out, CohortConfig(num_samples=args.num_samples), workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append(
                (f"generate {args.num_samples} volumes, {workers} worker(s)", f"{seconds:.1f} s",
                 f"{args.num_samples / seconds:.0f} vol/s")
            )
            shutil.rmtree(out)
    return rows


class TextbookCNN:
    """The reference of the speed issue: 4 conv blocks (16-32-64-128, stride 1, max-pool), NCDHW, two heads."""

    @staticmethod
    def build():
        from torch import nn

        layers, width = [], 1
        for out in (16, 32, 64, 128):
            layers += [nn.Conv3d(width, out, 3, padding=1), nn.BatchNorm3d(out), nn.ReLU(inplace=True), nn.MaxPool3d(2)]
            width = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width, 4))


def _train_throughput(net, channels_last: bool, steps: int, batch_size: int = 16, shape=(64, 64, 16)) -> float:
    step = _training_step(net, channels_last, batch_size, shape)
    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def _training_step(net, channels_last: bool, batch_size: int = 16, shape=(64, 64, 16)) -> Callable[[], None]:
    """One training step (forward, loss, backward, Adam) of ``net`` on a fixed random batch, as a function."""
    import torch

    from monai_mtl import SEVERITY_SCALE
    from monai_mtl.losses import MultiTaskLoss

    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format).train()
    x = torch.rand(batch_size, 1, *shape).contiguous(memory_format=memory_format)
    target = {"response": torch.randint(0, 3, (batch_size,)), "severity": torch.rand(batch_size)}
    # a network with severity bins trains with their KL loss, as train.json's does (its sigma of 5 points on the [0, 1] scale)
    loss_fn = (MultiTaskLoss(severity_loss="bins", severity_bin_sigma=5.0 / SEVERITY_SCALE)
               if getattr(net, "severity_bins", 0) else MultiTaskLoss())
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)

    def step():
        optimizer.zero_grad()
        out = net(x)
        out = torch.cat([out[:, :3], torch.sigmoid(out[:, 3:])], dim=1) if out.shape[1] == 4 else out
        loss_fn(out, target).backward()
        optimizer.step()

    return step


def _bundle_network(config: str):
    """The ``network_def`` of a bundle config, built as the bundle builds it, and its strides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser["network_def"]["num_covariates"] = 0  # imaging only: its default expression would read the cohort's split
    return parser.get_parsed_content("network_def"), parser["network_def"]["strides"]


@bench("train")
def bench_train(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Steady-state training step throughput (forward, loss, backward, Adam), batch 16, 64 x 64 x 16, side by side."""
    network, strides = _bundle_network("train.json")
    ours = _train_throughput(network, channels_last=True, steps=args.train_steps)
    textbook = _train_throughput(TextbookCNN.build(), channels_last=False, steps=max(2, args.train_steps // 4))
    return [
        ("train step: textbook 3D CNN (16-32-64-128, NCDHW)", f"{1275 / textbook:.0f} s/epoch", f"{textbook:.1f} vol/s"),
        (f"train step: DualPathNet (strides {strides}, channels_last_3d)", f"{1275 / ours:.0f} s/epoch", f"{ours:.1f} vol/s"),
        ("speed-up of DualPathNet over the textbook CNN", "", f"{ours / textbook:.1f}x"),
    ]


ENCODER_VARIANTS = (  # (label, DualPathNet arguments): the choices behind the default network
    ("strides (2, 1, 1, 1), shared last block (the previous default)", {"strides": (2, 1, 1, 1), "task_blocks": 0}),
    ("strides (2, 1, 1, 1), widths 16-24-48-96", {"strides": (2, 1, 1, 1), "channels": (16, 24, 48, 96), "task_blocks": 0}),
    ("strides (2,2,2), (2,2,1), 1, 1", {"strides": ((2, 2, 2), (2, 2, 1), 1, 1), "task_blocks": 0}),
    ("strides (2, 2, 1, 1), shared last block", {"strides": (2, 2, 1, 1), "task_blocks": 0}),
    ("strides (2, 2, 1, 1), a last block per task (the default before 0.8.0)", {"strides": (2, 2, 1, 1), "task_blocks": 1}),
    ("strides (2, 2, 1, 1), a path per task after the stem, 50 severity bins (the default)",
     {"strides": (2, 2, 1, 1), "task_blocks": 3, "severity_bins": 50}),
)


@bench("encoders")
def bench_encoders(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Training-step throughput of DualPathNet encoder variants, side by side (batch 16, channels_last_3d)."""
    from monai_mtl.networks import DualPathNet

    rows = []
    for label, kwargs in ENCODER_VARIANTS:
        rate = _train_throughput(DualPathNet(dropout=0.1, **kwargs), channels_last=True, steps=args.train_steps)
        rows.append((f"train step, DualPathNet {label}", f"{1275 / rate:.0f} s/epoch", f"{rate:.1f} vol/s"))
    return rows


#: a child of ``threads``: the default network's training step timed between two lines from the parent, so that
#: the children of one measurement run their timed steps at the same time (their warm-ups may take unequal times)
_THREADS_CHILD = """
import sys, time
sys.path.insert(0, {benchmarks!r})
from run import _bundle_network, _training_step
step = _training_step(_bundle_network("train.json")[0], channels_last=True)
for _ in range(2):
    step()
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
for _ in range({steps}):
    step()
print(time.perf_counter() - start, flush=True)
"""


def _side_by_side_steps(processes: int, threads: int, steps: int) -> list[float]:
    """Seconds of ``steps`` training steps in each of ``processes`` children of ``threads`` intra-op threads each
    (the environment ``cv --jobs`` gives its children: :func:`monai_mtl.runs.threads_per_run`), all timed together."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code = _THREADS_CHILD.format(benchmarks=str(Path(__file__).resolve().parent), steps=steps)
    children = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True) for _ in range(processes)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a benchmark child failed before its timed steps (exit status {child.wait()})")
        for child in children:  # all warmed up: start the timed steps together
            child.stdin.write("go\n")
            child.stdin.flush()
        return [float(child.stdout.readline()) for child in children]
    finally:
        for child in children:
            child.wait()


@bench("threads")
def bench_threads(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The default network's training step with every core in one process, against one process per core of one thread
    each, side by side: the throughput ``cv --jobs N`` (N runs of ``cores // N`` threads) gains or loses on this CPU."""
    import statistics

    from monai_mtl.runs import threads_per_run

    cores = os.cpu_count() or 1
    steps = max(2, args.train_steps)
    batch = 16  # _training_step's
    # three rounds, alternating, each figure their median: side by side, the slower child's time swings by a third
    # from one measurement to the next on a 2-core virtual machine
    alone, together = [], []
    for _ in range(3):
        alone.append(_side_by_side_steps(1, threads_per_run(1), steps)[0])
        if cores > 1:
            together.append(max(_side_by_side_steps(cores, threads_per_run(cores), steps)))
    alone_rate = steps * batch / statistics.median(alone)
    rows = [(f"train step, 1 process of {threads_per_run(1)} threads (cv --jobs 1), median of 3",
             f"{1000 * statistics.median(alone) / steps:.0f} ms", f"{alone_rate:.1f} vol/s")]
    if together:
        rate = cores * steps * batch / statistics.median(together)
        ratios = sorted(cores * a / t for a, t in zip(alone, together))
        rows += [(f"train step, {cores} processes of {threads_per_run(cores)} thread(s) side by side (cv --jobs {cores}), "
                  "median of 3", f"{1000 * statistics.median(together) / steps:.0f} ms", f"{rate:.1f} vol/s in all"),
                 (f"-> throughput of --jobs {cores} over --jobs 1 (each round's: {', '.join(f'{r:.2f}' for r in ratios)})",
                  "", f"{rate / alone_rate:.2f}x")]
    return rows


#: oneDNN's names of a convolution's passes (``ONEDNN_VERBOSE`` ``prop_kind``)
KERNEL_PASSES = {"forward_training": "forward", "backward_data": "backward, input gradient",
                 "backward_weights": "backward, weight gradient"}


def _convolution_label(problem: str) -> str:
    """oneDNN's problem descriptor (``mb16_ic16oc32_id32od16kd3sd2dd0pd1_ih32oh16...``) as ``conv 16->32, 3x3x3 stride
    2x2x2, 32x32x8 -> 16x16x4``."""
    import re

    f = dict(re.findall(r"([a-z]+)(\d+)", problem))
    axes = [a for a in "dhw" if f"i{a}" in f]

    def size(key: str) -> str:
        return "x".join(f.get(key.format(a), "1") for a in axes)

    return (f"conv {f.get('ic')}->{f.get('oc')}, {size('k{}')} stride {size('s{}')}, "
            f"{size('i{}')} -> {size('o{}')}")


@bench("kernels")
def bench_kernels(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Where the default network's training step spends its convolution time, by oneDNN's own timing of each kernel it
    ran (its verbose mode), and the implementation it picked for this CPU's instruction set. On an AVX2 CPU it had no
    direct kernel for any weight gradient and fell back to im2col + GEMM (``gemm:jit``): a third of the step there
    (benchmarks/README.md, "Where a training step goes on a slower CPU")."""
    import collections
    import ctypes
    import sys

    import torch

    network, _ = _bundle_network("train.json")
    step = _training_step(network, channels_last=True)
    for _ in range(2):  # warm-up: oneDNN creates its primitives (and prints nothing timed) here
        step()
    steps = max(2, args.train_steps // 4)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)  # oneDNN prints from C to the process's stdout, not to sys.stdout
        try:
            start = time.perf_counter()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(steps):
                    step()
            seconds = (time.perf_counter() - start) / steps
            try:  # C's buffered stdout into the file before it is switched back (no libc handle on Windows)
                ctypes.CDLL(None).fflush(None)
            except (OSError, AttributeError, TypeError):
                pass
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().splitlines()
    isa = next((line.split(",")[-1] for line in lines if ",info,cpu,isa:" in line), "isa: unknown")
    kernels: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    calls: dict[tuple[str, str, str], int] = collections.Counter()
    for line in lines:
        fields = line.split(",")
        if len(fields) < 8 or fields[2:4] != ["primitive", "exec"]:
            continue
        kind, implementation, prop = fields[5], fields[6], fields[7]
        what = (_convolution_label(fields[-2]) + f": {KERNEL_PASSES.get(prop, prop)}" if kind == "convolution"
                else f"{kind}s (memory layout conversions)" if kind == "reorder" else kind)
        key = (what, implementation if kind == "convolution" else "", kind)
        kernels[key] += float(fields[-1]) / steps
        calls[key] += 1
    total = sum(kernels.values())
    gemm = sum(ms for (_, implementation, _), ms in kernels.items() if "gemm" in implementation)
    rows = [(f"kernels: training step of the default network (oneDNN {isa}, timing on)", f"{1000 * seconds:.0f} ms",
             ""),
            ("-> in oneDNN's kernels (convolutions and layout conversions)", f"{total:.0f} ms",
             f"{total / (10 * seconds):.0f}% of the step"),
            ("-> in im2col + GEMM fallbacks (`gemm` kernels)", f"{gemm:.0f} ms", f"{gemm / (10 * seconds):.0f}% of the step")]
    for key, ms in sorted(kernels.items(), key=lambda item: -item[1]):
        if ms >= 0.01 * 1000 * seconds:  # the kernels that take 1% of the step or more
            what, implementation, kind = key
            per_step = calls[key] / steps
            times = f"{per_step:.0f} x " if kind == "convolution" and per_step > 1 else ""  # a layer in each task path
            label = f"   {times}{what}" + (f" [{implementation}]" if implementation else "")
            rows.append((label, f"{ms:.1f} ms", f"{ms / (10 * seconds):.0f}% of the step"))
    return rows


@bench("loop")
def bench_loop(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The real training loop (bundle train.json: cached data, batch augmentation, precise BN, validation), epoch 2 timed."""
    import logging

    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from monai_mtl.synthetic import CohortConfig, generate_cohort

    logging.getLogger("monai_mtl").setLevel(logging.WARNING)
    config = str(CONFIGS / "train.json")
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, CohortConfig(num_samples=args.loop_samples), progress=False)
        workflow = ConfigWorkflow(
            config_file=config, workflow_type="train", logging_file=False,
            dataset_dir=str(cohort), output_dir=str(Path(tmp) / "run"), max_epochs=2,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        marks: dict[str, float] = {}

        def mark(name):
            return lambda engine: marks.__setitem__(f"{name}{engine.state.epoch}", time.perf_counter())

        trainer.add_event_handler(Events.EPOCH_STARTED, mark("start"))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, mark("end"))  # after validation: attached last
        # the last iteration's end, before the epoch's handlers (precise BN, validation) run
        trainer.add_event_handler(Events.ITERATION_COMPLETED, mark("train"))
        workflow.run()
        n_train = len(trainer.data_loader.dataset)
        steps = len(trainer.data_loader)
        trained = steps * trainer.data_loader.batch_size
        loop = marks["train2"] - marks["start2"]
        epoch = marks["end2"] - marks["start2"]
        start = time.perf_counter()
        for _ in trainer.data_loader:  # cached volumes + collation; the augmentation runs in the train step
            pass
        loading = time.perf_counter() - start
        workflow.finalize()
    rate = trained / loop
    return [
        (f"training loop, epoch 2 on {n_train} volumes (train steps only)", f"{loop:.1f} s", f"{rate:.1f} vol/s"),
        ("same epoch incl. precise-BN recalibration and validation", f"{epoch:.1f} s", f"{trained / epoch:.1f} vol/s"),
        ("-> epoch of the paper's 1275 training volumes (loop rate)", f"{1275 / rate:.0f} s", ""),
        (f"data loading alone (cached volumes + collation), {n_train} volumes", f"{loading:.2f} s", f"{trained / loading:.0f} vol/s"),
    ]


@bench("augmentation")
def bench_augmentation(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Cost per epoch of each augmentation preset per volume (MONAI, in the data loader) and of ``robust`` on the batch, side by side."""
    import torch
    from monai.transforms import Compose, NormalizeIntensityd, ScaleIntensityd

    from monai_mtl.transforms import Preprocessing, TrainingAugmentation, augmentation_transforms

    volumes = [{"image": torch.rand(1, 64, 64, 16) * 0.9} for _ in range(args.augment_samples)]
    rows, rates = [], {}
    for preset in ("paper", "robust"):
        chain = Compose([*augmentation_transforms(preset), NormalizeIntensityd(keys="image"), ScaleIntensityd(keys="image")])
        chain.set_random_state(0)
        start = time.perf_counter()
        for item in volumes:
            chain(item)
        rates[preset] = len(volumes) / (time.perf_counter() - start)
        rows.append((f"data loader, augmentation '{preset}' (per-volume transforms + normalisation)",
                     f"{1083 / rates[preset]:.1f} s/epoch", f"{rates[preset]:.0f} vol/s"))
    extra = 1083 / rates["robust"] - 1083 / rates["paper"]
    rows.append(("-> 'robust' per volume adds per epoch of 1083 volumes (one process)", f"{extra:.1f} s", ""))
    # what training does now: the same draws on batches of 16, then the normalisation of each volume
    augment = TrainingAugmentation("robust", Preprocessing(), noise_std=0.0, shift=0.0)
    batches = [torch.stack([item["image"] for item in volumes[i : i + 16]]) for i in range(0, len(volumes), 16)]
    torch.manual_seed(0)
    start = time.perf_counter()
    for batch in batches:
        augment(batch)
    rates["batch"] = len(volumes) / (time.perf_counter() - start)
    rows.append(("training step, augmentation 'robust' on batches of 16 (+ normalisation)",
                 f"{1083 / rates['batch']:.1f} s/epoch", f"{rates['batch']:.0f} vol/s"))
    rows.append(("speed-up of the batch over the per-volume 'robust'", "", f"**{rates['batch'] / rates['robust']:.1f}x**"))
    # the options on top of it: motion ghosting drawn too, histogram standardisation instead of the z-score, the
    # bias-field correction before it
    from monai_mtl.transforms import histogram_landmarks

    marks = histogram_landmarks(torch.cat(batches))
    landmarks = tuple(float(v) for v in ((marks - marks[:, :1]) / (marks[:, -1:] - marks[:, :1])).mean(dim=0))
    options = {
        "area": TrainingAugmentation("robust", Preprocessing(), noise_std=0.0, shift=0.0, scanner={"downsample_mode": "area"}),
        "mix": TrainingAugmentation("robust", Preprocessing(), noise_std=0.0, shift=0.0,
                                    scanner={"downsample_mode": ["area", "trilinear"], "low_resolution_prob": 0.3}),
        "ghosting": TrainingAugmentation("robust", Preprocessing(), noise_std=0.0, shift=0.0, scanner={"ghost_prob": 0.2}),
        "histogram": TrainingAugmentation("robust", Preprocessing(intensity="histogram", landmarks=landmarks),
                                          noise_std=0.0, shift=0.0),
        "bias": TrainingAugmentation("robust", Preprocessing(intensity="histogram", landmarks=landmarks, bias_field_degree=2),
                                     noise_std=0.0, shift=0.0),
    }
    for name, option in options.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        for batch in batches:
            option(batch)
        rates[name] = len(volumes) / (time.perf_counter() - start)
    rows.append(("... with the lower resolution down-sampled by `area` (`train.json` before 0.10.0; above: MONAI's `nearest`)",
                 f"{1083 / rates['area']:.1f} s/epoch", f"{rates['area'] / rates['batch']:.2f}x the rate of `nearest`"))
    rows.append(("... drawn in 30% of the scans (not 20%), by `area` or `trilinear` (`train.json` since 0.10.0)",
                 f"{1083 / rates['mix']:.1f} s/epoch", f"{rates['mix'] / rates['area']:.2f}x the rate of `area` at 20%"))
    rows.append(("... with motion ghosting (`scanner_augmentation#ghost_prob` 0.2)",
                 f"{1083 / rates['ghosting']:.1f} s/epoch", f"{rates['ghosting'] / rates['batch']:.2f}x the rate without"))
    rows.append(("... with `intensity_normalization` `histogram` instead of the z-score",
                 f"{1083 / rates['histogram']:.1f} s/epoch", f"{rates['histogram'] / rates['batch']:.2f}x the z-score's rate"))
    rows.append(("... and `bias_field_correction` 2 before it (`multisite.json`)",
                 f"{1083 / rates['bias']:.1f} s/epoch", f"{rates['bias'] / rates['histogram']:.2f}x the rate without"))
    return rows


@bench("infer")
def bench_infer(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Inference workflow (bundle inference.json) on synthetic volumes, with and without saliency."""
    import logging

    import torch
    from monai.bundle import ConfigWorkflow

    from monai_mtl.synthetic import CohortConfig, generate_cohort

    logging.getLogger("monai_mtl").setLevel(logging.WARNING)
    config = str(CONFIGS / "inference.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, CohortConfig(num_samples=args.infer_samples), progress=False)
        from monai_mtl.checkpoints import with_run_metadata
        from monai_mtl.networks import network_config
        from monai_mtl.transforms import Preprocessing

        ckpt = Path(tmp) / "model.pt"
        network = _bundle_network("train.json")[0]  # inference builds the network a checkpoint stores: store it
        torch.save(with_run_metadata(network.state_dict(), network=network_config(network),
                                     preprocessing=Preprocessing().to_dict()), ckpt)
        # train.json's test_time_shifts, set here on the inferer (a calibrated checkpoint stores them in its trust settings)
        shifts = json.loads((CONFIGS / "train.json").read_text())["test_time_shifts"]
        for saliency, moves in ((False, []), (False, shifts), (True, [])):
            workflow = ConfigWorkflow(
                config_file=config, workflow_type="infer", logging_file=False,
                dataset_dir=str(cohort / "images"), output_dir=str(Path(tmp) / f"out{saliency}{len(moves)}"),
                ckpt_path=str(ckpt), saliency=saliency, saliency_png=0, **{"inferer#shifts": moves},
            )
            workflow.initialize()
            start = time.perf_counter()
            workflow.run()
            seconds = time.perf_counter() - start
            what = f"inference on {args.infer_samples} volumes" + (" + Grad-CAM NIfTI (2 heads)" if saliency else "")
            what += f", averaged over the scan and {len(moves)} one-voxel moves (test_time_shifts)" if moves else ""
            rows.append((what, f"{seconds:.1f} s", f"{args.infer_samples / seconds:.0f} vol/s"))
    return rows


def _child_training(config_files: list[str], dataset_dir: Path, output_dir: Path, **overrides) -> dict:
    """One ``python -m monai.bundle run training`` child: its wall time, peak RSS and the trainer's logged epoch times
    (ignite's "Epoch[n] Complete": the training steps plus the epoch's handlers, batch-norm recalibration and validation)."""
    import re
    import subprocess
    import sys

    config = str(config_files) if len(config_files) > 1 else config_files[0]
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config,
               "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    log = output_dir.with_name(output_dir.name + ".log")
    start = time.perf_counter()
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS alone
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the benchmark run failed, see {log}")
    text = log.read_text(errors="replace")
    epochs = [int(h) * 3600 + int(m) * 60 + float(sec)
              for h, m, sec in re.findall(r"MultiTaskTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)", text)]
    return {"seconds": seconds, "peak_gib": usage.ru_maxrss / 2**20, "epoch_seconds": epochs}


def _subset_cohort(cohort: Path, n: int, target: Path) -> Path:
    """A cohort folder of the first ``n`` subjects of ``cohort`` (labels.csv with absolute image paths)."""
    from monai_mtl.cohort import read_labels

    target.mkdir(parents=True, exist_ok=True)
    read_labels(cohort / "labels.csv").head(n).to_csv(target / "labels.csv", index=False)
    return target


@bench("scale")
def bench_scale(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Peak RSS and epoch time of one training epoch (bundle train.json) against cohort size, for each ``cache``."""
    from monai_mtl.synthetic import CohortConfig, generate_cohort

    sizes = sorted(args.scale_sizes)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scale_tmp) as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, CohortConfig(num_samples=sizes[-1]), progress=False)
        for n in sizes:
            subset = _subset_cohort(cohort, n, Path(tmp) / f"n{n}")
            for cache in args.scale_caches:
                out = Path(tmp) / f"run_{n}_{cache}"
                result = _child_training([str(CONFIGS / "train.json")], subset, out, max_epochs=1, cache=cache,
                                         cache_dir=str(Path(tmp) / f"cache_{n}"))
                rows.append((f"scale: {n} subjects at 64x64x16, cache {cache}: 1 training epoch "
                             f"(whole run {result['seconds']:.0f} s)", f"{result['epoch_seconds'][0]:.0f} s/epoch",
                             f"{result['peak_gib']:.2f} GiB RSS"))
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(Path(tmp) / f"cache_{n}", ignore_errors=True)
        if args.highres_samples:
            highres = Path(tmp) / "highres"
            generate_cohort(highres, CohortConfig(num_samples=args.highres_samples, shape=(107, 128, 85),
                                                  spacing_mm=(1.5, 1.5, 1.5)), progress=False)
            out = Path(tmp) / "run_highres"
            result = _child_training([str(CONFIGS / "train.json"), str(CONFIGS / "highres.json")], highres, out,
                                     max_epochs=2, cache="auto", cache_dir=str(Path(tmp) / "cache_highres"))
            rows.append((f"highres.json: {args.highres_samples} subjects at 1.5 mm (112x128x88), epoch 2 "
                         f"(whole run of 2 epochs {result['seconds']:.0f} s)", f"{result['epoch_seconds'][-1]:.0f} s/epoch",
                         f"{result['peak_gib']:.2f} GiB RSS"))
    return rows


@bench("highres")
def bench_highres(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Training step and inference of the ``highres.json`` network on 112 x 128 x 88 volumes, beside the default's."""
    import torch

    rows = []
    for name, config_files, shape, batch in (("default", ["train.json"], (64, 64, 16), 16),
                                             ("highres.json", ["train.json", "highres.json"], (112, 128, 88), 8)):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(CONFIGS / c) for c in config_files])
        parser["network_def"]["num_covariates"] = 0  # imaging only, as in _bundle_network
        network = parser.get_parsed_content("network_def")
        rate = _train_throughput(network, channels_last=True, steps=max(2, args.train_steps // (4 if batch == 8 else 1)),
                                 batch_size=batch, shape=shape)
        rows.append((f"train step: {name} network on {'x'.join(map(str, shape))} (batch {batch})", "", f"{rate:.1f} vol/s"))
        network.eval()
        x = torch.randn(batch, 1, *shape).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            network(x)
            start = time.perf_counter()
            for _ in range(3):
                network(x)
        rows.append((f"inference forward: {name} network (batch {batch})", "",
                     f"{3 * batch / (time.perf_counter() - start):.1f} vol/s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="benchmarks to run (default: all)")
    parser.add_argument("--num-samples", type=int, default=1500, help="cohort size for the generation benchmark")
    parser.add_argument("--infer-samples", type=int, default=300, help="volumes for the inference benchmark")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps of our network")
    parser.add_argument("--loop-samples", type=int, default=1500, help="cohort size for the training-loop benchmark")
    parser.add_argument("--augment-samples", type=int, default=300, help="volumes for the augmentation benchmark")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[1000, 4000, 10000], help="cohort sizes of 'scale'")
    parser.add_argument("--scale-caches", nargs="+", default=["memory", "disk"], help="cache settings of 'scale'")
    parser.add_argument("--highres-samples", type=int, default=60, help="subjects of the highres row of 'scale' (0: none)")
    parser.add_argument("--scale-tmp", default=None, help="folder for the 'scale' cohorts and caches (default: the system's)")
    args = parser.parse_args()
    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    rows = []
    for name in args.only or list(BENCHES):
        rows.extend(BENCHES[name](args))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows.append(("peak memory (max RSS) of this benchmark process", "", f"{peak:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'benchmark':<{width}} | {'time':>10} | {'rate':>14} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 16}|")
    for what, seconds, rate in rows:
        print(f"| {what:<{width}} | {seconds:>10} | {rate:>14} |")


if __name__ == "__main__":
    main()

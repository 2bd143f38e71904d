"""Real-size cohorts: where preprocessed volumes are cached (memory, disk, none, auto)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from monai.transforms import Compose, MapTransform

from conftest import TRAIN_CONFIG, run_bundle
from monai_mtl.cohort import read_labels, to_datalist
from monai_mtl.datasets import cached_bytes, choose_cache, make_dataset, preprocessing_key
from monai_mtl.transforms import Preprocessing, augmentation_transforms

SMALL = Preprocessing(pixdim=(5.0, 6.0, 16.0), spatial_size=(32, 32, 8))


class CountCalls(MapTransform):
    """A deterministic pass-through that counts how often the cached part of a chain runs."""

    calls = 0

    def __call__(self, data):
        CountCalls.calls += 1
        return dict(data)


def _chain(preprocessing: Preprocessing) -> Compose:
    return Compose([*preprocessing.transforms(severity_key="severity"), CountCalls(keys="image")])


def _read_all(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def test_auto_caches_in_memory_when_it_fits_and_on_disk_when_it_does_not():
    needed = cached_bytes(10_000, Preprocessing())  # 10,000 x 64 x 64 x 16 float32: about 2.7 GB
    assert needed == pytest.approx(10_000 * 64 * 64 * 16 * 4, rel=0.02)
    assert choose_cache("auto", 10_000, Preprocessing(), available=24 * 2**30) == "memory"
    assert choose_cache("auto", 10_000, Preprocessing(), available=8 * 2**30) == "disk"  # would take a third of it
    assert choose_cache("none", 10_000, Preprocessing(), available=1) == "none"  # an explicit choice is kept
    with pytest.raises(ValueError, match="cache must be one of"):
        choose_cache("ram", 10, Preprocessing())


def test_disk_cache_is_read_back_and_invalidated_by_a_changed_preprocessing_or_scan(tiny_cohort, tmp_path):
    data = to_datalist(read_labels(tiny_cohort / "labels.csv"))[:6]
    CountCalls.calls = 0
    first = _read_all(make_dataset(data, _chain(SMALL), SMALL, cache="disk", cache_dir=tmp_path))
    assert CountCalls.calls == 6
    folder = tmp_path / preprocessing_key(SMALL, _chain(SMALL))
    assert len(list(folder.glob("*.pt"))) == 6
    assert json.loads((folder / "preprocessing.json").read_text())["spatial_size"] == [32, 32, 8]

    again = _read_all(make_dataset(data, _chain(SMALL), SMALL, cache="disk", cache_dir=tmp_path))
    assert CountCalls.calls == 6  # every volume from the cache, none preprocessed again
    assert all((a["image"] == b["image"]).all() for a, b in zip(first, again))

    other = Preprocessing(pixdim=(5.0, 6.0, 16.0), spatial_size=(32, 32, 6))
    changed = _read_all(make_dataset(data, _chain(other), other, cache="disk", cache_dir=tmp_path))
    assert CountCalls.calls == 12 and tuple(changed[0]["image"].shape[-3:]) == (32, 32, 6)  # a new key, nothing stale

    stat = os.stat(data[0]["image"])
    os.utime(data[0]["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the scan was rewritten
    _read_all(make_dataset(data, _chain(SMALL), SMALL, cache="disk", cache_dir=tmp_path))
    assert CountCalls.calls == 13


def test_training_and_evaluation_chains_keep_separate_disk_caches():
    training = Compose(SMALL.transforms(augmentation=augmentation_transforms("robust"), severity_key="severity"))
    evaluation = Compose(SMALL.transforms(severity_key="severity"))
    assert preprocessing_key(SMALL, training) != preprocessing_key(SMALL, evaluation)


def test_none_and_memory_give_the_same_volumes(tiny_cohort):
    data = to_datalist(read_labels(tiny_cohort / "labels.csv"))[:3]
    chain = Compose(SMALL.transforms(severity_key="severity"))
    plain = _read_all(make_dataset(data, chain, SMALL, cache="none"))
    cached = _read_all(make_dataset(data, chain, SMALL, cache="memory"))
    assert all((a["image"] == b["image"]).all() for a, b in zip(plain, cached))


@pytest.mark.slow
def test_a_run_with_the_disk_cache_trains_and_fills_it(train_cohort, tmp_path):
    output = tmp_path / "run"
    run_bundle("training", TRAIN_CONFIG, dataset_dir=str(train_cohort), output_dir=str(output), max_epochs=1,
               batch_size=8, cache="disk", cache_dir=str(tmp_path / "cache"))
    split = json.loads((output / "split.json").read_text())
    folders = {tuple(json.loads((f / "preprocessing.json").read_text())["cached_steps"]): len(list(f.glob("*.pt")))
               for f in Path(tmp_path / "cache").iterdir()}
    # two chains, two folders: the training chain caches before the intensity normalisation (the training step
    # normalises the augmented batch), the evaluation chain after it
    assert len(folders) == 2 and sum("NormalizeIntensityd" in steps for steps in folders) == 1
    evaluation = next(n for steps, n in folders.items() if "NormalizeIntensityd" in steps)
    training = next(n for steps, n in folders.items() if "NormalizeIntensityd" not in steps)
    assert evaluation == len(split["validation"]) + len(split["test"])
    # the training part as far as one epoch's full batches and the precise-BN pass read it (drop_last: the
    # shuffle decides which, up to three of the 43, are left unread)
    assert len(split["train"]) // 8 * 8 <= training <= len(split["train"])
    assert json.loads((output / "test_metrics.json").read_text())["n"] == len(split["test"])


@pytest.mark.slow
def test_jobs_two_gives_the_fold_results_of_jobs_one(train_cohort, tmp_path):
    from monai_mtl.crossval import cross_validate

    overrides = {"max_epochs": 1, "batch_size": 8, "cache_workers": 1}
    # the same intra-op threads in both, so the floating-point sums are the same
    one = cross_validate(2, train_cohort, tmp_path / "one", overrides=overrides, jobs=1, threads=1)
    two = cross_validate(2, train_cohort, tmp_path / "two", overrides=overrides, jobs=2, threads=1)
    folds_one = pd.read_csv(tmp_path / "one" / "cv_folds.csv")
    folds_two = pd.read_csv(tmp_path / "two" / "cv_folds.csv")
    pd.testing.assert_frame_equal(folds_one, folds_two)
    assert one["severity_mae"] == two["severity_mae"]
    assert all((tmp_path / "two" / f"fold_{i}.log").is_file() for i in range(2))  # each child's output beside its folder
    assert not (tmp_path / "one" / "fold_0.log").exists()  # one at a time: in the terminal


@pytest.mark.slow
def test_concurrent_runs_that_fail_are_named_together(train_cohort, tmp_path):
    from monai_mtl.errors import RunError
    from monai_mtl.runs import DEFAULT_CONFIG, RunRequest, run_trainings

    requests = [RunRequest([DEFAULT_CONFIG], train_cohort, tmp_path / name, {"severity_loss": "cubic", "max_epochs": 1})
                for name in ("a", "b")]
    with pytest.raises(RunError, match=r"2 of 2 runs failed: .*run in .*a failed.*severity_loss.*run in .*b failed"):
        run_trainings(requests, jobs=2)

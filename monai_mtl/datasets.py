"""Where preprocessed volumes are kept between epochs: in memory, on disk, or nowhere (the ``cache`` config key).

- ``memory``: MONAI ``CacheDataset``; every preprocessed volume in RAM (fastest; 1500 x 64 x 64 x 16 float32
  is 0.4 GB, 10,000 x 128 x 128 x 96 would be 63 GB).
- ``disk``: MONAI ``PersistentDataset`` in ``cache_dir/<key>``; memory flat in cohort size. The key is
  a hash of the :class:`~monai_mtl.transforms.Preprocessing` settings and of the package versions, so a
  changed grid, spacing, orientation or normalisation never reuses stale tensors. MONAI's own
  ``hash_transform`` is not used for that: it JSON-hashes the transform objects and, as MONAI's
  transforms are not JSON-serialisable, falls back to their class names, so ``Spacingd(pixdim=2)`` and
  ``Spacingd(pixdim=3)`` would share a cache. Each item's key also holds its image file's size and
  modification time, so a rewritten scan is preprocessed again.
- ``none``: MONAI ``Dataset``; every volume preprocessed on every read.
- ``auto`` (default): ``memory`` when the cached tensors take at most :data:`AUTO_MEMORY_SHARE` of the
  available RAM (so well under half the machine's), ``disk`` otherwise; the choice is logged.

Like ``CacheDataset``, ``PersistentDataset`` keeps the deterministic part of the chain (load, orient,
resample, crop/pad) and runs the random augmentation after it on every read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from monai_mtl.errors import ConfigError
from monai_mtl.io import atomic_write_json
from monai_mtl.transforms import Preprocessing

logger = logging.getLogger(__name__)

#: ``cache`` config key choices
CACHE_MODES = ("auto", "memory", "disk", "none")

#: ``auto`` caches in memory when the estimate is at most this share of the available RAM
AUTO_MEMORY_SHARE = 0.25

#: per-item overhead of a cached dictionary beside its image tensor (labels, metadata), bytes
ITEM_OVERHEAD_BYTES = 4096


def memory_bytes() -> tuple[int, int]:
    """``(total, available)`` RAM in bytes, from ``/proc/meminfo`` (Linux) or ``os.sysconf``."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if k in ("MemTotal", "MemAvailable")}
        return kib["MemTotal"], kib["MemAvailable"]
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def cached_bytes(num_items: int, preprocessing: Preprocessing, channels: int = 1) -> int:
    """The memory that ``num_items`` preprocessed float32 volumes of ``preprocessing`` take in a ``CacheDataset``."""
    return int(num_items) * (int(np.prod(preprocessing.spatial_size)) * channels * 4 + ITEM_OVERHEAD_BYTES)


def choose_cache(cache: str, num_items: int, preprocessing: Preprocessing, available: int | None = None) -> str:
    """The concrete cache mode for ``cache`` (``auto`` resolved against the available RAM, and logged)."""
    if cache not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache != "auto":
        return cache
    needed = cached_bytes(num_items, preprocessing)
    available = memory_bytes()[1] if available is None else available
    chosen = "memory" if needed <= AUTO_MEMORY_SHARE * available else "disk"
    logger.info("cache auto: %d volumes of %s take %.2f GB, %.0f%% of the %.1f GB available: %s", num_items,
                "x".join(map(str, preprocessing.spatial_size)), needed / 1e9, 100 * needed / max(available, 1),
                available / 1e9, chosen)
    return chosen


def cached_steps(transform: Callable) -> list[str]:
    """Class names of the transforms a persistent cache stores the result of: those before the first random one."""
    from monai.transforms import Compose, RandomizableTrait, Transform

    steps = transform.flatten().transforms if isinstance(transform, Compose) else [transform]
    names = []
    for step in steps:
        if isinstance(step, RandomizableTrait) or not isinstance(step, Transform):
            break
        names.append(type(step).__name__)
    return names


def preprocessing_key(preprocessing: Preprocessing, transform: Callable | None = None) -> str:
    """A short hash of everything that shapes a cached tensor.

    The preprocessing settings, the package versions and the cached steps of ``transform`` (a training
    chain with the ``robust`` preset caches before its intensity normalisation, which the training step does
    after augmenting the batch; an evaluation chain after it: two keys).
    """
    import monai

    import monai_mtl

    facts = {"preprocessing": preprocessing.to_dict(), "monai_mtl": monai_mtl.__version__, "monai": monai.__version__,
             "steps": cached_steps(transform) if transform is not None else []}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def item_hash(item: dict) -> bytes:
    """The cache key of one datalist item: its fields and its image file's size and modification time."""
    facts = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in item.items()}
    image = item.get("image")
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        stat = os.stat(image)
        facts["_file"] = [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest().encode()


def make_dataset(
    data: Sequence[dict],
    transform: Callable,
    preprocessing: Preprocessing,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
):
    """The MONAI dataset of ``data`` for ``cache`` (see the module's documentation).

    Args:
        data: the datalist (dicts with ``image`` and labels).
        transform: the full chain (deterministic preprocessing, then any random augmentation).
        preprocessing: the settings the chain was built from (they key the disk cache).
        cache: one of :data:`CACHE_MODES`.
        cache_dir: root of the disk caches (required for ``disk``, and for ``auto`` when it picks ``disk``).
        num_workers: threads that fill a memory cache.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset

    mode = choose_cache(cache, len(data), preprocessing)
    if mode == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=num_workers, progress=False)
    if mode == "none":
        return Dataset(data, transform)
    if cache_dir is None:
        raise ConfigError("cache 'disk' needs a cache_dir")
    folder = Path(cache_dir) / preprocessing_key(preprocessing, transform)
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / "preprocessing.json"
    if not settings.is_file():  # what the tensors in this folder were made with, for a reader of the folder
        facts = {**preprocessing.to_dict(), "cached_steps": cached_steps(transform)}
        atomic_write_json(settings, facts)
    logger.info("disk cache of %d volumes in %s", len(data), folder)
    return PersistentDataset(data, transform, cache_dir=folder, hash_func=item_hash)


__all__ = ["CACHE_MODES", "AUTO_MEMORY_SHARE", "memory_bytes", "cached_bytes", "choose_cache", "cached_steps",
           "preprocessing_key", "item_hash", "make_dataset"]

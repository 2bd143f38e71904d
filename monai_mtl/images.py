"""Checks of NIfTI images: readable, one 3D volume, finite and not constant, data size as the header says.

Every problem is a :class:`~monai_mtl.errors.CohortError` whose message starts with the file's path.
Used on a whole cohort before training (:func:`check_images`), and per scan inside the transforms
that read it for training and inference (:class:`monai_mtl.transforms.CheckImaged`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pandas as pd

from monai_mtl.errors import CohortError


def check_stored_size(path: str | os.PathLike, image: nib.spatialimages.SpatialImage | None = None) -> None:
    """Refuse a NIfTI file that stores more voxel data than its header's dimensions describe.

    nibabel reads just the voxels the header describes, so a header claiming 64 x 64 x 8 of a
    64 x 64 x 16 volume silently gives its first half. The stored size is the file's size, or for
    ``.gz`` the uncompressed size from the gzip trailer (modulo 2**32, as gzip records it).

    Raises:
        CohortError: naming the file, the header's shape and both sizes.
    """
    image = nib.load(path) if image is None else image
    proxy, header = image.dataobj, image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    # the proxy's offset is where the data starts in the file (the header's vox_offset may read 0 once loaded)
    expected = int(getattr(proxy, "offset", header.get_data_offset())) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    if str(path).endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            stored = int.from_bytes(f.read(4), "little")
        expected %= 2**32
    else:
        stored = os.path.getsize(path)
    if stored > expected:
        raise CohortError(
            f"{path}: the header describes {'x'.join(map(str, shape))} voxels of {header.get_data_dtype()} ({expected} bytes "
            f"with the header) but the file stores {stored}: its dimensions do not match its data"
        )


def check_volume(data: np.ndarray, path: str | os.PathLike) -> None:
    """Check a loaded 3D volume's voxels: all finite and not constant.

    Raises:
        CohortError: naming ``path``: NaN/Inf voxels or a constant volume.
    """
    if not np.all(np.isfinite(data)):
        raise CohortError(f"{path}: {int((~np.isfinite(data)).sum())} voxels are NaN or infinite")
    if data.min() == data.max():
        raise CohortError(f"{path}: the volume is constant ({data.min()}), nothing to learn from")


def not_3d_error(path: str | os.PathLike, shape: tuple[int, ...]) -> CohortError:
    """The error for a file that does not hold one 3D volume."""
    return CohortError(f"{path}: expected a 3D volume, got shape {tuple(int(n) for n in shape)}")


def check_image(path: str | os.PathLike) -> tuple[int, ...]:
    """Read a NIfTI file fully and check it is a usable 3D volume; returns its 3D shape.

    A 4D file with a single volume is accepted (it is squeezed when loaded).

    Raises:
        CohortError: unreadable, truncated or non-NIfTI file; not 3D; NaN/Inf voxels; a constant volume.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files (ImageFileError, EOFError, OSError, ...)
        raise unreadable_error(path, err) from None
    check_stored_size(path, image)
    shape = tuple(int(n) for n in data.shape)
    if len(shape) == 4 and shape[3] == 1:
        data = data[..., 0]
    elif len(shape) != 3:
        raise not_3d_error(path, shape)
    check_volume(data, path)
    return tuple(data.shape)


def unreadable_error(path: str | os.PathLike, err: BaseException) -> CohortError:
    """The error for a file that cannot be read as NIfTI, with the reader's own exception."""
    return CohortError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})")


def image_errors(paths: list[str], workers: int = 4) -> list[str | None]:
    """:func:`check_image` on every path (threads: decompression releases the GIL); the error text or ``None`` each."""

    def error_of(path: str) -> str | None:
        try:
            check_image(path)
        except CohortError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(error_of, paths))


def check_images(table: pd.DataFrame, workers: int = 4) -> None:
    """Raise ``CohortError`` naming the first subject whose image fails :func:`check_image`."""
    errors = image_errors(list(table["image"]), workers)
    bad = [(sid, err) for sid, err in zip(table["subject_id"], errors) if err]
    if bad:
        more = f" (and {len(bad) - 1} more bad image(s))" if len(bad) > 1 else ""
        raise CohortError(f"subject {bad[0][0]}: {bad[0][1]}{more}")


__all__ = [
    "check_stored_size", "check_volume", "not_3d_error", "check_image", "unreadable_error", "image_errors", "check_images",
]

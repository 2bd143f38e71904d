"""File formats and atomic writes: a failed or killed run never leaves a half-written file that looks complete.

Every file the package writes goes through :func:`atomic_write`: text, JSON, CSV tables (one
number format), NIfTI images (sform and qform set), PNG figures and torch checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_mtl.errors import OutputError

if TYPE_CHECKING:
    import nibabel as nib
    import numpy as np
    import pandas as pd


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """The one way this package writes a file: ``write(temporary sibling)``, flushed to disk, renamed over ``path``.

    The sibling is ``.<name>.partial-<pid><suffixes>``: it keeps ``path``'s suffixes, so writers that
    choose the format by the name (nibabel's ``.nii.gz``) write the right one. Whatever fails, the
    sibling is removed and ``path`` keeps its previous content.

    Raises:
        OutputError: ``could not write <path>: <reason>`` (a folder that cannot be created, a full disk,
            a file-size limit; torch's zip writer reports those as ``RuntimeError``).

    Example:
        >>> atomic_write("out/notes.txt", lambda p: p.write_text("done"))  # doctest: +SKIP
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}{''.join(path.suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (str(err).splitlines() or [type(err).__name__])[0]
        raise OutputError(f"could not write {path}: {reason}; the previous file, if any, is unchanged") from err
    finally:
        partial.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text``."""
    return atomic_write(path, lambda partial: partial.write_text(text))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """:func:`atomic_write_text` of ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_csv(path: str | os.PathLike, table: pd.DataFrame) -> Path:
    """:func:`atomic_write_text` of a table as CSV, without the index, floats to 7 significant digits.

    Seven digits keep severities (0-100) to 1e-5, so predictions read back from two files compare to 1e-4.
    """
    return atomic_write_text(path, table.to_csv(index=False, float_format="%.7g"))


def nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with sform and qform set to ``affine`` (scanner RAS, mm), as viewers expect."""
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return image


def atomic_write_nifti(path: str | os.PathLike, image: nib.Nifti1Image) -> Path:
    """:func:`atomic_write` of a NIfTI image (``.nii`` or ``.nii.gz`` by ``path``'s name)."""
    import nibabel as nib

    return atomic_write(path, lambda partial: nib.save(image, partial))


def ensure_writable_dir(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove it writable with a probe file, before any work starts.

    Raises:
        OSError: ``"<name> <path> is not writable: <reason>"``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{name} {path} is not writable: {err.strerror or err}") from err
    return path

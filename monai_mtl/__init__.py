"""monai-mtl: multi-task 3D brain-MRI prediction of medication response and disease severity with MONAI."""

from __future__ import annotations

__version__ = "0.2.0"

#: Response classes, indexed as in ``labels.csv``'s ``response`` column.
RESPONSE_NAMES: tuple[str, ...] = ("non_responder", "partial_responder", "responder")

#: Severity is reported on this scale; the network regresses ``severity / SEVERITY_SCALE``.
SEVERITY_SCALE: float = 100.0

__all__ = ["RESPONSE_NAMES", "SEVERITY_SCALE", "__version__"]

"""Fusion registry; importing this package registers every built-in strategy."""

from model.fusion import concat  # noqa: F401  (registration side effects)
from model.fusion.base import FUSIONS, Fusion

__all__ = ["FUSIONS", "Fusion"]

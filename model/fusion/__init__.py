"""Fusion registry; importing this package registers every built-in strategy."""

from model.fusion import concat, cross_attention, gmu, late, weighted_sum  # noqa: F401  (registration side effects)
from model.fusion.base import FUSIONS, Fusion
from model.fusion.sequence import SEQUENCE_STAGES, SequenceStage, build_sequence_stage

__all__ = ["FUSIONS", "SEQUENCE_STAGES", "Fusion", "SequenceStage", "build_sequence_stage"]

"""Weighted sum: both modalities projected to H, mixed with learned softmax-normalised weights.

The two weights are global (one pair for the whole model, not per sample), so after training
they read directly as "how much the classifier relies on each modality" (``modality_weights``).

Sequence stage: over the two-element modality sequence [image, text] of the projections,
before they are weighted (see ``model/fusion/sequence.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from model.fusion.base import FUSIONS, Fusion, pooled_pair_builder
from model.fusion.sequence import build_sequence_stage, modality_pair


class WeightedSumFusion(Fusion):
    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1,
        sequence_stage: str = "none", num_heads: int = 4,
    ):
        super().__init__()
        self.out_dim = hidden_dim
        self.sequence_stage = sequence_stage
        self.image_in = nn.Sequential(nn.Linear(image_dim, hidden_dim), nn.GELU())
        self.text_in = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.GELU())
        self.stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.weight_logits = nn.Parameter(torch.zeros(2))  # equal weights at the start
        self.dropout = nn.Dropout(dropout)

    def modality_weights(self) -> torch.Tensor:
        """[w_image, w_text], non-negative, summing to 1."""
        return torch.softmax(self.weight_logits, dim=0)

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        image, text = modality_pair(self.image_in(image_pooled), self.text_in(text_pooled), self.stage)
        w = self.modality_weights()
        return self.dropout(w[0] * image + w[1] * text)


build_weighted_sum = FUSIONS.register("weighted_sum")(pooled_pair_builder(WeightedSumFusion))

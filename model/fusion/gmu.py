"""Gated Multimodal Unit (Arevalo et al., 2017, "Gated Multimodal Units for Information Fusion").

    h_v = tanh(W_v x_v),  h_t = tanh(W_t x_t),  z = sigmoid(W_z [x_v; x_t]),  h = z * h_v + (1 - z) * h_t

Unlike weighted_sum's global weights, the gate z is per sample *and* per feature: the model
can trust the image for one question and the text for another.

Sequence stage: over the two-element modality sequence [h_v, h_t] before gating (see
``model/fusion/sequence.py``); the gate still reads the raw inputs, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from model.fusion.base import FUSIONS, Fusion, pooled_pair_builder
from model.fusion.sequence import build_sequence_stage, modality_pair


class GMUFusion(Fusion):
    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1,
        sequence_stage: str = "none", num_heads: int = 4,
    ):
        super().__init__()
        self.out_dim = hidden_dim
        self.sequence_stage = sequence_stage
        self.image_in = nn.Linear(image_dim, hidden_dim, bias=False)
        self.text_in = nn.Linear(text_dim, hidden_dim, bias=False)
        self.gate = nn.Linear(image_dim + text_dim, hidden_dim, bias=False)
        self.stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.dropout = nn.Dropout(dropout)

    def gate_values(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
        """z in (0, 1) [B, H]: the share of each feature taken from the image."""
        return torch.sigmoid(self.gate(torch.cat([image_pooled, text_pooled], dim=-1)))

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        h_v, h_t = modality_pair(torch.tanh(self.image_in(image_pooled)), torch.tanh(self.text_in(text_pooled)),
                                 self.stage)
        z = self.gate_values(image_pooled, text_pooled)
        return self.dropout(z * h_v + (1 - z) * h_t)


build_gmu = FUSIONS.register("gmu")(pooled_pair_builder(GMUFusion))

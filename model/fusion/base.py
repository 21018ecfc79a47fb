"""The one signature every fusion strategy shares.

Inputs are both modalities' pooled and token/region features; the output is one fused vector
per sample that the classification head turns into logits.
"""

from __future__ import annotations

import torch
from torch import nn

from model.registry import Registry


class Fusion(nn.Module):
    out_dim: int

    def forward(
        self,
        image_pooled: torch.Tensor,
        image_regions: torch.Tensor,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError


FUSIONS: Registry = Registry("fusion strategy")

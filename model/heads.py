"""Classification head and the contrastive image/text embedding head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, num_classes)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.proj(fused)


class ContrastiveHead(nn.Module):
    """Projects both modalities into one L2-normalised space (CLIP-style).

    The temperature is learnable but clamped (as in CLIP) so the logit scale cannot run away
    and destabilise joint training with the classifier.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 128, init_temperature: float = 0.07):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_proj = nn.Sequential(nn.Linear(image_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; rows sharing a ``group`` id (the same image twice in a batch) are not negatives."""
    logits = scale * image_emb @ text_emb.t()
    same = group.unsqueeze(0) == group.unsqueeze(1)
    eye = torch.eye(len(group), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(group), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

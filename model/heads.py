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


class RegionAttentionPool(nn.Module):
    """A few learned queries attend over the image regions, each tagged with a learned position.

    Why: average pooling a CNN's feature map throws away *where* things are, and captions say
    "a red circle at the top left". Position embeddings let each query look for "something red
    in the top-left area"; several queries keep several shapes apart instead of blending them.
    Written out by hand (not ``nn.MultiheadAttention``) so the traced ONNX graph is plain
    MatMul/Softmax with a fixed region count and a dynamic batch.
    """

    def __init__(self, in_dim: int, num_regions: int, dim: int = 256, queries: int = 4, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pool dim {dim} must be divisible by heads {heads}")
        self.num_regions, self.dim, self.heads, self.num_queries = num_regions, dim, heads, queries
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.randn(num_regions, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out_dim = queries * dim

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """regions [B, R, in_dim] -> [B, queries * dim]."""
        if regions.shape[1] != self.num_regions:
            raise ValueError(f"expected {self.num_regions} regions, got {regions.shape[1]}")
        b = regions.shape[0]
        h, dh = self.heads, self.dim // self.heads
        x = self.proj(self.norm(regions)) + self.pos
        k = self.key(x).view(b, self.num_regions, h, dh).transpose(1, 2)  # [B, H, R, dh]
        v = self.value(x).view(b, self.num_regions, h, dh).transpose(1, 2)
        q = self.queries.view(self.num_queries, h, dh).transpose(0, 1).unsqueeze(0)  # [1, H, Q, dh]
        attn = (q @ k.transpose(-1, -2) / math.sqrt(dh)).softmax(-1)  # [B, H, Q, R]
        return (attn @ v).transpose(1, 2).reshape(b, self.out_dim)


class ContrastiveHead(nn.Module):
    """Projects both modalities into one L2-normalised space (CLIP-style).

    The temperature is learnable but clamped (as in CLIP) so the logit scale cannot run away
    and destabilise joint training with the classifier.

    With ``image_regions > 0`` the image side also attention-pools the encoder's regions
    (:class:`RegionAttentionPool`) and projects ``[pooled, attention-pooled]``; ``embed_image``
    then needs the regions. With the defaults the head (and its state dict) is the plain one.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        *,
        hidden_dim: int | None = None,
        image_regions: int = 0,
        pool_dim: int = 256,
        pool_queries: int = 4,
        pool_heads: int = 4,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        hidden = hidden_dim or embed_dim
        self.region_pool = (
            RegionAttentionPool(image_dim, image_regions, pool_dim, pool_queries, pool_heads) if image_regions else None
        )
        image_in = image_dim + (self.region_pool.out_dim if self.region_pool is not None else 0)
        self.image_proj = nn.Sequential(nn.Linear(image_in, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def uses_regions(self) -> bool:
        return self.region_pool is not None

    def embed_image(self, pooled: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        if self.region_pool is not None:
            if regions is None:
                raise ValueError("this head attention-pools image regions: call embed_image(pooled, regions)")
            pooled = torch.cat([pooled, self.region_pool(regions)], dim=-1)
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

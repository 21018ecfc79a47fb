"""The one signature every fusion strategy shares, its registry, and the layers strategies share.

Inputs are both modalities' pooled and token/region features; the output is one fused vector
per sample that the classification head turns into logits, or (``produces_logits``) the logits
themselves, for strategies such as late fusion whose per-modality heads *are* the classifier.

Every builder registered in ``FUSIONS`` has the signature

    builder(image_dim, text_dim, hidden_dim=256, dropout=0.1, *, num_classes=None,
            num_regions=None, sequence_stage="none", **strategy_kwargs) -> Fusion

``num_classes``, ``num_regions`` and ``sequence_stage`` are *context* that ``model/build.py``
passes to every strategy alike (a strategy that does not need one ignores it), so build code
never special-cases a strategy; ``strategy_kwargs`` (e.g. ``num_heads``) come from
``TrainConfig.fusion_kwargs`` and an unknown one is a TypeError, not silently dropped.

Every module here must trace with the legacy ONNX exporter with dynamic batch and sequence
axes, and a text's output must not depend on how far its batch is padded (the server pads each
batch to its longest text): masks are applied, never inferred from values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.registry import Registry


class Fusion(nn.Module):
    """(image_pooled [B,Di], image_regions [B,R,Di], text_pooled [B,Dt], text_tokens [B,T,Dt],
    text_mask [B,T]) -> fused [B, out_dim].

    ``produces_logits``: the output already is class logits (``out_dim == num_classes``) and
    ``FusionModel`` must not put a classifier on top.
    """

    out_dim: int
    produces_logits: bool = False
    sequence_stage: str = "none"

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


def pooled_pair_builder(cls: Callable[..., Fusion]) -> Callable[..., Fusion]:
    """The registry builder of a strategy that reads only the pooled pair.

    ``cls(image_dim, text_dim, hidden_dim, dropout, sequence_stage, num_heads)``; ``num_classes`` and
    ``num_regions`` are build context such a strategy does not need, so they are taken and ignored
    here, once, rather than in a copy of the same builder per strategy.
    """

    def build(
        image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, *,
        num_classes: int | None = None, num_regions: int | None = None, sequence_stage: str = "none",
        num_heads: int = 4,
    ) -> Fusion:
        return cls(image_dim, text_dim, hidden_dim, dropout, sequence_stage, num_heads)

    build.__name__ = build.__qualname__ = f"build_{getattr(cls, '__name__', 'fusion')}"
    build.__doc__ = f"Builds :class:`{getattr(cls, '__name__', cls)}` (see :func:`pooled_pair_builder`)."
    return build


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention written out with matmuls.

    Not ``nn.MultiheadAttention``: its inference fast path and SDPA kernel choice change between
    torch releases and trace differently; explicit ops export to ONNX the same every time.
    Masked keys get the dtype's most negative value rather than -inf, so a row whose keys are all
    masked (an empty text) yields a finite average instead of NaN; where at least one key is
    valid the masked ones still get exactly zero weight.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key_value: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query [B,Q,H], key_value [B,K,H], key_mask [B,K] (nonzero = attend) -> [B,Q,H]."""
        q, k, v = self._split(self.q(query)), self._split(self.k(key_value)), self._split(self.v(key_value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5)  # [B, heads, Q, K]
        if key_mask is not None:
            blocked = (key_mask == 0).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, K]
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(attn, v).transpose(1, 2)  # [B, Q, heads, head_dim]
        return self.out(ctx.reshape(ctx.shape[0], ctx.shape[1], -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, expansion: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * expansion, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def modality_mask(sequence: torch.Tensor) -> torch.Tensor:
    """An all-valid int64 mask [B, S] for a sequence without padding (image regions, modality pairs).

    Built from the tensor itself (not ``torch.ones(B, S)``) so the traced graph keeps the batch
    and sequence sizes dynamic.
    """
    return torch.ones_like(sequence[:, :, 0], dtype=torch.long)


"""Optional sequence stage run inside a fusion strategy: ``none | bilstm | transformer``.

A stage maps a masked sequence of hidden vectors to a sequence of the same shape,
``(x [B, S, H], mask [B, S]) -> [B, S, H]``, letting each element see its neighbours before the
strategy pools. *Which* sequence depends on the strategy (each strategy's docstring says so):

- ``cross_attention``: the fused text-token sequence (text tokens after they attended to the
  image regions), masked by the text's attention mask, before masked mean pooling. S = T.
- ``concat``, ``gmu``, ``weighted_sum`` (pooled strategies): the two-element modality sequence
  ``[image, text]`` of the modalities' H-dim projections, so each modality is contextualised by
  the other before the strategy combines them. S = 2, no padding.
- ``late``: each modality's *own* sequence (image regions, S = R; text tokens, S = T, masked),
  with one stage per modality, so the two modalities still only meet in the averaged logits.

Contract: outputs at valid positions never depend on padding positions (values or count);
outputs at padding positions are unspecified and must be masked by the caller. Both stages are
residual, so an untrained stage perturbs rather than replaces its input.
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoders.bilstm import reverse_within_length
from model.fusion.base import FeedForward, MultiHeadAttention, modality_mask
from model.registry import Registry


class SequenceStage(nn.Module):
    name: str = "none"

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


SEQUENCE_STAGES: Registry = Registry("sequence stage")


class IdentityStage(SequenceStage):
    name = "none"

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x


class BiLSTMStage(SequenceStage):
    """Two LSTMs; the backward one reads each sequence reversed *within its own length*.

    A stock bidirectional LSTM would start its backward pass on the padding, making a text's
    output depend on its batch neighbours; reversing within length keeps it padding-invariant and
    exports to ONNX as a gather (the same trick as the BiLSTM text encoder).
    """

    name = "bilstm"

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.fwd = nn.LSTM(dim, dim, batch_first=True)
        self.bwd = nn.LSTM(dim, dim, batch_first=True)
        self.proj = nn.Linear(2 * dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(torch.long)  # reverse_within_length builds gather indices from the lengths
        f, _ = self.fwd(x)
        b, _ = self.bwd(reverse_within_length(x, mask))
        both = torch.cat([f, reverse_within_length(b, mask)], dim=-1)
        return self.norm(x + self.dropout(self.proj(both)))


class TransformerStage(SequenceStage):
    """One pre-LayerNorm self-attention + feed-forward block; padding keys are masked out."""

    name = "transformer"

    def __init__(self, dim: int, dropout: float = 0.1, num_heads: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.attn(h, h, mask))
        return x + self.dropout(self.ffn(self.norm2(x)))


@SEQUENCE_STAGES.register("none")
def build_none(dim: int, dropout: float = 0.1, num_heads: int = 4) -> SequenceStage:
    return IdentityStage()


@SEQUENCE_STAGES.register("bilstm")
def build_bilstm(dim: int, dropout: float = 0.1, num_heads: int = 4) -> SequenceStage:
    return BiLSTMStage(dim, dropout)


@SEQUENCE_STAGES.register("transformer")
def build_transformer(dim: int, dropout: float = 0.1, num_heads: int = 4) -> SequenceStage:
    return TransformerStage(dim, dropout, num_heads)


def build_sequence_stage(name: str, dim: int, dropout: float = 0.1, num_heads: int = 4) -> SequenceStage:
    """The stage called ``name`` (KeyError listing the valid names otherwise)."""
    return SEQUENCE_STAGES.get(name)(dim, dropout, num_heads)


def modality_pair(image: torch.Tensor, text: torch.Tensor, stage: SequenceStage) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``stage`` over the two-element sequence [image, text] ([B, H] each) and split it back.

    With the identity stage this is a no-op, so pooled strategies pay nothing for ``none``.
    """
    if isinstance(stage, IdentityStage):
        return image, text
    pair = torch.stack([image, text], dim=1)  # [B, 2, H]
    out = stage(pair, modality_mask(pair))
    return out[:, 0], out[:, 1]

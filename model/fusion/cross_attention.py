"""Cross-attention: every text token attends over the image regions, then the tokens are pooled.

Per layer (pre-LayerNorm): tokens += MHA(tokens -> regions + position); tokens += FFN(tokens).
Region positions are a learned flat table, one vector per region index (the encoder's h x w
grid flattened row-major; the table learns its 2-D layout). The fused token sequence is
mean-pooled over valid text positions and concatenated with projections of both pooled
features (so the global image/text summaries are never lost), then an MLP maps it to H.

Sizing the position table: R is fixed per image encoder and input size, so ``model/build.py``
passes the exact ``num_regions`` (``model.build.count_regions``: one dummy encoder forward).
A table made at build time is an ordinary parameter: it lives in the state dict and traces into
ONNX as a plain slice, which a lazily-created one would not. Without ``num_regions`` the table holds
``DEFAULT_MAX_REGIONS`` and the first ``R`` rows are used.

Padding: text tokens are queries only (they never serve as keys), and each query row is
computed independently, so a text's output cannot depend on its batch's padding; padded rows
are dropped by the masked mean.

Sequence stage: over the fused text-token sequence [B, T, H] (masked by the text mask), after
the cross-attention layers and before pooling (see ``model/fusion/sequence.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoders.base import masked_mean
from model.fusion.base import FUSIONS, FeedForward, Fusion, MultiHeadAttention
from model.fusion.sequence import build_sequence_stage

DEFAULT_MAX_REGIONS = 256


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.dropout(self.attn(self.norm_q(tokens), self.norm_kv(regions)))
        return tokens + self.dropout(self.ffn(self.norm_ffn(tokens)))


class CrossAttentionFusion(Fusion):
    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1,
        num_regions: int | None = None, sequence_stage: str = "none", num_heads: int = 4, num_layers: int = 1,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"cross_attention needs num_layers >= 1, got {num_layers}")
        if num_regions is not None and num_regions < 1:
            raise ValueError(f"num_regions must be positive, got {num_regions}")
        self.out_dim = hidden_dim
        self.sequence_stage = sequence_stage
        self.text_in = nn.Linear(text_dim, hidden_dim)
        self.region_in = nn.Linear(image_dim, hidden_dim)
        self.region_pos = nn.Parameter(torch.zeros(1, num_regions or DEFAULT_MAX_REGIONS, hidden_dim))
        nn.init.trunc_normal_(self.region_pos, std=0.02)
        self.layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.stage = build_sequence_stage(sequence_stage, hidden_dim, dropout, num_heads)
        self.norm = nn.LayerNorm(hidden_dim)
        self.image_pooled_in = nn.Linear(image_dim, hidden_dim)
        self.text_pooled_in = nn.Linear(text_dim, hidden_dim)
        self.out = nn.Sequential(nn.Linear(3 * hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))

    def fused_tokens(self, image_regions: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
                     ) -> torch.Tensor:
        """[B, T, H]: each text token after attending to the regions (and the sequence stage)."""
        num_regions = image_regions.shape[1]
        if not torch.jit.is_tracing() and num_regions > self.region_pos.shape[1]:
            raise ValueError(
                f"cross_attention got {num_regions} image regions but its position table holds "
                f"{self.region_pos.shape[1]}; build it with num_regions={num_regions}"
            )
        regions = self.region_in(image_regions) + self.region_pos[:, :num_regions]
        tokens = self.text_in(text_tokens)
        for layer in self.layers:
            tokens = layer(tokens, regions)
        return self.stage(tokens, text_mask)

    def forward(self, image_pooled, image_regions, text_pooled, text_tokens, text_mask) -> torch.Tensor:  # type: ignore[override]
        pooled = masked_mean(self.norm(self.fused_tokens(image_regions, text_tokens, text_mask)), text_mask)
        return self.out(torch.cat([pooled, self.image_pooled_in(image_pooled), self.text_pooled_in(text_pooled)], -1))


@FUSIONS.register("cross_attention")
def build_cross_attention(
    image_dim: int, text_dim: int, hidden_dim: int = 256, dropout: float = 0.1, *,
    num_classes: int | None = None, num_regions: int | None = None, sequence_stage: str = "none",
    num_heads: int = 4, num_layers: int = 1,
) -> Fusion:
    """``num_regions``: the image encoder's R (see the module docstring); ``num_classes`` is unused."""
    return CrossAttentionFusion(image_dim, text_dim, hidden_dim, dropout, num_regions, sequence_stage, num_heads,
                                num_layers)

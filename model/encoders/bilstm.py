"""Word embeddings + BiLSTM from scratch: the light text encoder.

Padding-invariant on purpose: the server pads each dynamic batch to its longest text, so a
plain BiLSTM's backward pass (which would read the padding first) would make a text's features
depend on its batch neighbours. We reverse each sequence within its own length instead, which
exports to ONNX as a gather and keeps ONNX/PyTorch parity exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from model.data.vocab import build_word_tokenizer
from model.encoders.base import TEXT_ENCODERS, EncoderSpec, TextEncoder, masked_mean


def reverse_within_length(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse positions [0, len) of each row and leave padding in place (an involution)."""
    seq = x.shape[1]
    lengths = mask.sum(1, keepdim=True)  # [B, 1]
    pos = torch.arange(seq, device=x.device).unsqueeze(0)  # [1, T]
    idx = torch.where(pos < lengths, lengths - 1 - pos, pos)  # [B, T]
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class BiLSTMText(TextEncoder):
    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden: int = 64, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.fwd = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.bwd = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.out_dim = 2 * hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(input_ids)
        f, _ = self.fwd(emb)
        b, _ = self.bwd(reverse_within_length(emb, attention_mask))
        tokens = torch.cat([f, reverse_within_length(b, attention_mask)], dim=-1)
        return masked_mean(tokens, attention_mask), tokens


@TEXT_ENCODERS.register("bilstm")
def build_bilstm(
    tokenizer_file: Path, max_length: int = 32, texts: list[str] | None = None, **kwargs: int
) -> tuple[TextEncoder, EncoderSpec]:
    """Builds the word vocabulary from ``texts`` the first time (training), reuses it after."""
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        if texts is None:
            raise ValueError(f"{tokenizer_file} is missing and no texts were given to build the vocabulary from")
        build_word_tokenizer(texts, tokenizer_file)
    vocab_size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    return BiLSTMText(vocab_size, **kwargs), EncoderSpec(tokenizer_file=str(tokenizer_file), max_length=max_length)

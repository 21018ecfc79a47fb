"""Disk cache of frozen-encoder outputs, so training a frozen-backbone model only runs fusion + heads.

A frozen pretrained encoder gives the same features for the same input in every epoch and
every run. Computing them once per distinct image / distinct text (EfficientNet-Lite0 in eager
PyTorch is ~45 images/s on two cores) and reading them back afterwards turns a
multi-minute epoch into a sub-second one, and a second training run into no encoder work at all.

Keys are sha256 digests of everything that determines an output:
* the encoder's identity: its registry name, its build kwargs and a digest of its actual weights
  (the state dict's bytes; this subsumes the weights file's identity and also catches a
  fine-tuned checkpoint being mistaken for the pretrained one);
* for images, the preprocessing parameters and the file's resolved path, size and mtime;
* for texts, the tokenizer file's digest, ``max_length`` and the text itself.

Each entry is one ``.npy`` array: row 0 is the pooled vector, rows 1.. the regions/tokens (for a
text only its real tokens, so no padding is stored). Writes go through a temporary file and an
atomic rename, so an interrupted run never leaves a truncated entry behind.

Exported graphs never read this cache: export rebuilds the full encoders from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from app.bundle.manifest import ImagePreprocessing
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer

CACHE_FORMAT = 1
"""Bump when the entry layout changes: old entries then simply stop matching."""

_DEFAULT = object()
"""Marker for 'the config does not mention a cache folder'."""


def is_frozen(encoder: nn.Module) -> bool:
    """An encoder is frozen when it says so, or when it has parameters and none of them trains."""
    if bool(getattr(encoder, "frozen", False)):
        return True
    params = list(encoder.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_identity(name: str, encoder: nn.Module, kwargs: dict[str, object] | None = None) -> str:
    """Registry name + build kwargs (minus ``freeze``, which does not change outputs) + weight bytes."""
    h = hashlib.sha256()
    settings = {k: v for k, v in (kwargs or {}).items() if k != "freeze"}
    header = [CACHE_FORMAT, name, type(encoder).__qualname__, settings]
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, tensor in encoder.state_dict().items():
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{key}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def image_key(identity: str, pre: ImagePreprocessing, path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return _digest("image", identity, pre.model_dump_json(), str(path), str(st.st_size), str(st.st_mtime_ns))


def text_key(identity: str, tokenizer_sha256: str, max_length: int, text: str) -> str:
    return _digest("text", identity, tokenizer_sha256, str(max_length), text)


class FeatureCache:
    """A folder of ``<key[:2]>/<key>.npy`` entries; ``root=None`` keeps nothing on disk."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        if self.root is None:
            self.misses += 1
            return None
        path = self._path(key)
        try:
            arr = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            # A missing or unreadable entry (e.g. from a crashed writer) is a miss, recomputed and rewritten.
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, value: np.ndarray) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.ascontiguousarray(value, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)


@dataclass
class ImageFeatures:
    """Every image's frozen-encoder output, in the order of the paths asked for."""

    pooled: torch.Tensor  # [N, D]
    regions: torch.Tensor  # [N, R, D]

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pooled[idx], self.regions[idx]


@dataclass
class TextFeatures:
    """Every distinct text's frozen-encoder output; ``lookup`` pads a batch like the tokenizer does."""

    index: dict[str, int]
    pooled: torch.Tensor  # [N, D]
    tokens: torch.Tensor  # [N, T_max, D], zero beyond each text's length
    lengths: torch.Tensor  # [N]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (pooled [B, D], tokens [B, T, D], attention_mask [B, T]) with T the batch's longest text."""
        idx = torch.tensor([self.index[t] for t in texts], dtype=torch.long)
        lengths = self.lengths[idx]
        longest = int(lengths.max()) if len(idx) else 1
        mask = (torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return self.pooled[idx], self.tokens[idx, :longest], mask


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def image_features(
    encoder: nn.Module,
    identity: str,
    paths: list[Path],
    pre: ImagePreprocessing,
    cache: FeatureCache,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> ImageFeatures:
    """Read what the cache has, run the encoder (eval mode) on the rest, store it, return all."""
    keys = [image_key(identity, pre, p) for p in paths]
    found, todo = _lookup(cache, keys)
    if not paths:
        raise ValueError("no images to encode")
    was_training = encoder.training
    encoder.eval()
    if todo:
        # Channels-last runs EfficientNet-Lite0 ~2.3x faster in eager PyTorch on this CPU (30 -> 70 images/s).
        encoder.to(memory_format=torch.channels_last)
    try:
        for chunk in tqdm(_batches(len(todo), batch_size), desc="image features", disable=not progress or not todo,
                          leave=False):
            ids = [todo[j] for j in chunk]
            pix = torch.from_numpy(np.stack([_load(paths[i], pre) for i in ids]))
            pooled, regions = encoder(pix.contiguous(memory_format=torch.channels_last))
            for row, i in enumerate(ids):
                arr = torch.cat([pooled[row : row + 1], regions[row]], 0).numpy()
                cache.put(keys[i], arr)
                found[i] = arr
    finally:
        if todo:
            encoder.to(memory_format=torch.contiguous_format)
        encoder.train(was_training)
    stacked = torch.from_numpy(np.stack([found[i] for i in range(len(paths))]))
    return ImageFeatures(stacked[:, 0].contiguous(), stacked[:, 1:].contiguous())


def _lookup(cache: FeatureCache, keys: list[str]) -> tuple[dict[int, np.ndarray], list[int]]:
    """(position -> cached features, positions still to encode) for ``keys``."""
    found: dict[int, np.ndarray] = {}
    todo: list[int] = []
    for i, k in enumerate(keys):
        arr = cache.get(k)
        if arr is None:
            todo.append(i)
        else:
            found[i] = arr
    return found, todo


def _load(path: Path, pre: ImagePreprocessing) -> np.ndarray:
    with Image.open(path) as img:
        return preprocess_pil(img, pre)


@torch.no_grad()
def text_features(
    encoder: nn.Module,
    identity: str,
    tokenizer: TextTokenizer,
    tokenizer_sha256: str,
    texts: list[str],
    cache: FeatureCache,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> TextFeatures:
    """Features of every distinct text; misses are encoded in length-sorted batches (little padding)."""
    distinct = list(dict.fromkeys(texts))
    keys = [text_key(identity, tokenizer_sha256, tokenizer.max_length, t) for t in distinct]
    found, todo = _lookup(cache, keys)
    if not distinct:
        raise ValueError("no texts to encode")
    todo.sort(key=lambda i: len(tokenizer.token_ids(distinct[i])))
    was_training = encoder.training
    encoder.eval()
    try:
        for chunk in tqdm(_batches(len(todo), batch_size), desc="text features", disable=not progress or not todo,
                          leave=False):
            ids = [todo[j] for j in chunk]
            enc = tokenizer.encode([distinct[i] for i in ids])
            pooled, tokens = encoder(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            for row, i in enumerate(ids):
                n = int(enc.attention_mask[row].sum())
                arr = torch.cat([pooled[row : row + 1], tokens[row, :n]], 0).numpy()
                cache.put(keys[i], arr)
                found[i] = arr
    finally:
        encoder.train(was_training)
    lengths = torch.tensor([found[i].shape[0] - 1 for i in range(len(distinct))], dtype=torch.long)
    dim = found[0].shape[1]
    tokens_t = torch.zeros(len(distinct), int(lengths.max()), dim)
    for i in range(len(distinct)):
        tokens_t[i, : lengths[i]] = torch.from_numpy(found[i][1:])
    pooled_t = torch.from_numpy(np.stack([found[i][0] for i in range(len(distinct))]))
    return TextFeatures({t: i for i, t in enumerate(distinct)}, pooled_t, tokens_t, lengths)


def resolve_cache_dir(run_dir: Path, setting: object) -> Path | None:
    """``encoder_kwargs["feature_cache_dir"]``: absent -> ``<run_dir>/../.feature-cache``; "" / None -> memory only."""
    if setting is _DEFAULT:
        return Path(run_dir).resolve().parent / ".feature-cache"
    if setting in (None, "", False):
        return None
    return Path(str(setting))


def cache_dir_for(run_dir: Path, encoder_kwargs: dict[str, object]) -> Path | None:
    return resolve_cache_dir(run_dir, encoder_kwargs.get("feature_cache_dir", _DEFAULT))


EncodeImages = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
EncodeTexts = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

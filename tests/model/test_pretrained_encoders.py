"""The pretrained encoders load every weight, behave like the published models, and are cached when frozen."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.bundle.manifest import ImagePreprocessing
from app.preprocessing.image import preprocess_pil
from app.preprocessing.text import TextTokenizer
from model.config import TrainConfig
from model.encoders.efficientnet_lite import (
    EfficientNetLite0,
    PretrainedWeightsError,
    build_efficientnet_lite0,
    load_backbone,
    weights_file,
)
from model.encoders.minilm import IGNORED_KEYS, MiniLM, build_minilm, load_minibert, model_dir
from model.feature_cache import FeatureCache, encoder_identity, image_key, text_key

# ImageNet-1k class ids (the standard ILSVRC-2012 index order used by every torchvision/timm/TF
# classifier; e.g. timm's imagenet_synsets / "imagenet1000_clsidx_to_labels"):
IMAGENET_DOMESTIC_CATS = {281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
                          285: "Egyptian cat"}
IMAGENET_COFFEE = {504: "coffee mug", 967: "espresso", 968: "cup"}


@pytest.fixture(scope="module")
def effnet() -> tuple[EfficientNetLite0, ImagePreprocessing]:
    encoder, spec = build_efficientnet_lite0()
    pre = ImagePreprocessing(size=spec.image_size, resize_size=spec.resize_size, resize=spec.resize,  # type: ignore[arg-type]
                             mean=spec.mean, std=spec.std)
    return encoder, pre  # type: ignore[return-value]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[MiniLM, TextTokenizer]:
    tok_file = tmp_path_factory.mktemp("minilm") / "tokenizer.json"
    encoder, spec = build_minilm(tok_file, max_length=64)
    return encoder, TextTokenizer(spec.tokenizer_file, spec.max_length)  # type: ignore[return-value]


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_weights_file_fills_every_parameter_and_buffer() -> None:
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    net = load_backbone()
    assert set(state) == set(net.state_dict())
    assert len(state) == 296
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_efficientnet_lite0_refuses_a_weights_file_with_a_missing_key(tmp_path: Path) -> None:
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    del state["_conv_head.weight"]
    state["_extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(PretrainedWeightsError, match=r"_conv_head\.weight.*_extra\.weight"):
        load_backbone(broken)


@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", IMAGENET_DOMESTIC_CATS), ("coffee", IMAGENET_COFFEE)],
    ids=["chelsea-is-a-cat", "coffee-is-an-espresso-or-cup"],
)
def test_efficientnet_lite0_recognises_real_photos_with_its_imagenet_classifier(
    photo: str, expected: dict[int, str], effnet: tuple[EfficientNetLite0, ImagePreprocessing]
) -> None:
    """Pooled features through the pretrained ``_fc`` give the right ImageNet class: weights,
    padding and preprocessing (bicubic 256 -> centre 224, mean = std = 0.5) all fit together."""
    from skimage import data

    encoder, pre = effnet
    x = torch.from_numpy(preprocess_pil(Image.fromarray(getattr(data, photo)()), pre))[None]
    with torch.no_grad():
        pooled, _ = encoder(x)
        probs = encoder.net._fc(pooled).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in expected, f"top-5 {top5} for {photo}"
    others = IMAGENET_COFFEE if expected is IMAGENET_DOMESTIC_CATS else IMAGENET_DOMESTIC_CATS
    assert not set(top5) & set(others)
    assert float(probs[top5[0]]) > 0.3


def test_efficientnet_lite0_gives_pooled_features_and_a_7x7_region_grid(
    effnet: tuple[EfficientNetLite0, ImagePreprocessing],
) -> None:
    encoder, _ = effnet
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, regions = encoder(x)
        library_logits = encoder.net(x)  # the package's own avg-pool + classifier path
    assert pooled.shape == (2, 1280) and regions.shape == (2, 49, 1280)
    torch.testing.assert_close(pooled, regions.mean(1))
    torch.testing.assert_close(encoder.net._fc(pooled), library_logits, atol=1e-5, rtol=1e-5)


def test_efficientnet_lite0_refuses_sizes_its_fixed_padding_was_not_built_for() -> None:
    with pytest.raises(ValueError, match="224"):
        build_efficientnet_lite0(image_size=256)


def test_efficientnet_lite0_has_no_swish_the_exporter_could_not_trace(
    effnet: tuple[EfficientNetLite0, ImagePreprocessing],
) -> None:
    kinds = {type(m).__name__ for m in effnet[0].modules()}
    assert "ReLU6" in kinds
    assert not kinds & {"Swish", "MemoryEfficientSwish"}


def test_frozen_encoders_have_no_trainable_parameters_and_stay_in_eval_mode(
    effnet: tuple[EfficientNetLite0, ImagePreprocessing], minilm: tuple[MiniLM, TextTokenizer]
) -> None:
    for encoder in (effnet[0], minilm[0]):
        assert encoder.frozen
        assert not any(p.requires_grad for p in encoder.parameters())
        encoder.train()
        assert not any(m.training for m in encoder.modules())
    trainable, _ = build_efficientnet_lite0(freeze=False)
    trainable.train()
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.net._bn0.training


# ---------------------------------------------------------------- MiniLM


def test_minilm_weights_file_is_fully_accounted_for() -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir() / "model.safetensors"), "pt") as fh:
        file_keys = set(fh.keys())
    model_keys = set(load_minibert().state_dict())
    assert file_keys >= IGNORED_KEYS, "an ignored key no longer exists: the ignore list is stale"
    assert file_keys - IGNORED_KEYS == model_keys


def test_minilm_matches_sentence_transformers_reference(minilm: tuple[MiniLM, TextTokenizer]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "what color is the circle?",
             "a small blue circle at the top left, a small yellow square on the right and a small red triangle "
             "at the bottom left on a white background", "x"]
    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    encoder, tok = minilm
    enc = tok.encode(texts)
    with torch.no_grad():
        pooled, tokens = encoder(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    assert tokens.shape == (4, enc.input_ids.shape[1], 384)
    norms = pooled.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(4), atol=1e-2), "pooled features must not be normalised inside"
    ours = (pooled / norms[:, None]).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_minilm_scores_paraphrases_above_unrelated_sentences(minilm: tuple[MiniLM, TextTokenizer]) -> None:
    encoder, tok = minilm
    texts = ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply today.",
             "a red circle on a white background", "a white background with a red round shape",
             "how many goals did the team score?"]
    enc = tok.encode(texts)
    with torch.no_grad():
        pooled, _ = encoder(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
    e = torch.nn.functional.normalize(pooled, dim=-1)
    sim = e @ e.t()
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > sim[3, 5] + 0.3


def test_minilm_features_do_not_depend_on_batch_padding(minilm: tuple[MiniLM, TextTokenizer]) -> None:
    encoder, tok = minilm
    alone = tok.encode(["what color is the circle?"])
    padded = tok.encode(["what color is the circle?", "is there a small blue square at the bottom left of the image?"])
    with torch.no_grad():
        p1, t1 = encoder(torch.from_numpy(alone.input_ids), torch.from_numpy(alone.attention_mask))
        p2, t2 = encoder(torch.from_numpy(padded.input_ids), torch.from_numpy(padded.attention_mask))
    n = alone.input_ids.shape[1]
    assert padded.input_ids.shape[1] > n
    torch.testing.assert_close(p1[0], p2[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t1[0], t2[0, :n], atol=1e-5, rtol=1e-5)


def test_minilm_builder_copies_its_tokenizer_and_never_touches_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    target = tmp_path / "run" / "tokenizer.json"
    _, spec = build_minilm(target, max_length=48)
    assert target.read_bytes() == (model_dir() / "tokenizer.json").read_bytes()
    assert (spec.tokenizer_file, spec.max_length) == (str(target), 48)
    with pytest.raises(ValueError, match="512"):
        build_minilm(target, max_length=1000)


# ---------------------------------------------------------------- feature cache


def test_cache_keys_change_with_weights_image_file_and_text_settings(
    tmp_path: Path, effnet: tuple[EfficientNetLite0, ImagePreprocessing]
) -> None:
    encoder, pre = effnet
    identity = encoder_identity("efficientnet_lite0", encoder, {"freeze": True})
    assert identity == encoder_identity("efficientnet_lite0", encoder, {"freeze": False}), "freeze is not an output"
    changed, _ = build_efficientnet_lite0()
    with torch.no_grad():
        changed.net._conv_stem.weight[0, 0, 0, 0] += 1e-3
    assert encoder_identity("efficientnet_lite0", changed, {}) != identity

    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(img)
    before = image_key(identity, pre, img)
    assert image_key(identity, pre, img) == before
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert image_key(identity, pre, img) != before
    assert image_key(identity, pre.model_copy(update={"resize": "bilinear"}), img) != image_key(identity, pre, img)

    base = text_key(identity, "0" * 64, 64, "what color is the circle?")
    assert base != text_key(identity, "0" * 64, 32, "what color is the circle?")
    assert base != text_key(identity, "1" * 64, 64, "what color is the circle?")
    assert base != text_key(identity, "0" * 64, 64, "what color is the square?")


def test_a_corrupt_cache_entry_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.put("ab" + "0" * 62, np.ones((3, 4), dtype=np.float32))
    np.testing.assert_array_equal(cache.get("ab" + "0" * 62), np.ones((3, 4)))
    (tmp_path / "ab" / ("ab" + "0" * 62 + ".npy")).write_bytes(b"not an array")
    assert cache.get("ab" + "0" * 62) is None
    assert (cache.hits, cache.misses) == (1, 1)


def _pretrained_config(root: Path, name: str, cache: Path) -> TrainConfig:
    return TrainConfig(
        data="demo", demo_dir=str(root / "demo"), demo_images=24, demo_image_size=224, run_dir=str(root / name),
        name="pretrained-test", image_encoder="efficientnet_lite0", text_encoder="minilm", fusion="cross_attention",
        max_length=64, epochs=1, batch_size=16, hidden_dim=32, embed_dim=16, seed=0, num_threads=2,
        encoder_kwargs={"feature_cache_dir": str(cache), "contrastive": {"region_queries": 2, "pool_dim": 32,
                                                                           "pool_heads": 2}},
    )


def test_frozen_encoders_run_once_per_item_then_training_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second run: no encoder forward at all; cached and live evaluation agree; checkpoints are small."""
    from model.train import evaluate_run, load_trainable_state, train

    calls = {"image": 0, "text": 0}
    image_forward, text_forward = EfficientNetLite0.forward, MiniLM.forward

    def count_image(self: EfficientNetLite0, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["image"] += len(pixel_values)
        return image_forward(self, pixel_values)

    def count_text(self: MiniLM, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["text"] += len(ids)
        return text_forward(self, ids, mask)

    monkeypatch.setattr(EfficientNetLite0, "forward", count_image)
    monkeypatch.setattr(MiniLM, "forward", count_text)
    cache = tmp_path / "cache"
    first = train(_pretrained_config(tmp_path, "run1", cache), progress=False)
    meta = json.loads((tmp_path / "demo" / "demo.json").read_text())
    n_texts = len({json.loads(line)["text"] for f in ("qa.jsonl", "captions.jsonl")
                   for line in (tmp_path / "demo" / f).read_text().splitlines()})
    assert calls == {"image": meta["counts"]["images"], "text": n_texts}, "each distinct item encoded exactly once"
    assert len(list(cache.rglob("*.npy"))) == meta["counts"]["images"] + n_texts

    calls.update(image=0, text=0)
    second = train(_pretrained_config(tmp_path, "run2", cache), progress=False)
    assert calls == {"image": 0, "text": 0}
    cached = evaluate_run(second, "test")
    assert calls == {"image": 0, "text": 0}
    live = evaluate_run(second, "test", use_cache=False)
    assert calls["image"] > 0 and calls["text"] > 0
    assert cached.keys() == live.keys()
    for key in cached:
        assert cached[key] == pytest.approx(live[key], abs=1e-6), key
    first_metrics = [json.loads(line) for line in (Path(first) / "results.jsonl").read_text().splitlines()]
    second_metrics = [json.loads(line) for line in (Path(second) / "results.jsonl").read_text().splitlines()]
    assert first_metrics[0]["val_accuracy"] == second_metrics[0]["val_accuracy"], "same seed, same features"

    ckpt = torch.load(Path(second) / "best.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in ckpt["state_dict"])
    assert set(ckpt["frozen_encoders"]) == {"image_encoder", "text_encoder"}
    assert (Path(second) / "best.pt").stat().st_size < 10 * 2**20

    from model.train import load_built

    built, cfg, _ = load_built(second)
    tampered = dict(ckpt, frozen_encoders={**ckpt["frozen_encoders"], "text_encoder": "f" * 64})
    with pytest.raises(RuntimeError, match="frozen text_encoder"):
        load_trainable_state(built, cfg, tampered)
    assert dataclasses.replace(cfg).image_encoder == "efficientnet_lite0"

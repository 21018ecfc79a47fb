"""The text-encoder LRU cache: keyed by token ids (padding excluded), bounded, thread-safe,
counted in Prometheus, and a cached row gives exactly what the encoder gave."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.core.config import Settings
from app.inference.pipeline import ModelPipeline
from app.inference.text_cache import TextCache

TEXTS = ["what color is the circle?", "how many shapes are there?", "is it large?"]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def value(i: int) -> dict[str, np.ndarray]:
    return {"v": np.full(3, i, dtype=np.float32)}


def test_least_recently_used_entry_is_evicted_first() -> None:
    cache = TextCache(2)
    cache.put(b"a", value(1))
    cache.put(b"b", value(2))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", value(3))
    assert cache.get(b"b") is None
    assert cache.get(b"a")["v"][0] == 1 and cache.get(b"c")["v"][0] == 3
    assert len(cache) == 2


def test_size_zero_disables_the_cache() -> None:
    cache = TextCache(0)
    stored = cache.put(b"a", value(1))
    assert stored["v"][0] == 1
    assert cache.get(b"a") is None and len(cache) == 0
    with pytest.raises(ValueError):
        TextCache(-1)


def test_cached_values_are_read_only_copies() -> None:
    cache = TextCache(4)
    original = value(5)
    cache.put(b"k", original)
    original["v"][:] = 0  # the caller's array changes afterwards: the cache does not
    got = cache.get(b"k")
    assert got["v"].tolist() == [5, 5, 5]
    with pytest.raises(ValueError):
        got["v"][0] = 1


def test_key_is_the_ids_up_to_the_row_length_whatever_the_padding() -> None:
    short = np.array([101, 7, 8, 102, 0, 0, 0], dtype=np.int64)
    long = np.array([101, 7, 8, 102, 0], dtype=np.int32)
    assert TextCache.key(short, 4) == TextCache.key(long, 4)
    assert TextCache.key(short, 4) != TextCache.key(short, 5)


def test_hits_and_misses_are_counted() -> None:
    hits, misses = sample("mmfusion_text_cache_total", {"result": "hit"}), sample(
        "mmfusion_text_cache_total", {"result": "miss"})
    cache = TextCache(4)
    cache.get(b"x")
    cache.put(b"x", value(1))
    cache.get(b"x")
    cache.get(b"x")
    assert (cache.hits, cache.misses) == (2, 1)
    assert sample("mmfusion_text_cache_total", {"result": "hit"}) == hits + 2
    assert sample("mmfusion_text_cache_total", {"result": "miss"}) == misses + 1


def test_concurrent_use_stays_bounded_and_consistent() -> None:
    cache = TextCache(16)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(2000):
                k = int(rng.integers(0, 64))
                key = k.to_bytes(2, "little")
                got = cache.get(key)
                if got is None:
                    cache.put(key, value(k))
                else:
                    assert got["v"][0] == k
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) == 16
    assert cache.hits + cache.misses == 8000


# --------------------------------------------------------------------------------------------------
# In the pipeline (tiny bundle)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tiny_bundle) -> tuple[ModelPipeline, ModelPipeline]:
    cached = ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, intra_op_threads=1, text_cache_size=64))
    uncached = ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, intra_op_threads=1, text_cache_size=0))
    return cached, uncached


def test_cached_rows_equal_uncached_rows(pipelines) -> None:
    cached, uncached = pipelines
    cached.text_cache.clear()
    first = cached.encode_text_rows(TEXTS)
    misses = cached.text_cache.misses
    # Again, in another order and with other texts around: every original text is now a hit.
    again = cached.encode_text_rows(["a completely different and much longer question text", *reversed(TEXTS)])
    assert cached.text_cache.misses == misses + 1
    plain = uncached.encode_text_rows(TEXTS)
    for i, row in enumerate(reversed(again[1:])):
        assert row.length == first[i].length == plain[i].length
        for name in row.outputs:
            np.testing.assert_array_equal(row.outputs[name], first[i].outputs[name])
            np.testing.assert_allclose(row.outputs[name], plain[i].outputs[name], atol=1e-5, rtol=0)


def test_cache_makes_no_difference_to_classify_or_embeddings(pipelines, tiny_config) -> None:
    from app.preprocessing.image import decode_image
    from tests.helpers.images import demo_png

    cached, uncached = pipelines
    cached.text_cache.clear()
    pixels = np.stack([decode_image(demo_png(tiny_config.demo_dir, i), cached.manifest.image, max_pixels=10**8)
                       for i in range(3)])
    texts = [TEXTS[0], TEXTS[1], TEXTS[0]]  # a repeat inside one batch is run once
    before = cached.text_cache.misses
    cold, _ = cached.classify(pixels, texts)
    assert cached.text_cache.misses == before + 2
    warm, _ = cached.classify(pixels, texts)
    plain, _ = uncached.classify(pixels, texts)
    np.testing.assert_array_equal(warm, cold)
    np.testing.assert_allclose(warm, plain, atol=1e-5, rtol=0)
    emb_cached, _ = cached.embed_texts(TEXTS)
    emb_plain, _ = uncached.embed_texts(TEXTS)
    np.testing.assert_allclose(emb_cached, emb_plain, atol=1e-5, rtol=0)


def test_the_cache_is_bounded_by_its_setting(tiny_bundle) -> None:
    pipe = ModelPipeline(tiny_bundle, Settings(bundle=tiny_bundle, intra_op_threads=1, text_cache_size=2))
    pipe.encode_text_rows(TEXTS)
    assert len(pipe.text_cache) == 2
    assert pipe.text_cache.misses == 3

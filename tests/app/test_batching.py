"""Dynamic batching: Triton's batch rule, the bounded queue (503 + Retry-After), cancellation,
draining on shutdown, and that merging requests with different text lengths changes no result."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.core.config import Settings
from app.core.errors import NotReadyError, OverloadedError
from app.inference.batched import BatchedPipeline
from app.inference.batcher import BatchingConfig, GraphBatcher
from app.inference.pipeline import ModelPipeline
from app.inference.runtime import SHRINK_AFTER_ROWS
from app.main import create_app
from tests.helpers.images import demo_png

SHORT = "red"
MEDIUM = "what color is the circle?"
LONG = "is there a large purple triangle next to a small green square on the left of the picture or not"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Recorder:
    """A fake graph: records the payloads of every batch; the first batch can be held open."""

    def __init__(self, hold_first: bool = False, fail_on: object = None):
        self.batches: list[list[object]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, payloads: Sequence[object]) -> list[object]:
        self.batches.append(list(payloads))
        self.started.set()
        assert self.release.wait(10), "test never released the held batch"
        if self.fail_on in payloads:
            raise RuntimeError("graph failed")
        return [f"done:{p}" for p in payloads]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def make(recorder: Recorder, name: str = "unit", **config: float) -> GraphBatcher:
    return GraphBatcher(name, recorder, BatchingConfig(**config))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The batch rule
# --------------------------------------------------------------------------------------------------


def test_requests_queued_while_the_graph_is_busy_go_in_batches_of_at_most_max_batch_size() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=16)

    async def main() -> list[object]:
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.to_thread(rec.started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcde"]
        await wait_until(lambda: batcher.depth == 4)
        rec.release.set()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert results == ["done:a", "done:b", "done:c", "done:d", "done:e"]
    assert rec.batches == [["a"], ["b", "c"], ["d", "e"]]


def test_a_request_with_many_rows_is_never_split_and_larger_than_max_runs_alone() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=16)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit("hold"))
        await asyncio.to_thread(rec.started.wait, 5)
        others = [asyncio.ensure_future(batcher.submit(p, rows=n)) for p, n in (("x3", 3), ("y2", 2), ("z9", 9))]
        await wait_until(lambda: batcher.depth == 3)
        rec.release.set()
        await asyncio.gather(first, *others)

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert rec.batches == [["hold"], ["x3"], ["y2"], ["z9"]]


def test_with_a_queue_delay_the_oldest_request_waits_for_company_until_its_deadline() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=8, max_queue_delay_s=0.3, max_queue_size=16)

    async def main() -> None:
        a = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.05)  # well inside a's 300 ms window
        b = asyncio.ensure_future(batcher.submit("b"))
        await asyncio.gather(a, b)

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert rec.batches == [["a", "b"]]


def test_a_full_batch_goes_at_once_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=3, max_queue_delay_s=30.0, max_queue_size=16)

    async def main() -> list[object]:
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in "abc")), 5)

    try:
        assert asyncio.run(main()) == ["done:a", "done:b", "done:c"]
    finally:
        batcher.close()
    assert rec.batches == [["a", "b", "c"]]


# --------------------------------------------------------------------------------------------------
# Bounded queue, cancellation, failures, shutdown
# --------------------------------------------------------------------------------------------------


def test_an_inference_thread_that_dies_fails_its_queue_at_once_and_reports_itself(monkeypatch) -> None:
    def broken_take(self: GraphBatcher, instance: int = 0) -> list:  # a bug in the loop, not a graph error
        with self._cond:
            while not self._queue:
                self._cond.wait()
        raise RuntimeError("a bug")

    monkeypatch.setattr(GraphBatcher, "_take_batch", broken_take)
    batcher = make(Recorder(), "dies_unit")

    async def main() -> None:
        with pytest.raises(NotReadyError, match="dies_unit is not running"):
            await asyncio.wait_for(batcher.submit("x"), 5)  # failed now, not at its deadline
        with pytest.raises(NotReadyError, match="needs a restart"):
            await batcher.submit("y")

    try:
        asyncio.run(main())
        assert not batcher.alive and "RuntimeError" in (batcher.failure or "")
        assert batcher.depth == 0
    finally:
        batcher.close()


def test_settings_refuse_infinite_or_absurd_times(monkeypatch) -> None:
    from pydantic import ValidationError

    for name, value in (("MAX_QUEUE_DELAY_MS", "inf"), ("MAX_QUEUE_WAIT_MS", "nan"), ("REQUEST_TIMEOUT_S", "1e9")):
        monkeypatch.setenv(f"MMFUSION_{name}", value)
        with pytest.raises(ValidationError, match=name.lower()):
            Settings()
        monkeypatch.delenv(f"MMFUSION_{name}")


def test_a_thread_that_dies_holding_a_batch_fails_that_batch_at_once(monkeypatch) -> None:
    def broken_run(self: GraphBatcher, batch: list) -> tuple:  # a bug after the batch was taken
        raise RuntimeError("a bug")

    monkeypatch.setattr(GraphBatcher, "_run", broken_run)
    batcher = make(Recorder(), "dies_holding_unit")

    async def main() -> None:
        with pytest.raises(NotReadyError, match="dies_holding_unit is not running"):
            await asyncio.wait_for(batcher.submit("x"), 5)  # taken, then the thread died: failed now

    try:
        asyncio.run(main())
        assert not batcher.alive and batcher.running_batches == 0
    finally:
        batcher.close()


def test_a_batching_config_with_an_infinite_time_is_refused() -> None:
    for bad in ({"max_queue_delay_s": math.inf}, {"max_queue_wait_s": math.nan}, {"idle_s": math.inf}):
        with pytest.raises(ValueError, match="invalid batching config"):
            BatchingConfig(**bad)


def test_livez_and_readyz_fail_when_an_inference_thread_has_died(client) -> None:
    assert client.get("/livez").status_code == 200
    text = client.app.state.service.pipeline.batched.text
    text.failure = "RuntimeError in inference thread 0"
    try:
        live, ready = client.get("/livez"), client.get("/readyz")
        assert live.status_code == 503 and live.json()["error"]["code"] == "not_alive"
        assert "text_encoder" in live.json()["error"]["message"]
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    finally:
        text.failure = None


def test_a_full_queue_refuses_at_once_with_overloaded_and_retry_after() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, "overload_unit", max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
    rejected = sample("mmfusion_rejected_total", {"graph": "overload_unit", "reason": "queue_full"})

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit("running"))
        await asyncio.to_thread(rec.started.wait, 5)
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("q1", "q2")]
        await wait_until(lambda: batcher.depth == 2)
        with pytest.raises(OverloadedError) as info:
            await batcher.submit("refused")
        assert info.value.status_code == 503 and info.value.code == "overloaded"
        assert int(info.value.headers["Retry-After"]) >= 1
        rec.release.set()
        assert await asyncio.gather(running, *queued) == ["done:running", "done:q1", "done:q2"]

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert sample("mmfusion_rejected_total", {"graph": "overload_unit", "reason": "queue_full"}) == rejected + 1
    assert sample("mmfusion_rejected_total", {"graph": "overload_unit", "reason": "queue_wait"}) == 0
    assert "refused" not in [p for b in rec.batches for p in b]


def test_a_queue_holding_more_work_than_the_wait_bound_refuses_before_it_is_full() -> None:
    """MMFUSION_MAX_QUEUE_WAIT_MS: rows ahead x measured time per row, not the count, decides."""
    import time

    gate = threading.Event()

    def graph(payloads: Sequence[object]) -> list[object]:
        for p in payloads:
            if p == "hold":
                assert gate.wait(10)
            else:
                time.sleep(0.2)  # 200 ms per row (long, so that a loaded CI's oversleeping cannot flip a decision)
        return [f"done:{p}" for p in payloads]

    batcher = make(graph, "wait_bound_unit", max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=100,
                   max_queue_wait_s=0.7)
    by_wait = {"graph": "wait_bound_unit", "reason": "queue_wait"}

    async def main() -> None:
        assert await batcher.submit("timed") == "done:timed"  # measures >= 200 ms per row
        held = asyncio.ensure_future(batcher.submit("hold"))
        await wait_until(lambda: batcher.depth == 0)  # taken: the thread is busy with it
        admitted = []
        for i in range(3):  # the running row plus 0, 1 and 2 queued ahead: 0.2, 0.4 and 0.6 s <= 0.7 s
            if i == 2:  # the early check also counts rows still on their way here (images decoding)
                batcher.refuse_if_full()
                with pytest.raises(OverloadedError):
                    batcher.refuse_if_full(extra_rows=1)
            admitted.append(asyncio.ensure_future(batcher.submit(f"q{i}")))
            await wait_until(lambda i=i: batcher.depth == i + 1)
        with pytest.raises(OverloadedError) as info:  # 1 + 3 rows ahead: >= 0.8 s > 0.7 s, with 97 places free
            await batcher.submit("refused")
        assert "MMFUSION_MAX_QUEUE_WAIT_MS" in info.value.message
        # Retry-After is the refusing estimate itself: the queued work's drain time, rounded up (nothing ran
        # since: the held row blocks the thread)
        assert int(info.value.headers["Retry-After"]) == math.ceil(batcher.expected_wait_s()) >= 1
        assert sample("mmfusion_rejected_total", by_wait) == 2  # refuse_if_full(extra_rows=1), then this one
        assert sample("mmfusion_rejected_total", {**by_wait, "reason": "queue_full"}) == 0
        gate.set()
        assert await asyncio.gather(held, *admitted) == ["done:hold", "done:q0", "done:q1", "done:q2"]

    try:
        asyncio.run(main())
    finally:
        gate.set()
        batcher.close()


def test_no_wait_bound_when_it_is_zero_and_never_on_an_empty_queue() -> None:
    import time

    def slow(payloads: Sequence[object]) -> list[object]:
        time.sleep(0.05 * len(payloads))
        return list(payloads)

    unbounded = make(slow, "no_wait_bound_unit", max_batch_size=1, max_queue_wait_s=0.0, max_queue_size=100)
    tight = make(slow, "tight_wait_bound_unit", max_batch_size=1, max_queue_wait_s=0.001, max_queue_size=100)

    async def main() -> None:
        assert await asyncio.gather(*(unbounded.submit(i) for i in range(6))) == list(range(6))
        assert unbounded.expected_wait_s() == 0.0
        for i in range(3):  # one at a time: nothing ahead, so even a 1 ms bound admits each
            assert await tight.submit(i) == i

    try:
        asyncio.run(main())
    finally:
        unbounded.close()
        tight.close()


def test_a_request_cancelled_while_queued_is_dropped_unrun_and_frees_its_slot() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, "cancel_unit", max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=1)
    cancelled = sample("mmfusion_cancelled_total", {"graph": "cancel_unit"})

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit("running"))
        await asyncio.to_thread(rec.started.wait, 5)
        doomed = asyncio.ensure_future(batcher.submit("doomed"))
        await wait_until(lambda: batcher.depth == 1)
        with pytest.raises(OverloadedError):  # the queue (size 1) is full
            await batcher.submit("refused")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert batcher.depth == 0
        later = asyncio.ensure_future(batcher.submit("later"))  # the freed slot takes a new request
        await wait_until(lambda: batcher.depth == 1)
        rec.release.set()
        assert await asyncio.gather(running, later) == ["done:running", "done:later"]

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert rec.batches == [["running"], ["later"]]
    assert sample("mmfusion_cancelled_total", {"graph": "cancel_unit"}) == cancelled + 1
    assert sample("mmfusion_queue_depth", {"stage": "cancel_unit"}) == 0


def test_cancelling_a_request_already_taken_into_a_batch_never_formats_its_payload() -> None:
    """deque.remove of a missing entry formats its repr; with an image payload that cost 10 % of the
    event loop under a 4x storm. A taken entry is known to be out of the queue and is left alone."""

    class Pixels:
        def __repr__(self) -> str:
            raise AssertionError("payload formatted on the event loop")

        def __str__(self) -> str:
            return "pixels"

    rec = Recorder(hold_first=True)
    batcher = make(rec, "taken_cancel_unit", max_batch_size=4)
    cancelled = sample("mmfusion_cancelled_total", {"graph": "taken_cancel_unit"})

    async def main() -> None:
        task = asyncio.ensure_future(batcher.submit(Pixels()))
        await asyncio.to_thread(rec.started.wait, 5)  # taken into the batch that is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rec.release.set()

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert len(rec.batches) == 1 and sample("mmfusion_cancelled_total", {"graph": "taken_cancel_unit"}) == cancelled


def test_a_request_timing_out_in_the_queue_is_not_run() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=4)

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit("running"))
        await asyncio.to_thread(rec.started.wait, 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit("slow"), 0.05)
        rec.release.set()
        await running

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert rec.batches == [["running"]]


def test_a_failing_batch_fails_only_the_request_that_fails_alone_and_the_next_batch_still_runs() -> None:
    rec = Recorder(hold_first=True, fail_on="bad")
    batcher = make(rec, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=8)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.to_thread(rec.started.wait, 5)
        ok, bad = (asyncio.ensure_future(batcher.submit(x)) for x in ("ok", "bad"))
        after = asyncio.ensure_future(batcher.submit("after"))
        await wait_until(lambda: batcher.depth == 3)
        rec.release.set()
        assert await first == "done:first"
        # "ok" was merged with "bad" into one failing call; retried alone, it succeeds.
        assert await ok == "done:ok"
        with pytest.raises(RuntimeError, match="graph failed"):
            await bad
        assert await after == "done:after"
        assert rec.batches[1:4] == [["ok", "bad"], ["ok"], ["bad"]]
        assert sample("mmfusion_batch_retries_total", {"graph": "unit"}) >= 1
        assert batcher._running_rows == 0 and batcher._queued_rows == 0
        assert batcher._row_s > 0

    try:
        asyncio.run(main())
    finally:
        batcher.close()


def test_failed_calls_do_not_shorten_the_measured_time_per_row() -> None:
    # Failures return at once; counting them made the queue's time bound and Retry-After too short.
    rec = Recorder(fail_on="bad")
    batcher = make(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8)

    async def main() -> None:
        assert await batcher.submit("ok") == "done:ok"
        measured = batcher._row_s
        for _ in range(5):
            with pytest.raises(RuntimeError):
                await batcher.submit("bad")
        assert batcher._row_s == measured

    try:
        asyncio.run(main())
    finally:
        batcher.close()


def test_close_runs_everything_already_queued_then_refuses_new_requests() -> None:
    rec = Recorder(hold_first=True)
    batcher = make(rec, max_batch_size=1, max_queue_delay_s=10.0, max_queue_size=8)

    async def main() -> None:
        tasks = [asyncio.ensure_future(batcher.submit(x)) for x in "abc"]
        await asyncio.to_thread(rec.started.wait, 5)
        closing = asyncio.ensure_future(asyncio.to_thread(batcher.close))
        await asyncio.sleep(0.05)
        with pytest.raises(NotReadyError):
            await batcher.submit("late")
        rec.release.set()
        assert await asyncio.gather(*tasks) == ["done:a", "done:b", "done:c"]
        await closing

    asyncio.run(main())
    assert rec.batches == [["a"], ["b"], ["c"]]


class Gate:
    """A fake graph whose calls each block until released, recording how many run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self, payloads: Sequence[object]) -> list[object]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            assert self.release.wait(10), "test never released the graph"
            return [f"done:{p}" for p in payloads]
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("instances", [1, 2])
def test_with_two_instances_the_next_batch_runs_while_one_is_still_running(instances: int) -> None:
    gate = Gate()
    batcher = GraphBatcher("unit", gate, BatchingConfig(max_batch_size=1, max_queue_size=8), instances=instances)

    async def main() -> list[object]:
        tasks = [asyncio.ensure_future(batcher.submit(x)) for x in "abc"]
        await wait_until(lambda: gate.running == instances and batcher.depth == 3 - instances)
        await asyncio.sleep(0.05)  # room for a wrong extra start to show
        assert gate.running == instances
        gate.release.set()
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(main()) == ["done:a", "done:b", "done:c"]
    finally:
        batcher.close()
    assert gate.most == instances
    assert sum(t.name.startswith("infer-unit") for t in threading.enumerate()) == 0  # close stopped them all


def test_instances_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="instances must be >= 1"):
        GraphBatcher("unit", Gate(), BatchingConfig(), instances=0)


def test_the_server_runs_the_image_encoder_on_the_configured_number_of_instances(settings, tiny_config) -> None:
    with TestClient(create_app(settings.model_copy(update={"image_encoder_instances": 2}))) as client:
        names = {t.name for t in threading.enumerate()}
        assert {"infer-image_encoder", "infer-image_encoder-1", "infer-text_encoder"} <= names
        assert "infer-text_encoder-1" not in names
        r = client.post("/v1/classify", files={"image": ("a.png", demo_png(tiny_config.demo_dir), "image/png")},
                        data={"text": MEDIUM})
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------
# Merging real requests changes no result (tiny bundle)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> ModelPipeline:
    """A tiny bundle whose fusion head really reads the token vectors and the mask (cross-attention).

    The shared tiny bundle's ``concat`` head uses pooled features only (its graph prunes
    ``text_tokens``/``attention_mask``), so wrong padding would go unnoticed there.
    """
    import dataclasses

    from model.export import export_bundle
    from model.train import train

    config = dataclasses.replace(tiny_config, fusion="cross_attention", epochs=1,
                                 run_dir=str(tmp_path_factory.mktemp("xattn-run")))
    bundle = tmp_path_factory.mktemp("xattn-bundle") / "tiny"
    export_bundle(train(config, progress=False), bundle, progress=False)
    pipeline = ModelPipeline(bundle, Settings(bundle=bundle, intra_op_threads=1, text_cache_size=0))
    assert {"text_tokens", "attention_mask"} <= set(pipeline.sessions["fusion_head"].input_names)
    return pipeline


def pixels_of(tiny_config, pipeline: ModelPipeline, indices: Sequence[int]) -> np.ndarray:
    from app.preprocessing.image import decode_image

    return np.stack([decode_image(demo_png(tiny_config.demo_dir, i), pipeline.manifest.image,
                                  max_pixels=40_000_000) for i in indices])


def test_text_rows_are_the_same_alone_or_merged_with_longer_and_shorter_texts(tiny_pipeline) -> None:
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig())
    try:
        alone = bp._run_texts([[MEDIUM]])[0][0]
        merged = bp._run_texts([[LONG], [MEDIUM, SHORT], [SHORT]])
    finally:
        bp.image.close(), bp.text.close(), bp.fusion.close()
    lengths = [len(tiny_pipeline.tokenizer.token_ids(t)) for t in (SHORT, MEDIUM, LONG)]
    assert lengths[0] < lengths[1] < lengths[2]  # the test needs really different lengths
    row = merged[1][0]
    assert row.length == alone.length == lengths[1]
    for name, value in alone.outputs.items():
        assert row.outputs[name].shape == value.shape
        np.testing.assert_allclose(row.outputs[name], value, atol=1e-5, rtol=0)
    assert [len(r) for r in merged] == [1, 2, 1]


def test_classify_is_the_same_alone_or_merged_with_longer_and_shorter_texts(tiny_pipeline, tiny_config) -> None:
    pixels = pixels_of(tiny_config, tiny_pipeline, [0, 1, 2, 3])
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig())
    try:
        def classify_rows(groups: list[tuple[np.ndarray, list[str]]]) -> list[np.ndarray]:
            images = bp._run_images([p for p, _ in groups])
            texts = bp._run_texts([t for _, t in groups])
            return bp._run_fusion(list(zip(images, texts, strict=True)))

        alone = classify_rows([(pixels[1:2], [MEDIUM])])[0]
        merged = classify_rows([(pixels[0:1], [LONG]), (pixels[1:2], [MEDIUM]), (pixels[2:4], [SHORT, LONG])])
    finally:
        bp.image.close(), bp.text.close(), bp.fusion.close()
    assert [m.shape[0] for m in merged] == [1, 1, 2]
    np.testing.assert_allclose(merged[1], alone, atol=1e-5, rtol=0)
    reference, _ = tiny_pipeline.classify(pixels[1:2], [MEDIUM])  # the unbatched synchronous path
    np.testing.assert_allclose(alone, reference, atol=1e-5, rtol=0)


def test_concurrent_classify_calls_are_merged_into_one_graph_call_with_unchanged_results(
    tiny_pipeline, tiny_config
) -> None:
    pixels = pixels_of(tiny_config, tiny_pipeline, [4, 5, 6])
    texts = [SHORT, LONG, MEDIUM]
    expected = [tiny_pipeline.classify(pixels[i:i + 1], [texts[i]])[0] for i in range(3)]
    # max_batch_size 3 and a long delay: the three requests can only go as one full batch.
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig(max_batch_size=3, max_queue_delay_s=30.0))
    before = {g: sample("mmfusion_batch_size_count", {"graph": g}) for g in ("image_encoder", "fusion_head")}
    sums = {g: sample("mmfusion_batch_size_sum", {"graph": g}) for g in ("image_encoder", "fusion_head")}

    async def main() -> list[tuple[np.ndarray, list[bool]]]:
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(bp.classify(pixels[i:i + 1], [texts[i]]) for i in range(3))), 20)
        finally:
            await bp.aclose()

    results = asyncio.run(main())
    for (probs, _), want in zip(results, expected, strict=True):
        np.testing.assert_allclose(probs, want, atol=1e-5, rtol=0)
    for graph in ("image_encoder", "fusion_head"):  # one call carrying 3 rows
        assert sample("mmfusion_batch_size_count", {"graph": graph}) == before[graph] + 1
        assert sample("mmfusion_batch_size_sum", {"graph": graph}) == sums[graph] + 3


def test_aclose_lets_a_classify_in_progress_finish_and_then_refuses(tiny_pipeline, tiny_config) -> None:
    pixels = pixels_of(tiny_config, tiny_pipeline, [7])
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig(max_batch_size=8, max_queue_delay_s=0.2))

    async def main() -> None:
        call = asyncio.ensure_future(bp.classify(pixels, [MEDIUM]))
        await wait_until(lambda: bp.image.depth == 1)  # queued, waiting out its 200 ms delay
        await bp.aclose()
        probs, _ = await call
        assert probs.shape == (1, len(tiny_pipeline.manifest.labels))
        with pytest.raises(NotReadyError):
            await bp.classify(pixels, [MEDIUM])

    asyncio.run(main())


def test_a_classify_admitted_in_the_same_tick_as_aclose_still_finishes(tiny_pipeline, tiny_config) -> None:
    # classify starts its two encoder tasks; a shutdown beginning before they first run must not make
    # them fail an admission check the classify already passed.
    pixels = pixels_of(tiny_config, tiny_pipeline, [7])
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig())

    async def main() -> None:
        call = asyncio.ensure_future(bp.classify(pixels, [MEDIUM]))
        await asyncio.sleep(0)  # classify is admitted and has created its encoder tasks
        await bp.aclose()
        probs, _ = await call
        assert probs.shape == (1, len(tiny_pipeline.manifest.labels))

    asyncio.run(main())


def test_idle_housekeeping_waits_while_another_instance_still_runs_a_batch() -> None:
    # Two inference threads on one session: the idle shrink must not run beside the other's batch.
    release, started, idle_while_running = threading.Event(), threading.Event(), []
    batcher: GraphBatcher

    def graph(payloads: Sequence[object]) -> list[object]:
        if "slow" in payloads:
            started.set()
            assert release.wait(10)
        return list(payloads)

    def on_idle() -> None:
        idle_while_running.append(batcher._running_rows)

    batcher = GraphBatcher("unit", graph, BatchingConfig(max_batch_size=1, max_queue_delay_s=0.0, idle_s=0.05),
                           on_idle=on_idle, instances=2)

    async def main() -> None:
        assert await batcher.submit("quick") == "quick"  # one instance ran a batch: its idle is due
        slow = asyncio.ensure_future(batcher.submit("slow"))
        await asyncio.to_thread(started.wait, 5)
        await asyncio.sleep(0.3)  # several idle_s periods while "slow" runs
        release.set()
        assert await slow == "slow"
        await asyncio.sleep(0.3)

    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert idle_while_running and all(rows == 0 for rows in idle_while_running), idle_while_running


def record_image_encoder_runs(pipeline: ModelPipeline, monkeypatch) -> list[tuple[int, bool]]:
    """(rows, shrink_arena) of every image-encoder session run, in order."""
    session = pipeline.sessions["image_encoder"]
    calls: list[tuple[int, bool]] = []
    real = session.run

    def recording(feeds: dict[str, np.ndarray], *, shrink_arena: bool = False, record: bool = True
                  ) -> dict[str, np.ndarray]:
        calls.append((len(feeds["pixel_values"]), shrink_arena))
        return real(feeds, shrink_arena=shrink_arena, record=record)

    monkeypatch.setattr(session, "run", recording)
    return calls


def arena_batches(pipeline: ModelPipeline) -> tuple[np.ndarray, np.ndarray]:
    """A batch that grows the arena (one row over SHRINK_AFTER_ROWS) and a 1-row one that does not."""
    size = pipeline.manifest.image.size
    big, small = (np.zeros((n, 3, size, size), dtype=np.float32) for n in (SHRINK_AFTER_ROWS + 1, 1))
    return big, small


def test_the_memory_arena_is_shrunk_once_a_graph_goes_idle_after_a_large_batch_never_between_batches(
        tiny_pipeline, monkeypatch) -> None:
    calls = record_image_encoder_runs(tiny_pipeline, monkeypatch)
    big, small = arena_batches(tiny_pipeline)
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig(idle_s=0.3))

    async def main() -> None:
        await bp.encode_images(small)
        await asyncio.sleep(0.5)  # idle after a small batch: nothing to give back
        for _ in range(3):  # back-to-back large batches (a sustained load): never shrunk in between
            await bp.encode_images(big)
        await wait_until(lambda: any(flag for _, flag in calls), timeout=5)  # idle: shrunk, by a 1-row run
        await bp.encode_images(small)
        await asyncio.sleep(0.5)  # idle again, but no large batch since the shrink
        await bp.aclose()

    asyncio.run(main())
    big_n = SHRINK_AFTER_ROWS + 1
    assert calls == [(1, False), (big_n, False), (big_n, False), (big_n, False), (1, True), (1, False)]


def test_a_steady_light_load_after_a_burst_shrinks_the_arena_once_without_an_idle_queue(
        tiny_pipeline, monkeypatch) -> None:
    """A trickle of small batches never leaves the queue empty for idle_s, yet the burst's memory goes back."""
    calls = record_image_encoder_runs(tiny_pipeline, monkeypatch)
    big, small = arena_batches(tiny_pipeline)
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig(idle_s=0.4))

    async def main() -> None:
        await bp.encode_images(big)
        for _ in range(12):  # 0.05 s apart: the queue is never empty for idle_s
            await bp.encode_images(small)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # truly idle now: already shrunk, nothing more to give back
        await bp.aclose()

    asyncio.run(main())
    shrinks = [i for i, (_, flag) in enumerate(calls) if flag]
    assert len(shrinks) == 1, calls
    assert calls[0] == (SHRINK_AFTER_ROWS + 1, False)
    assert 1 < shrinks[0] < len(calls) - 1  # during the trickle, after idle_s of small batches, not at idle
    assert all(rows == 1 for rows, _ in calls[1:])


def test_batch_invariance_probe_flags_dynamic_int8_graphs_and_passes_fp32(tiny_pipeline, tmp_path) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from app.inference.runtime import GraphSession, batch_invariant

    fusion = tiny_pipeline.sessions["fusion_head"]
    assert batch_invariant(fusion)
    source = tiny_pipeline.bundle_dir / fusion.spec.variants["fp32"].file
    quantized = tmp_path / "fusion_head.int8.onnx"
    quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
    int8 = GraphSession("fusion_head", fusion.spec,
                        ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"]), "int8")
    assert not batch_invariant(int8)


def test_a_batch_dependent_fusion_head_runs_each_row_on_its_own(tiny_pipeline, tiny_config, monkeypatch) -> None:
    pixels = pixels_of(tiny_config, tiny_pipeline, [0, 1, 2])
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig())
    calls: list[int] = []
    real = tiny_pipeline.fuse

    def recording(feeds: dict[str, np.ndarray], **kw: bool) -> np.ndarray:
        calls.append(len(feeds["text_features"]))
        return real(feeds, **kw)

    monkeypatch.setattr(tiny_pipeline, "fuse", recording)
    try:
        groups = [(pixels[0:1], [LONG]), (pixels[1:3], [SHORT, MEDIUM])]
        payloads = list(zip(bp._run_images([g[0] for g in groups]), bp._run_texts([g[1] for g in groups]),
                            strict=True))
        assert bp.per_row == {"image_encoder": False, "text_encoder": False, "fusion_head": False}  # fp32
        merged = bp._run_fusion(payloads)
        bp.per_row["fusion_head"] = True
        separate = bp._run_fusion(payloads)
    finally:
        bp.image.close(), bp.text.close(), bp.fusion.close()
    assert calls == [3, 1, 1, 1]
    for m, s in zip(merged, separate, strict=True):
        np.testing.assert_allclose(m, s, atol=1e-5, rtol=0)


def test_batch_dependent_encoders_run_one_row_per_call_with_the_same_results(tiny_pipeline, tiny_config,
                                                                            monkeypatch) -> None:
    pixels = pixels_of(tiny_config, tiny_pipeline, [0, 1, 2])
    bp = BatchedPipeline(tiny_pipeline, BatchingConfig())
    image_calls: list[int] = []
    text_calls: list[int] = []
    real_images, real_texts = tiny_pipeline.encode_images, tiny_pipeline.encode_text_rows

    def images(pixel_values: np.ndarray, **kw: bool) -> dict[str, np.ndarray]:
        image_calls.append(len(pixel_values))
        return real_images(pixel_values, **kw)

    def texts(batch: list[str], **kw: bool) -> list:
        text_calls.append(len(batch))
        return real_texts(batch, **kw)

    monkeypatch.setattr(tiny_pipeline, "encode_images", images)
    monkeypatch.setattr(tiny_pipeline, "encode_text_rows", texts)
    try:
        merged_img = bp._run_images([pixels[0:1], pixels[1:3]])
        merged_txt = bp._run_texts([[LONG], [SHORT, MEDIUM]])
        bp.per_row.update(image_encoder=True, text_encoder=True)
        single_img = bp._run_images([pixels[0:1], pixels[1:3]])
        single_txt = bp._run_texts([[LONG + " again"], [SHORT + " again", MEDIUM + " again"]])
    finally:
        bp.image.close(), bp.text.close(), bp.fusion.close()
    assert image_calls == [3, 1, 1, 1]
    assert text_calls == [3, 1, 1, 1]
    assert [len(p["image_embedding"]) for p in single_img] == [1, 2]
    for m, s in zip(merged_img, single_img, strict=True):
        np.testing.assert_allclose(m["image_embedding"], s["image_embedding"], atol=1e-5, rtol=0)
    assert [len(rows) for rows in single_txt] == [1, 2] and [len(rows) for rows in merged_txt] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Over HTTP
# --------------------------------------------------------------------------------------------------


def test_http_overload_answers_503_overloaded_with_retry_after_and_recovers(settings, tiny_config, monkeypatch) -> None:
    settings = settings.model_copy(update={"max_queue_size": 1, "max_batch_size": 1})
    app = create_app(settings)
    png = demo_png(tiny_config.demo_dir, 0)
    with TestClient(app) as client:
        pipeline = app.state.service.pipeline
        hold, entered = threading.Event(), threading.Event()
        real = pipeline.encode_images

        def held(pixel_values: np.ndarray, **kw: bool) -> dict[str, np.ndarray]:
            entered.set()
            assert hold.wait(10)
            return real(pixel_values, **kw)

        monkeypatch.setattr(pipeline, "encode_images", held)

        def post() -> object:
            return client.post("/v1/embed", files={"image": ("a.png", png, "image/png")})

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post)
            assert entered.wait(10)
            queued = pool.submit(post)
            batcher = pipeline.batched.image
            for _ in range(500):
                if batcher.depth == 1:
                    break
                threading.Event().wait(0.01)
            assert batcher.depth == 1
            refused = post()
            # a classify always carries an image: refused before its body is parsed (this one is not JSON)
            refused_unparsed = client.post("/v1/classify", content=b'{"image_base64": "not json',
                                           headers={"content-type": "application/json"})
            hold.set()
            assert running.result(10).status_code == 200
            assert queued.result(10).status_code == 200
        assert refused_unparsed.status_code == 503, refused_unparsed.text
        assert refused_unparsed.json()["error"]["code"] == "overloaded"
        assert client.post("/v1/classify", content=b'{"image_base64": "not json',
                           headers={"content-type": "application/json"}).status_code == 400  # parsed once idle
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert post().status_code == 200  # capacity is back


# --------------------------------------------------------------------------------------------------
# Precision choice (MMFUSION_PRECISION=auto), the other half of what a batch runs on
# --------------------------------------------------------------------------------------------------


def manifest_with(tiny_bundle, variants: tuple[str, ...], quality: dict[str, float]):  # type: ignore[no-untyped-def]
    from app.bundle.manifest import VariantQuality
    from app.bundle.verify import load_bundle_manifest

    manifest = load_bundle_manifest(tiny_bundle)
    graphs = {role: spec.model_copy(update={"variants": {v: spec.variants["fp32"] for v in ("fp32", *variants)}})
              for role, spec in manifest.graphs.items()}
    return manifest.model_copy(update={
        "graphs": graphs, "quality": {p: VariantQuality(top1_agreement=q) for p, q in quality.items()}})


@pytest.mark.parametrize(("variants", "quality", "providers", "expected"), [
    (("int8",), {"int8": 0.995}, ["CPUExecutionProvider"], "int8"),
    (("int8",), {"int8": 0.99}, ["CPUExecutionProvider"], "int8"),
    (("int8",), {"int8": 0.989}, ["CPUExecutionProvider"], "fp32"),
    (("int8",), {}, ["CPUExecutionProvider"], "fp32"),  # unmeasured quality is never trusted
    (("int8", "fp16"), {"int8": 1.0, "fp16": 1.0}, ["CPUExecutionProvider"], "int8"),  # fp16 is GPU-only
    (("int8", "fp16"), {"int8": 1.0, "fp16": 1.0}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "fp16"),
    (("int8", "fp16"), {"int8": 1.0, "fp16": 0.9}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "fp32"),
    (("int8", "fp16"), {"int8": 1.0, "fp16": 1.0}, ["TensorrtExecutionProvider", "CPUExecutionProvider"], "fp16"),
])
def test_auto_precision_is_the_fastest_variant_with_recorded_top1_agreement_of_at_least_099(
    tiny_bundle, variants, quality, providers, expected
) -> None:
    from app.inference.runtime import choose_precision

    assert choose_precision(manifest_with(tiny_bundle, variants, quality), "auto", providers) == expected


@pytest.mark.parametrize(("exact_int8_dot", "expected"), [(True, "int8"), (False, "fp32"), (None, "fp32")])
def test_auto_does_not_serve_int8_measured_with_exact_int8_products_on_a_cpu_that_may_saturate_them(
    tiny_bundle, exact_int8_dot, expected, caplog, monkeypatch
) -> None:
    import app.inference.cpu_features as cpu_features
    from app.bundle.manifest import VariantQuality
    from app.inference.runtime import choose_precision

    manifest = manifest_with(tiny_bundle, ("int8",), {})
    manifest = manifest.model_copy(update={"quality": {
        "int8": VariantQuality(top1_agreement=0.999, cpu_features=["exact_int8_dot"])}})
    monkeypatch.setattr(cpu_features, "has_exact_int8_dot", lambda: exact_int8_dot)
    with caplog.at_level("WARNING", logger="mmfusion.runtime"):
        chosen = choose_precision(manifest, "auto", ["CPUExecutionProvider"])
    assert chosen == expected
    assert ("not serving int8" in caplog.text) == (expected == "fp32")
    # asked for explicitly, it is served, with the same warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmfusion.runtime"):
        assert choose_precision(manifest, "int8", ["CPUExecutionProvider"]) == "int8"
    assert ("lacks ['exact_int8_dot']" in caplog.text) == (expected == "fp32")


def test_an_explicit_precision_the_bundle_lacks_is_refused(tiny_bundle) -> None:
    from app.core.errors import BundleError
    from app.inference.runtime import choose_precision

    manifest = manifest_with(tiny_bundle, ("int8",), {"int8": 0.5})
    assert choose_precision(manifest, "int8", ["CPUExecutionProvider"]) == "int8"  # explicit wins over quality
    with pytest.raises(BundleError):
        choose_precision(manifest, "fp16", ["CPUExecutionProvider"])


def test_the_server_splits_the_thread_budget_between_concurrent_graphs_and_offline_use_does_not(tiny_bundle) -> None:
    settings = Settings(bundle=tiny_bundle, intra_op_threads=4)

    def threads(pipeline: ModelPipeline) -> dict[str, int]:
        return {role: s.session.get_session_options().intra_op_num_threads for role, s in pipeline.sessions.items()}

    assert threads(ModelPipeline(tiny_bundle, settings, split_threads=True)) == {
        "image_encoder": 4, "text_encoder": 2, "fusion_head": 1}
    assert set(threads(ModelPipeline(tiny_bundle, settings)).values()) == {4}
    options = ModelPipeline(tiny_bundle, settings).sessions["image_encoder"].session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort_level_all() and not options.optimized_model_filepath
    spinning = Settings(bundle=tiny_bundle, intra_op_threads=4, intra_op_spinning=True)
    for session in ModelPipeline(tiny_bundle, spinning, split_threads=True).sessions.values():
        assert session.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def ort_level_all():  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_cuda_gets_heuristic_conv_search_and_copies_on_the_default_stream() -> None:
    from app.inference.runtime import provider_options

    assert provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}),
        "CPUExecutionProvider",
    ]
    assert provider_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_batches_side_by_side_run_on_per_instance_sessions_and_a_lone_batch_on_every_thread(
        tiny_pipeline, tiny_config) -> None:
    # Two inference threads on one 2-thread session ran four threads on two cores (worse p99); each
    # instance now has its own session (Triton's instance_group) with half the image threads for batches
    # that run side by side, and a batch that runs alone keeps the all-threads session (light-load latency).
    bundle = tiny_pipeline.bundle_dir
    pipe = ModelPipeline(bundle, Settings(bundle=bundle, intra_op_threads=2, image_encoder_instances=2,
                                          text_cache_size=0), split_threads=True)
    wide = pipe.sessions["image_encoder"]
    assert wide.session.get_session_options().intra_op_num_threads == 2
    assert [s.session.get_session_options().intra_op_num_threads for s in pipe.image_sessions] == [1, 1]
    assert len({id(s.session) for s in (wide, *pipe.image_sessions)}) == 3
    pixels = pixels_of(tiny_config, pipe, [3])
    np.testing.assert_allclose(pipe.encode_images(pixels, instance=1)["image_embedding"],
                               pipe.encode_images(pixels)["image_embedding"], atol=1e-6)
    offline = ModelPipeline(bundle, Settings(bundle=bundle, image_encoder_instances=2))
    assert len(offline.image_sessions) == 1  # offline (no split_threads): one session, whatever the setting

    calls: list[tuple[str, int | None]] = []
    burst, both_running = threading.Event(), threading.Event()
    real = pipe.encode_images

    def spy(pixel_values: np.ndarray, *, shrink_arena: bool = False, instance: int | None = None) -> dict:
        calls.append((threading.current_thread().name, instance))
        if burst.is_set() and len(calls) == 1:
            assert both_running.wait(5)  # held until the overflow instance has taken the next batch
        elif burst.is_set() and len(calls) == 2:
            both_running.set()
        return real(pixel_values, shrink_arena=shrink_arena, instance=instance)

    pipe.encode_images = spy  # type: ignore[method-assign]
    bp = BatchedPipeline(pipe, BatchingConfig(max_batch_size=1), image_instances=2)

    async def main() -> None:
        for _ in range(3):  # light load, one request at a time: instance 0 alone, on every thread
            await bp.encode_images(pixels)
        light = list(calls)
        calls.clear()
        burst.set()
        await asyncio.gather(*(bp.encode_images(pixels) for _ in range(24)))
        await bp.aclose()
        assert [instance for _, instance in light] == [None, None, None]
        assert len({thread for thread, _ in light}) == 1

    asyncio.run(main())
    # The first batch of the burst started alone (all threads); the overflow instance took the second
    # beside it, on its own 1-thread session.
    assert len(calls) == 24 and calls[0][1] is None and calls[1][1] == 1 and calls[0][0] != calls[1][0]


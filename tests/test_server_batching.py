"""Micro-batching: the batch stage's logic in-process (who waits for whom, one bad item fails alone), the engine's
batched search against its one-at-a-time search, the thread counts, and a real `clip-hpc serve` where concurrent
queries get the same answers as sequential ones. About 20 s, most of it the server's start."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.index.build import build_index
from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.batched_search import BatchedSearch
from clip_hpc.server.micro_batch import BatchSettings, MicroBatcher
from clip_hpc.server.serve import load_engine
from clip_hpc.server.threads import job_cpus, serving_threads
from index_fixtures import synthetic_emb_dir
from server_fixtures import start_server

LONG_WINDOW = BatchSettings(window_ms=10_000, max_batch=8)  # a stage that waited it out fails `run_threads`


def run_threads(target, args_list, timeout=5.0):
    """One thread per argument; returns each thread's result or exception, in order."""
    out: list = [None] * len(args_list)

    def call(i, arg):
        try:
            out[i] = target(arg)
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a submit did not return: the stage waited for requests that were not coming"
    return out


# --- the batch stage ---------------------------------------------------------------------------------------------
def test_a_stage_gathers_the_expected_requests_and_a_bad_one_fails_alone():
    calls: list[list[int]] = []

    def square(items):
        calls.append(list(items))
        if 13 in items:
            raise UserError("13 is unlucky")
        return [i * i for i in items]

    stage = MicroBatcher("test", square, LONG_WINDOW, expected=lambda: 4)
    results = run_threads(stage.submit, [2, 3, 13, 5])
    assert results[:2] == [4, 9] and results[3] == 25
    assert isinstance(results[2], UserError) and "unlucky" in str(results[2])
    assert sorted(calls[0]) == [2, 3, 5, 13]  # one call for the four, then each alone
    assert sorted(map(tuple, calls[1:])) == [(2,), (3,), (5,), (13,)]
    lines = stage.metric_lines()
    assert 'clip_hpc_batch_size_bucket{stage="test",le="2"} 0' in lines  # one batch of four (its re-runs
    assert 'clip_hpc_batch_size_bucket{stage="test",le="4"} 1' in lines  # one by one are not new batches)


def test_a_lone_request_does_not_wait_for_the_window():
    calls: list[list[int]] = []
    stage = MicroBatcher("alone", lambda items: calls.append(list(items)) or items, LONG_WINDOW, expected=lambda: 1)
    assert run_threads(stage.submit, [7]) == [7]
    assert [stage.submit(i) for i in (1, 2)] == [1, 2] and calls == [[7], [1], [2]]


def test_a_batch_is_never_larger_than_max_batch():
    sizes: list[int] = []
    stage = MicroBatcher(
        "max",
        lambda items: sizes.append(len(items)) or items,
        BatchSettings(window_ms=200, max_batch=3),
        expected=lambda: 10,
    )
    assert run_threads(stage.submit, list(range(10))) == list(range(10))
    assert max(sizes) <= 3 and sum(sizes) == 10


def test_in_flight_counts_what_is_on_its_way_to_a_stage(monkeypatch):
    """Held requests, plus kept-alive connections answered a moment ago (their clients are about to ask again),
    less what the other stages hold (a request in the text stage reaches the search stage only after an encode)."""
    from clip_hpc.server import in_flight

    clock = [100.0]
    monkeypatch.setattr(in_flight.time, "monotonic", lambda: clock[0])
    flight = in_flight.InFlight(recent_s=0.02)
    text = flight.stage("text", lambda items: items, LONG_WINDOW)
    search = flight.stage("search", lambda items: items, LONG_WINDOW)
    for conn in ("a", "b"):
        flight.started(conn)
    assert flight.expected() == 2
    flight.finished("a")
    flight.finished("b")
    assert flight.expected() == 0  # a connection's first request says nothing about a second
    flight.started("a")
    flight.finished("a")
    assert flight.expected() == 1  # kept alive and reused: its client will be back
    clock[0] += 0.05
    assert flight.expected() == 0  # ... but not forever
    flight.started("a")
    flight.started("c")
    flight.started(None)
    text.queue.append(("item", None))
    assert flight.expected_for(search) == 2 and flight.expected_for(text) == 3


def test_one_runtime_serves_the_encoder_and_the_search(tmp_path):
    """The shared encoder and the batched search make their stages on the runtime they are handed (one compute
    thread, one in-flight count, one batch-size report); with batching off none is made; and the served bundle
    refuses an engine that does not query through its shared encoder."""
    from types import SimpleNamespace

    from clip_hpc.server.metrics import batch_metric_lines
    from clip_hpc.server.runtime import ServingRuntime
    from clip_hpc.server.served_engine import ServedEngine
    from clip_hpc.server.shared_encoder import SharedEncoder

    class Ones:
        dim = 4

        def encode_text(self, texts):
            return np.ones((len(texts), 4), np.float32)

    runtime = ServingRuntime.start(BatchSettings(window_ms=5, max_batch=4))
    encoder = SharedEncoder(Ones(), runtime)
    searcher = BatchedSearch(SimpleNamespace(encoder=encoder), encoder, runtime)
    assert [sizes.stage for sizes in runtime.batch_sizes()] == ["text", "image", "search", "text-search"]
    runtime.in_flight.count = 1  # what the app's middleware counts: every stage waits on it
    assert all(stage.expected() == 1 for stage in runtime.in_flight.stages)
    runtime.in_flight.count = 0
    assert encoder.encode_text(["x"]).shape == (1, 4)
    assert 'clip_hpc_batch_size_count{stage="text"} 1' in batch_metric_lines(runtime.batch_sizes())
    assert searcher.fuses("a new text") and not searcher.fuses("x")  # "x" is cached now

    off = ServingRuntime(runtime.compute, None)
    alone = SharedEncoder(Ones(), off)
    assert alone.text_stage is None and off.batch_sizes() == [] and alone.encode_text(["y"]).shape == (1, 4)
    assert not BatchedSearch(SimpleNamespace(encoder=alone), alone, off).fuses("a new text")
    with pytest.raises(ValueError, match="shared encoder"):
        ServedEngine(SimpleNamespace(encoder=Ones()), encoder, runtime)


def test_batched_search_equals_one_query_at_a_time(tmp_path):
    _, vectors = synthetic_emb_dir(tmp_path / "emb", 2000, clusters=30)
    build_index(tmp_path / "emb", tmp_path / "index", index_key="IVF16,PQ8x4", progress=False)  # refined PQ
    engine = SearchEngine(tmp_path / "index", encoder=None, model_name="clip-hpc-tiny", pretrained="none")
    try:
        queries = vectors[[5, 50, 500, 1500, 1999]] + np.float32(0.01)
        ks, floors = [10, 3, 10, 25, 10], [None, None, 0.5, None, 2.0]
        batched = engine.search_batch(queries, ks, floors)
        for query, k, floor, hits in zip(queries, ks, floors, batched):
            assert hits == engine.search_vectors(query[None], k, min_score=floor)[0]
        assert len(batched[0]) == 10 and len(batched[1]) == 3 and batched[4] == []
        with pytest.raises(UserError, match="k must be"):
            engine.search_batch(queries[:1], [0])
    finally:
        engine.close()


def test_thread_counts_follow_the_job_not_the_node():
    node = 64
    assert job_cpus({}, set(range(8)), node) == 8  # the affinity mask (cgroup / srun binding)
    assert job_cpus({"SLURM_CPUS_PER_TASK": "4"}, set(range(8)), node) == 4
    assert job_cpus({"SLURM_CPUS_PER_TASK": "16"}, set(range(8)), node) == 8  # never more than we may run on
    assert job_cpus({"OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "4"}, set(range(8)), node) == 2
    assert job_cpus({"SLURM_CPUS_PER_TASK": "junk"}, None, node) == node
    assert job_cpus({}, None, None) == 1
    assert serving_threads(8, encoder_on_gpu=False) == (8, 1)  # FAISS's pool would fight torch's for the cores
    assert serving_threads(8, encoder_on_gpu=True) == (8, 8)


def test_model_calls_and_batched_searches_run_on_the_one_compute_thread(served_index):
    """Torch slows down once a second thread has called it (compute.py), so every encode and every batched FAISS
    search of the server runs on the compute thread, whichever request thread asked."""
    from PIL import Image

    served = load_engine(str(served_index), batching=BatchSettings(window_ms=50, max_batch=8))
    engine, compute_thread = served.engine, served.runtime.compute.thread
    try:
        seen: list[str] = []

        def recorded(fn):
            return lambda *args, **kwargs: seen.append(threading.current_thread().name) or fn(*args, **kwargs)

        inner = served.encoder.inner
        inner.encode_text, inner.encode_images = recorded(inner.encode_text), recorded(inner.encode_images)
        engine.search_batch = recorded(engine.search_batch)
        searcher = BatchedSearch(engine, served.encoder, served.runtime)
        texts = [f"query {i}" for i in range(4)]
        hits = run_threads(lambda t: searcher.search_combined(served.encoder.encode_text([t])[0], 5), texts, 60)
        images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "green", "blue")]
        vectors = run_threads(lambda image: served.encoder.encode_images([image]), images, 60)
        assert all(len(h) == 5 for h in hits) and all(v.shape == (1, served.encoder.dim) for v in vectors)
        assert len(seen) >= 3 and set(seen) == {compute_thread.name}, seen
    finally:
        engine.close()


def test_a_text_alone_is_encoded_and_searched_in_one_call_and_then_cached(served_index):
    """The fused stage gives what the two-stage path gives (vector and hits), runs on the compute thread, and puts
    the text in the cache, so that asking again is a hit that never reaches the model."""
    served = load_engine(str(served_index), batching=BatchSettings(window_ms=50, max_batch=8))
    engine = served.engine
    try:
        searcher = BatchedSearch(engine, served.encoder, served.runtime)
        calls: list[tuple[str, int]] = []
        inner = served.encoder.inner
        encode = inner.encode_text
        inner.encode_text = lambda texts: calls.append((threading.current_thread().name, len(texts))) or encode(texts)
        texts = [f"a {colour} square on white" for colour in ("red", "green", "blue", "black", "pink")]
        assert all(searcher.fuses(t) for t in texts)
        served.runtime.in_flight.count = len(texts)  # as the app's middleware counts them: the stage waits for all
        fused = run_threads(lambda t: searcher.search_text(t, 6), texts, 60)  # (not on the compute thread's pace)
        served.runtime.in_flight.count = 0
        assert calls and {name for name, _ in calls} == {served.runtime.compute.thread.name}
        assert sum(n for _, n in calls) == len(texts) and len(calls) < len(texts)  # batched
        assert served.encoder.cache_counts() == {"hit": 0, "miss": len(texts)}
        calls.clear()
        for text, (query, hits) in zip(texts, fused):
            assert not searcher.fuses(text)
            again, again_hits = searcher.search_text(text, 6)  # from the cache, through the two-stage path
            assert np.allclose(query, again, atol=1e-6) and [h.id for h in hits] == [h.id for h in again_hits]
            assert np.allclose(query, engine.query_vector(text=text), atol=1e-6)
        assert calls == [] and served.encoder.cache_counts()["hit"] == 2 * len(texts)
    finally:
        engine.close()


def test_the_old_design_really_encodes_at_the_full_context(served_index):
    """`serve --full-context` (the benchmark's old design) must not load a short-context model."""
    for full, expected in ((True, "full"), (False, "short")):
        engine = load_engine(str(served_index), batching=None, full_context=full).engine
        try:
            assert engine.encoder.text_context.startswith(expected), engine.encoder.text_context
        finally:
            engine.close()


# --- a real server -----------------------------------------------------------------------------------------------
def _batch_counts(metrics: str, stage: str) -> tuple[float, float]:
    """(batches, batches of exactly one) of a stage so far."""

    def value(prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))

    return (
        value(f'clip_hpc_batch_size_count{{stage="{stage}"}}'),
        value(f'clip_hpc_batch_size_bucket{{stage="{stage}",le="1"}}'),
    )


def _same_results(a: dict, b: dict) -> None:
    assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
    assert np.allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-5)


@pytest.fixture(scope="module")
def batching_server(served_index, tmp_path_factory):
    """A window long enough that concurrent requests surely meet (a lone one still never waits for it)."""
    with start_server(
        served_index, tmp_path_factory.mktemp("batching"), "--port", "0", "--batch-window-ms", "500"
    ) as srv:
        yield srv


def test_concurrent_queries_get_what_sequential_ones_get(batching_server):
    texts = [
        f"a {colour} {shape} on grey" for colour in ("red", "green", "blue", "yellow") for shape in ("circle", "square")
    ]
    with batching_server.client() as c:
        sequential = [c.get("/api/search", params={"q": t, "k": 5}).json() for t in texts]
        before = c.get("/metrics").text
    with batching_server.client() as c:  # fresh texts (no cache hits), sent all at once
        concurrent = run_threads(
            lambda t: c.get("/api/search", params={"q": t + " ", "k": 5}), texts, 60
        )  # same tokens
        after = c.get("/metrics").text
    for one, many in zip(sequential, concurrent):
        assert many.status_code == 200
        _same_results(one, many.json())
    batches, singles = np.subtract(_batch_counts(after, "text-search"), _batch_counts(before, "text-search"))
    assert 0 < batches < len(texts) and singles < batches, (batches, singles)  # a text alone: encoded + searched
    for stage in ("text", "search"):  # ... in one call, never through the two stages
        assert _batch_counts(after, stage) == _batch_counts(before, stage), stage


def test_concurrent_combined_queries_share_the_text_and_search_stages(batching_server):
    texts = [f"a {colour} {shape} in a field" for colour in ("red", "green", "blue") for shape in ("circle", "star")]
    with batching_server.client() as c:
        alone = [c.post("/api/search", json={"text": t, "k": 5, "weights": {"text": 2.0}}).json() for t in texts]
        before = c.get("/metrics").text
        together = run_threads(
            lambda t: c.post("/api/search", json={"text": t + " ", "k": 5, "weights": {"text": 2.0}}), texts, 60
        )
        after = c.get("/metrics").text
    for one, many in zip(alone, together):
        assert many.status_code == 200
        _same_results(one, many.json())
    for stage in ("text", "search"):
        batches, singles = np.subtract(_batch_counts(after, stage), _batch_counts(before, stage))
        assert 0 < batches < len(texts) and singles < batches, (stage, batches, singles)


def test_a_bad_request_in_a_batch_fails_alone(batching_server):
    good = [{"text": f"a photo number {i}", "k": 4} for i in range(5)]
    bad = [
        ({"text": "fine text", "vector": [1.0, 2.0]}, 400),  # wrong length, after its text was encoded
        ({"text": "fine text 2", "positive_ids": [10**9]}, 404),
        ({"text": "fine text 3", "image_b64": base64.b64encode(b"not an image").decode()}, 400),
    ]
    with batching_server.client() as c:
        expected = [c.post("/api/search", json=body).json() for body in good]
        bodies = [{**body, "text": body["text"] + " "} for body in good]  # same tokens, not in the cache
        answers = run_threads(
            lambda body: c.post("/api/search", json=body), [*bodies[:2], *[b for b, _ in bad], *bodies[2:]], 60
        )
    for want, got in zip(expected, [*answers[:2], *answers[5:]]):
        assert got.status_code == 200
        _same_results(want, got.json())
    for (_, status), got in zip(bad, answers[2:5]):
        assert got.status_code == status and "error" in got.json()

"""The default index against exact search on a real embedding set (scripts/bench_index.py --real DIR).

One process, interleaved: each held-out query goes to exact FAISS `IndexFlatIP` (float32) and to the served
default (`SearchEngine.search_vectors`, the server's path) one after the other, the order alternating, first with
FAISS on one thread (the fair budget for a single query), then with its default threads. Recall@10 is against
exact search over what the index holds (float16 rows), for held-out images and held-out captions (or synthetic
text-like queries where the set has no captions), beside the recall index.json claims from its own self-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.bench.heldout import VectorQueriesOnly
from clip_hpc.bench.real_sets import HeldOutSplit, load_real_set, split_held_out
from clip_hpc.devdata.synthetic_vectors import write_emb_dir
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.index.build import build_index
from clip_hpc.index.summary import served_recall
from clip_hpc.index.timed_choice import faiss_threads
from clip_hpc.search.engine import SearchEngine

K = 10
BLOCK = 25  # queries a method answers in a row in the block timing
Search = Callable[[np.ndarray, int], np.ndarray]  # queries, k -> ids (queries x k)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class MethodRow:
    """One method's figures: latency per single query at 1 and default FAISS threads, recall per family."""

    method: str
    one_thread: Latency
    default_threads: Latency
    recall_images: float
    recall_text: float
    one_thread_blocks: Latency  # the same queries in blocks of BLOCK per method: each index's steady state


def flat_search(vectors: np.ndarray) -> Search:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return lambda q, k: flat.search(q, k)[1]


def engine_search(engine: SearchEngine) -> Search:
    """The served search: what `clip-hpc serve` answers a vector query with (ids, padded with -1)."""

    def search(q: np.ndarray, k: int) -> np.ndarray:
        rows = engine.search_vectors(q, k)
        return np.array([[h.id for h in row] + [-1] * (k - len(row)) for row in rows])

    return search


def interleaved_latency(
    searches: dict[str, Search], queries: np.ndarray, threads: int, block: int = 1
) -> dict[str, Latency]:
    """p50/p99 ms of one query at a time, every method on each block of `block` queries in turn (the order
    alternating), so that load from elsewhere on the machine falls on all of them alike. With block 1 each query
    starts in the caches the other method's query left (a 94 MB exact scan evicts a small index's lists); with
    longer blocks each method runs as a server does, one query after another on its own index."""
    names = list(searches)
    times: dict[str, list[float]] = {name: [] for name in names}
    with faiss_threads(threads):
        for b, lo in enumerate(range(0, len(queries), block)):
            for name in names if b % 2 == 0 else names[::-1]:
                for q in queries[lo : lo + block]:
                    start = time.perf_counter()
                    searches[name](q[None, :], K)
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: Latency(round(float(np.percentile(t, 50)), 3), round(float(np.percentile(t, 99)), 3))
        for name, t in times.items()
    }


def timing_queries(split: HeldOutSplit, n: int) -> np.ndarray:
    """Half held-out images, half held-out text queries (or all of one kind where the other runs short)."""
    half = n // 2
    texts = split.text_queries[: max(half, n - len(split.image_queries))]
    return np.concatenate([split.image_queries[: n - len(texts)], texts]).astype(np.float32)


def claimed_recall(info_recall: dict[str, Any], refine: bool) -> dict[str, Any]:
    """The self-check figures in index.json for the served configuration, and the bound it chose by."""
    return {
        "served": info_recall.get("served"),
        "served_bound": info_recall.get("served_bound"),
        "per_family": served_recall(info_recall, refine),
    }


def build_default(split: HeldOutSplit, work: Path, graph_candidate: bool = False) -> Path:
    """`clip-hpc index` with every default over the indexed rows (ids 0..n-1, float16 shards as `embed` writes),
    and `--graph-candidate` when asked."""
    emb = write_emb_dir(work / "emb", split.base, np.zeros(len(split.base), dtype=np.int64), shard_size=50_000)
    out = work / "index"
    build_index(emb, out, progress=False, graph_candidate=graph_candidate)
    return out


EXACT_SERVED = "exact, served by clip-hpc (index --index-key Flat)"
LATENCIES = ("one_thread", "one_thread_blocks")


def build_served_exact(work: Path) -> Path:
    """The same shards indexed with `--index-key Flat`: exact search through the served path, metadata look-up and
    all, so that the default's cost over exact search is also seen without what both pay alike."""
    out = work / "exact"
    build_index(work / "emb", out, progress=False, index_key="Flat")
    return out


def measure(split: HeldOutSplit, index_dir: Path, exact_dir: Path, timed: int, default_threads: int) -> dict[str, Any]:
    """Every method on the same queries (FAISS's exact scan, the same served by clip-hpc from `exact_dir`, the
    default; the default last): interleaved latency at 1 and `default_threads` threads and in blocks, then recall."""
    held16 = split.base.astype(np.float16).astype(np.float32)  # what vectors.npy holds: the ground truth's rows
    engine = SearchEngine(index_dir, encoder=VectorQueriesOnly(held16.shape[1]))
    exact = SearchEngine(exact_dir, encoder=VectorQueriesOnly(held16.shape[1]))
    try:
        searches = {
            "exact IndexFlatIP float32": flat_search(held16),
            EXACT_SERVED: engine_search(exact),
            "clip-hpc default": engine_search(engine),
        }
        queries = timing_queries(split, timed)
        one = interleaved_latency(searches, queries, 1)
        many = interleaved_latency(searches, queries, default_threads)
        blocks = interleaved_latency(searches, queries, 1, BLOCK)
        exact_images = exact_top_k(split.image_queries, held16, K)
        exact_texts = exact_top_k(split.text_queries, held16, K)
        rows = [
            MethodRow(
                name,
                one[name],
                many[name],
                round(recall_at_k(search(split.image_queries, K), exact_images, K), 4),
                round(recall_at_k(search(split.text_queries, K), exact_texts, K), 4),
                blocks[name],
            )
            for name, search in searches.items()
        ]
        text_hit = float(np.mean(np.any(exact_texts == split.text_targets[:, None], axis=1)))
        return {
            "rows": [asdict(r) for r in rows],
            "served": {
                "nprobe": engine.nprobe,
                "refine_factor": engine.refine_factor,
                "tier_exact_factor": engine.exact_factor,
            },
            "text_target_in_exact_top10": round(text_hit, 4),
            "timed_queries": len(queries),
        }
    finally:
        engine.close()
        exact.close()


def run_real_bench(
    folder: Path,
    work: Path,
    *,
    image_queries: int,
    text_queries: int,
    timed: int,
    seed: int = 0,
    graph_candidate: bool = False,
) -> dict[str, Any]:
    """Load, split, build with the defaults, measure; one JSON-ready record."""
    real = load_real_set(folder)
    split = split_held_out(real, image_queries, text_queries, seed)
    started = time.perf_counter()
    index_dir = build_default(split, work, graph_candidate)
    build_s = round(time.perf_counter() - started, 2)
    exact_dir = build_served_exact(work)  # after the default's clock: not part of its build time
    default_threads = faiss.omp_get_max_threads()
    info = IndexDir(index_dir).load_info()
    result = measure(split, index_dir, exact_dir, timed, default_threads)
    return {
        "set": str(folder),
        "images": asdict(real.image_stats),
        "texts": asdict(real.text_stats) if real.text_stats is not None else None,
        "indexed": len(split.base),
        "held_out_image_queries": len(split.image_queries),
        "held_out_text_queries": len(split.text_queries),
        "text_source": split.text_source,
        "graph_candidate": graph_candidate,
        "default_threads": default_threads,
        "index": {
            "index_key": info.index_key,
            "nprobe": info.nprobe,
            "refine_factor": info.refine_factor,
            "tier": info.tier,
            "bytes_per_vector": info.bytes_per_vector,
            "build_s": build_s,
        },
        "claimed": claimed_recall(info.recall, info.refine),
        **result,
        "claim_minus_heldout": claim_gap(served_recall(info.recall, info.refine), result["rows"][-1]),
    }


def claim_gap(claimed: dict[str, float], served: dict[str, Any]) -> dict[str, float | None]:
    """The recall the index claims per family minus the held-out recall (positive: the claim is too high):
    in-distribution against held-out images, captions (else text-like) against held-out text queries."""
    text = claimed.get("captions", claimed.get("text-like"))
    images = claimed.get("in-distribution")
    return {
        "images": None if images is None else round(images - served["recall_images"], 4),
        "text": None if text is None else round(text - served["recall_text"], 4),
    }


def real_table(result: dict[str, Any]) -> str:
    """The markdown table of one set: a row per method, the latency ratios to exact beside."""
    rows = result["rows"]
    exact = rows[0]
    lines = [
        "| method | p50 ms, 1 thread | p99 ms, 1 thread | p50 ms, default threads | p99 ms, default threads "
        f"| p50 vs exact, 1 thread | p50 ms, 1 thread, blocks of {BLOCK} | vs exact, blocks "
        "| recall@10 images | recall@10 text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["one_thread"]["p50_ms"] / max(exact["one_thread"]["p50_ms"], 1e-9)
        blocks = r["one_thread_blocks"]["p50_ms"] / max(exact["one_thread_blocks"]["p50_ms"], 1e-9)
        lines.append(
            f"| {r['method']} | {r['one_thread']['p50_ms']} | {r['one_thread']['p99_ms']} "
            f"| {r['default_threads']['p50_ms']} | {r['default_threads']['p99_ms']} | {ratio:.2f}x "
            f"| {r['one_thread_blocks']['p50_ms']} | {blocks:.2f}x | {r['recall_images']} | {r['recall_text']} |"
        )
    served_exact = next((r for r in rows if r["method"] == EXACT_SERVED), None)
    if served_exact is not None:
        one, blocks = (rows[-1][t]["p50_ms"] / max(served_exact[t]["p50_ms"], 1e-9) for t in LATENCIES)
        lines.append(f"\nDefault against exact search served the same way: {one:.2f}x, in blocks {blocks:.2f}x.")
    claimed = result["claimed"]
    index = result["index"]
    tier = index["tier"]["key"] if index["tier"] else "no tier"
    lines.append(
        f"\n{result['set']}: {result['indexed']:,} indexed, {result['images']['dim']}-d; held out "
        f"{result['held_out_image_queries']} images and {result['held_out_text_queries']} {result['text_source']} "
        f"queries. Default: {index['index_key']} nprobe {index['nprobe']}, refine x{index['refine_factor']}, {tier}, "
        f"{index['bytes_per_vector']} B/vector, built in {index['build_s']} s. index.json claims recall@10 "
        f"{claimed['served']} (bound {claimed['served_bound']}; {claimed['per_family']}); claim minus held-out: "
        f"{result['claim_minus_heldout']}."
    )
    return "\n".join(lines)

"""`clip-hpc filter` over a real EMB_DIR gives exactly what brute force over its HDF5 vectors gives (text, image,
negative, top-N and caption-similarity queries, on one rank and under real `mpiexec -n 2`), and its tars hold every
sample's original bytes and caption, as the `webdataset` library and `clip-hpc embed` read them back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clip_hpc.bench.filter_rates import evict
from clip_hpc.cluster.world import World
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest.images import decode_image
from clip_hpc.model.loading import load_model
from clip_hpc.subsets import FilterOptions, filter_subset
from conftest import BIN, run_cli
from subsets_fixtures import Source, mixed_source  # noqa: F401  (the fixture)

TEXTS = ("a red kite", "green hills")
NEGATIVE = ("a blue boat",)


@pytest.fixture(scope="module")
def model():
    return load_model("clip-hpc-tiny", "none", "cpu")


def text_vectors(model, texts) -> np.ndarray:
    return model.encode_text(list(texts)) if texts else np.zeros((0, model.dim), np.float32)


def image_vector(model, path: str) -> np.ndarray:
    image = decode_image(path, min_size=model.image_size)
    return model.encode_images(torch.stack([model.preprocess(image)]))


def brute_force(
    source: Source, positives, negatives, threshold=None, top=None, min_similarity=None
) -> dict[int, float]:
    """id -> score of what must be kept, from every stored vector, the rule written out directly."""
    ids, vectors, similarity, _ = source.stored()
    score = (vectors @ positives.T).max(axis=1)
    negative = (vectors @ negatives.T).max(axis=1) if len(negatives) else np.full(len(ids), -np.inf)
    keep = [
        i
        for i in range(len(ids))
        if score[i] > negative[i]
        and (threshold is None or score[i] >= threshold)
        and (min_similarity is None or similarity[i] >= min_similarity)
    ]
    if top is not None:
        keep = sorted(keep, key=lambda i: (-score[i], ids[i]))[:top]
    return {int(ids[i]): float(score[i]) for i in keep}


def between_scores(source: Source, positives, quantile: float) -> float:
    """A threshold halfway between two stored scores: no image sits on it, so rounding cannot decide."""
    _, vectors, _, _ = source.stored()
    scores = np.unique((vectors @ positives.T).max(axis=1))
    at = int(quantile * (len(scores) - 1))
    return float((scores[at] + scores[at + 1]) / 2)


def kept_scores(out: Path) -> dict[int, float]:
    table = pq.read_table(out / "results.parquet")
    return dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))


def assert_same(found: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(found) == sorted(expected)
    assert all(abs(found[i] - expected[i]) < 1e-3 for i in expected)


def run_filter(source: Source, out: Path, **options) -> dict[int, float]:
    filter_subset(FilterOptions(str(source.emb), str(out), progress=False, **options), World())
    return kept_scores(out)


def test_exact_text_image_negative_topn_and_caption_similarity(mixed_source: Source, model, tmp_path):
    query_image = next(p for p in mixed_source.originals if p.endswith(".png") and "::" not in p)
    texts = text_vectors(model, TEXTS)
    positives = np.concatenate([texts, image_vector(model, query_image)])
    negatives = text_vectors(model, NEGATIVE)
    threshold = between_scores(mixed_source, positives, 0.4)
    cases = {
        "text": (
            {"texts": TEXTS},
            (texts, text_vectors(model, ())),
            {"threshold": between_scores(mixed_source, texts, 0.5)},
        ),
        "image+negative": (
            {"texts": TEXTS, "images": (query_image,), "negatives": NEGATIVE},
            (positives, negatives),
            {"threshold": threshold},
        ),
        "top": ({"texts": TEXTS, "images": (query_image,), "negatives": NEGATIVE}, (positives, negatives), {"top": 9}),
        "captions": (
            {"texts": TEXTS},
            (texts, text_vectors(model, ())),
            {"threshold": -1.0, "min_caption_similarity": float(np.nanmedian(mixed_source.stored()[2]))},
        ),
    }
    for name, (queries, vectors, rule) in cases.items():
        expected = brute_force(
            mixed_source, *vectors, **{k.replace("min_caption_", "min_"): v for k, v in rule.items()}
        )
        assert 0 < len(expected) < 48, name
        assert_same(run_filter(mixed_source, tmp_path / name, **queries, **rule), expected)
    image_hits = pq.read_table(tmp_path / "image+negative" / "results.parquet").to_pydict()
    assert image_hits["query"][image_hits["path"].index(query_image)] == 2  # its own image: the third positive wins
    report = json.loads((tmp_path / "top" / "filter.json").read_text())
    assert report["exact"] is True and report["counts"]["kept"] == 9 and report["counts"]["scanned"] == 48
    assert report["model"] == "clip-hpc-tiny" and report["queries"]["negatives"] == list(NEGATIVE)


# Both runs in one `mpiexec -n 2` (one start-up), each through the CLI's own entry as `clip-hpc filter ...` runs it.
TWO_RUNS = """
import json, sys
from clip_hpc.cli import main
runs = json.loads(sys.argv[1])
sys.exit(max(main(args) for args in runs))
"""


@pytest.mark.mpi
def test_two_ranks_give_brute_force_and_write_the_tars(mixed_source: Source, model, tmp_path):
    positives, negatives = text_vectors(model, TEXTS), text_vectors(model, NEGATIVE)
    threshold = between_scores(mixed_source, positives, 0.3)
    texts = [a for t in TEXTS for a in ("--text", t)]
    common = [*texts, "--negative", NEGATIVE[0], "--quiet", "--to", "tars", "--samples-per-tar", "5"]
    runs = [  # the first reads the shards around the page cache, from the disk: they are evicted first
        ["filter", str(mixed_source.emb), "--out", str(tmp_path / "thr"), "--threshold", str(threshold), *common]
        + ["--page-cache", "bypass"],
        ["filter", str(mixed_source.emb), "--out", str(tmp_path / "top"), "--top", "11", *common],
    ]
    evict(mixed_source.emb)
    proc = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", TWO_RUNS, json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert_same(kept_scores(tmp_path / "thr"), brute_force(mixed_source, positives, negatives, threshold=threshold))
    assert_same(kept_scores(tmp_path / "top"), brute_force(mixed_source, positives, negatives, top=11))
    for out in (tmp_path / "thr", tmp_path / "top"):
        report = json.loads((out / "filter.json").read_text())
        assert report["ranks"] == 2 and report["counts"]["tars"] == -(-report["counts"]["kept"] // 5)
        assert_tars_hold_the_subset(mixed_source, out)


def assert_tars_hold_the_subset(source: Source, out: Path) -> None:
    """Every kept image once, byte for byte, with its caption, as the webdataset library reads the tars."""
    import webdataset as wds

    results = pq.read_table(out / "results.parquet").to_pylist()
    tars = sorted(str(p) for p in (out / "tars").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == len(results)
    by_id = {row["id"]: row for row in results}
    seen = set()
    for sample in samples:
        record = json.loads(sample["json"])
        row = by_id[record["id"]]
        image = next(v for k, v in sample.items() if k not in ("__key__", "__url__", "txt", "json", "__local_path__"))
        assert image == source.originals[row["path"]], row["path"]
        assert sample["txt"].decode() == row["caption"] == record["caption"]
        assert record["path"] == row["path"] and record["url"] == row["url"]
        seen.add(record["id"])
    assert seen == set(by_id)


def test_tars_read_back_by_webdataset_and_embed(mixed_source: Source, model, tmp_path):
    out = tmp_path / "subset"
    positives = text_vectors(model, TEXTS)
    threshold = between_scores(mixed_source, positives, 0.5)
    run_filter(mixed_source, out, texts=TEXTS, threshold=threshold, to=("tars", "urls"), samples_per_tar=4)
    assert_tars_hold_the_subset(mixed_source, out)
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert any("::" in row["path"] and row["caption"] for row in results), "the subset should mix in tar members"
    assert any("::" not in row["path"] for row in results), "and loose files"
    urls = pq.read_table(out / "urls.parquet").to_pylist()
    assert urls == [{"url": r["url"], "caption": r["caption"]} for r in results if r["url"]] and urls
    loose = [r["path"] for r in results if "::" not in r["path"]]
    assert (out / "paths.txt").read_text().splitlines() == loose
    assert (out / "members.txt").read_text().splitlines() == [r["path"] for r in results if "::" in r["path"]]
    # clip-hpc embed reads the subset's tars and paths.txt as a file list: the same images give the same vectors
    run_cli("embed", out / "tars", "--file-list", out / "paths.txt", "--out", tmp_path / "again",
            "--model", "clip-hpc-tiny", "--pretrained", "none", "--workers", "0", check=True)  # fmt: skip
    again = list(EmbDir(tmp_path / "again").iter_shards())
    assert not sum(len(s.failed_ids) for s in again)
    ids, vectors, _, _ = mixed_source.stored()
    original = dict(zip(ids.tolist(), vectors))
    rows = [(p, m, c, v) for s in again for p, m, c, v in zip(s.paths, s.meta, s.captions, s.embeddings)]
    from_tars = [(json.loads(m)["key"], c, v) for p, m, c, v in rows if "::" in p]
    from_list = {p: v for p, m, c, v in rows if "::" not in p}
    assert len(from_tars) == len(results) and sorted(from_list) == sorted(loose)
    for key, caption, vector in from_tars:
        row = results[int(key)]
        assert caption == row["caption"]
        assert np.allclose(vector.astype(np.float32), original[row["id"]], atol=2e-3)
    by_path = {r["path"]: r["id"] for r in results}
    assert all(np.allclose(v.astype(np.float32), original[by_path[p]], atol=2e-3) for p, v in from_list.items())


def test_index_preview_is_marked_approximate_and_finds_what_the_scan_finds(mixed_source: Source, model, tmp_path):
    """Through a Flat index every candidate is found, so the preview must equal the exact scan; it still says it
    is approximate, since an IVF index need not."""
    run_cli("index", mixed_source.emb, "--out", tmp_path / "idx", "--index-key", "Flat", "--quiet", check=True)
    positives, negatives = text_vectors(model, TEXTS), text_vectors(model, NEGATIVE)
    threshold = between_scores(mixed_source, positives, 0.5)
    for name, rule in {"thr": {"threshold": threshold}, "top": {"top": 7}}.items():
        options = {"texts": TEXTS, "negatives": NEGATIVE, "progress": False, **rule}
        filter_subset(FilterOptions(str(tmp_path / "idx"), str(tmp_path / name), to=("tars",), **options), World())
        expected = brute_force(mixed_source, positives, negatives, **rule)
        assert_same(kept_scores(tmp_path / name), expected)
        report = json.loads((tmp_path / name / "filter.json").read_text())
        assert report["exact"] is False and report["counts"]["kept"] == len(expected)
        assert_tars_hold_the_subset(mixed_source, tmp_path / name)

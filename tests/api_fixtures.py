"""The demo index the Python API tests and the example notebook share (a pytest plugin, see conftest): two
WebDataset tars of captioned shapes (tar members: images read by offset), embedded with the demo model by the real
CLI and indexed, then served by a real `clip-hpc serve` for `connect`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clip_hpc.devdata.sample_images import captioned_samples, write_tar
from conftest import run_cli
from server_fixtures import Served, start_server

DEMO_N, DEMO_PER_TAR = 48, 24
SCORE_TOL = 1e-5  # float32 scores computed by the same code, in two processes


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-demo")
    samples = captioned_samples(DEMO_N, size=96)
    for t in range(DEMO_N // DEMO_PER_TAR):
        write_tar(root / "tars" / f"{t:05d}.tar", samples[t * DEMO_PER_TAR : (t + 1) * DEMO_PER_TAR])
    emb = ("--model", "clip-hpc-demo", "--workers", "0", "--shard-size", "24")
    run_cli("embed", root / "tars", "--out", root / "emb", *emb, check=True)
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    return root / "index"


@pytest.fixture(scope="session")
def demo_server(demo_index: Path, tmp_path_factory) -> Iterator[Served]:
    with start_server(demo_index, tmp_path_factory.mktemp("api-serve"), "--port", "0") as served:
        yield served


def pairs(hits) -> tuple[list[int], list[float]]:
    """(ids, scores) of API hits or of JSON hit dicts."""
    rows = [(h["id"], h["score"]) if isinstance(h, dict) else (h.id, h.score) for h in hits]
    return [i for i, _ in rows], [s for _, s in rows]


def assert_same(api_hits, other_hits) -> None:
    api_ids, api_scores = pairs(api_hits)
    other_ids, other_scores = pairs(other_hits)
    assert api_ids == other_ids and api_ids
    assert api_scores == pytest.approx(other_scores, abs=SCORE_TOL)

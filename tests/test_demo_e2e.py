"""The honest end-to-end semantic check: the shipped demo model through every stage (2 MPI ranks, shards,
IVF-PQ with refine, a real server) retrieves captioned shapes by colour and shape as well as exact search does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.devdata import captioned_shapes as cs
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.model.loading import load_model
from conftest import BIN, run_cli
from server_fixtures import start_server

N_IMAGES = 800  # enough vectors to train IVF16,PQ16x4 (16 x 39 points per codebook) in a second
QUERIES = [q for q in cs.colour_shape_queries() if q[0].startswith("a photo of")]  # 40: every colour-shape pair


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory) -> tuple[Path, list[cs.Attrs]]:
    """Captioned images -> `mpiexec -n 2 clip-hpc embed --model clip-hpc-demo` -> IVF-PQ index with refine."""
    root = tmp_path_factory.mktemp("demo-e2e")
    rows = cs.write_demo_images(root / "images", N_IMAGES, seed=cs.HELDOUT_SEED)
    proc = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "clip-hpc"),
            "embed",
            str(root / "images"),
            "--out",
            str(root / "emb"),
            "--model",
            "clip-hpc-demo",
            "--shard-size",
            "100",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    run_cli(
        "index", root / "emb", "--out", root / "index", "--index-key", "IVF16,PQ16x4", "--refine", "--quiet", check=True
    )
    return root, [a for _, _, a in rows]


def _attrs_by_name(attrs: list[cs.Attrs]) -> dict[str, cs.Attrs]:
    return {f"shape-{i:05d}.png": a for i, a in enumerate(attrs)}


def _server_ranking(client, names: list[str]) -> np.ndarray:
    """Top 10 per query as rows of `names`, through GET /api/search."""
    row_of = {n: i for i, n in enumerate(names)}
    ranked = np.full((len(QUERIES), 10), -1)
    for q, (text, _, _) in enumerate(QUERIES):
        resp = client.get("/api/search", params={"q": text, "k": 10})
        assert resp.status_code == 200, resp.text
        hits = [row_of[Path(r["path"]).name] for r in resp.json()["results"]]
        ranked[q, : len(hits)] = hits
    return ranked


@pytest.mark.mpi
@pytest.mark.slow
def test_served_ivfpq_recall_matches_exact_search_on_the_same_embeddings(demo_index, tmp_path):
    root, attrs = demo_index
    by_name = _attrs_by_name(attrs)
    shards = list(EmbDir(root / "emb").iter_shards())
    embeddings = np.concatenate([s.embeddings for s in shards]).astype(np.float32)
    names = [Path(p).name for s in shards for p in s.paths]
    assert len(names) == N_IMAGES and sum(len(s.failed_ids) for s in shards) == 0
    relevant = cs.colour_shape_relevance(QUERIES, [by_name[n] for n in names])

    text = load_model("clip-hpc-demo", device="cpu").encode_text([q for q, _, _ in QUERIES])
    exact = cs.retrieval_metrics(np.argsort(-(text @ embeddings.T), axis=1, kind="stable")[:, :10], relevant)
    with start_server(root / "index", tmp_path / "serve") as served, served.client() as client:
        server = cs.retrieval_metrics(_server_ranking(client, names), relevant)

    print(f"\ndemo e2e, {len(QUERIES)} queries: server {server}, exact {exact}")
    assert len(QUERIES) >= 20
    assert server["R@10"] >= 0.5, (server, exact)
    assert abs(server["R@10"] - exact["R@10"]) <= 0.02, (server, exact)

"""scripts/gpu_check.py must not rot between GPU runs: its dry run (every stage, CPU stand-ins) passes here; and the
torch k-means it checks on the GPU (index/gpu_train.py) trains IVF quantizers as well as FAISS does, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture
from clip_hpc.index.gpu_train import DEVICE_ENV, kmeans_device, pretrain_coarse_quantizer, train_ivf_centroids
from clip_hpc.index.stages import make_index

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "filter", "embed", "gpu_decode", "index", "serve")


def numbers(stage: dict) -> list[float]:
    """Every number in a stage's figures (not its checks), however deep."""
    found: list[float] = []

    def walk(value: object) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            found.append(float(value))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk({k: v for k, v in stage.items() if k != "checks"})
    return found


@pytest.mark.slow
def test_dry_run_has_every_stage_with_numbers_and_passing_checks(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    result = json.loads(out.read_text())
    failed = {n: s.get("error") or s["checks"] for n, s in result["stages"].items() if not s["ok"]}
    assert proc.returncode == 0 and result["ok"], (failed, proc.stderr[-3000:])
    assert tuple(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["checks"] and all(stage["checks"].values()), name
        assert stage["seconds"] > 0 and len(numbers(stage)) >= 3, name
    embed = result["stages"]["embed"]
    assert set(embed["end_to_end"]) == {"loose_cpu_decode", "loose_gpu_decode", "tar_cpu_decode", "tar_gpu_decode"}
    assert all(r["img_per_s"] > 0 for r in embed["end_to_end"].values())
    assert [r["clients"] for r in result["stages"]["serve"]["load"]] == [1, 8, 32]
    assert result["stages"]["index"]["build"]["timings"]["kmeans_torch_s"] > 0  # the build took the torch path
    assert [r["cache"] for r in result["stages"]["filter"]["rounds"]] == ["warm", "cold"]
    assert "| serve |" in proc.stdout


def mixture(n: int = 20_000, dim: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors, _ = gaussian_mixture(n, dim, clusters=200, noise=0.6, seed=1)
    rng = np.random.default_rng(2)
    queries = vectors[rng.choice(n, 300, replace=False)] + rng.normal(0, 0.05, (300, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, queries, exact_top_k(queries, vectors, 10)


def ivf_recall(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, torch_kmeans: bool) -> float:
    index = make_index("IVF128,Flat", vectors.shape[1])
    sample = vectors[: 128 * 40]
    if torch_kmeans:
        assert pretrain_coarse_quantizer(index, sample) is not None
        assert faiss.extract_index_ivf(index).quantizer.ntotal == 128
    index.train(sample)
    index.add_with_ids(vectors, np.arange(len(vectors)))
    faiss.extract_index_ivf(index).nprobe = 4
    return recall_at_k(index.search(queries, 10)[1], exact, 10)


def test_torch_kmeans_trains_the_quantizer_as_well_as_faiss(monkeypatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    vectors, queries, exact = mixture()
    faiss_recall = ivf_recall(vectors, queries, exact, torch_kmeans=False)
    torch_recall = ivf_recall(vectors, queries, exact, torch_kmeans=True)
    assert faiss_recall < 0.99  # a test that can tell a bad quantizer from a good one
    assert abs(torch_recall - faiss_recall) <= 0.02


def test_opq_chain_is_trained_first_and_the_build_keeps_the_centroids(monkeypatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    vectors, _ = gaussian_mixture(2_000, 32, clusters=50, seed=1)
    index = make_index("OPQ4,IVF32,PQ4", vectors.shape[1])
    assert pretrain_coarse_quantizer(index, vectors) is not None
    assert faiss.downcast_VectorTransform(index.chain.at(0)).is_trained
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, 32)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)  # spherical, as FAISS for IP
    index.train(vectors)  # FAISS skips its own k-means: the centroids stay
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 32), centroids)
    assert pretrain_coarse_quantizer(index, vectors) is None  # trained already: nothing to do


def test_device_choice(monkeypatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "faiss")
    assert kmeans_device() is None
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert kmeans_device() == "cpu"
    monkeypatch.delenv(DEVICE_ENV)
    import torch

    assert kmeans_device(3) == (f"cuda:{3 % torch.cuda.device_count()}" if torch.cuda.is_available() else None)
    assert train_ivf_centroids(np.eye(4, dtype=np.float32).repeat(10, 0), 4, "cpu", spherical=True).shape == (4, 4)

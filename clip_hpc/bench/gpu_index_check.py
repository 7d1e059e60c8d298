"""The index part of `scripts/gpu_check.py`: coarse-quantizer training on the CPU, through torch and through FAISS
on the GPU, scored by recall at the same nprobe, then a real build that must take the GPU path. In the package so
the script imports it like any benchmark code, without touching sys.path."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def stage_index(p: dict[str, Any], work: Path) -> dict[str, Any]:
    """Coarse-quantizer training on the build's own sample, FAISS on the CPU vs the GPU path, scored by IVF-Flat
    recall@10 at the same nprobe; then a real build through build.py's hook."""
    import faiss

    from clip_hpc.ann.ground_truth import exact_top_k, recall_at_k
    from clip_hpc.devdata.synthetic_vectors import gaussian_mixture
    from clip_hpc.index.choose import choose_index_key, choose_train_size, ivf_lists
    from clip_hpc.index.gpu_train import DEVICE_ENV, kmeans_device, pretrain_coarse_quantizer
    from clip_hpc.index.stages import gpu_index, make_index

    n, dim = p["vectors"], p["dim"]
    vectors, _ = gaussian_mixture(n, dim, clusters=max(10, n // 500), seed=3)
    nlist = ivf_lists(choose_index_key(n, dim)) or 64
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(n, choose_train_size(n, f"IVF{nlist},Flat"), replace=False))]
    queries = vectors[rng.choice(n, p["queries"], replace=False)]
    queries = queries + rng.normal(0, 0.3 / np.sqrt(dim), queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = exact_top_k(queries, vectors, 10)
    faiss_gpu = faiss.get_num_gpus() > 0
    if p["device"] == "cpu":
        os.environ[DEVICE_ENV] = "cpu"  # the dry run's stand-in: the same torch k-means on the CPU

    def trained(path: str) -> tuple[float, float]:
        index = make_index(f"IVF{nlist},Flat", dim)
        t0 = time.perf_counter()
        if path == "faiss_gpu":
            gpu = gpu_index(index)
            if gpu is None:  # only listed when FAISS sees a GPU; an IVF-Flat index always has a GPU version
                raise RuntimeError("FAISS sees a GPU but gave no GPU copy of the IVF-Flat index")
            gpu.train(sample)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            if path == "torch":
                pretrain_coarse_quantizer(index, sample)
            index.train(sample)
        seconds = time.perf_counter() - t0
        index.add_with_ids(vectors, np.arange(n))
        faiss.extract_index_ivf(index).nprobe = max(1, nlist // 128)
        return round(seconds, 3), round(recall_at_k(index.search(queries, 10)[1], exact, 10), 4)

    paths = ["faiss_cpu", "torch"] + (["faiss_gpu"] if faiss_gpu else [])
    results = {name: dict(zip(("train_s", "recall_at_10"), trained(name))) for name in paths}
    gpu_path = "faiss_gpu" if faiss_gpu else "torch"
    out: dict[str, Any] = {
        "vectors": n,
        "dim": dim,
        "nlist": nlist,
        "train_sample": len(sample),
        "nprobe": max(1, nlist // 128),
        "kmeans_device": kmeans_device(),
        "train": results,
        "gpu_path": gpu_path,
        "train_speedup": round(results["faiss_cpu"]["train_s"] / results[gpu_path]["train_s"], 2),
    }
    out["build"] = build_through_hook(p, work, faiss_gpu)
    out["checks"] = {
        "recall_within_0.01": abs(results[gpu_path]["recall_at_10"] - results["faiss_cpu"]["recall_at_10"]) <= 0.01,
        "build_used_gpu_path": out["build"]["gpu_path_used"],
        "build_self_check_recall": out["build"]["self_check_recall"] is not None,
    }
    return out


def build_through_hook(p: dict[str, Any], work: Path, faiss_gpu: bool) -> dict[str, Any]:
    """`clip-hpc index`'s build on an EMB_DIR: its training step must take the GPU path (FAISS GPU or torch)."""
    from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir
    from clip_hpc.index.build import build_index

    vectors, labels = gaussian_mixture(p["build_vectors"], p["dim"], clusters=100, seed=5)
    emb = write_emb_dir(work / "build-emb", vectors, labels, shard_size=20_000)
    info = build_index(emb, work / "build-index", progress=False)
    return {
        "index_key": info.index_key,
        "timings": info.timings,
        "self_check_recall": info.recall.get("served"),
        "gpu_path_used": faiss_gpu or "kmeans_torch_s" in info.timings,
    }

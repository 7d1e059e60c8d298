#!/usr/bin/env python3
"""Every GPU path of the project, timed and checked, in one command: environment, the filter's exact scan against the
read-only rate, embed (end to end on loose files and tars, decode-only, model-only in bf16, GPU vs CPU fp32), the
device JPEG route, IVF training on the GPU, and serving with --device cuda. Prints one JSON document and a table;
writes the JSON to --out after every stage, so a run cut short still leaves what it measured.

    python scripts/gpu_check.py --out FILE [--dry-run] [--images 3000] [--vectors 1000000]

--dry-run: toy sizes, the CPU standing in for the GPU (the device decode through torchvision's CPU decoder, the
torch k-means on the CPU): proves the script and its checks on any machine (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from clip_hpc.bench import filter_rates, gpu_index_check

PHOTO_SIZES = [(640, 480), (800, 600), (1024, 768), (480, 640), (1280, 960), (1600, 1200)]
SERVE_CLIENTS = (1, 8, 32)


# --- sizes -------------------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What each stage runs on: the GPU sizes of the issue, or toy sizes on the CPU for --dry-run."""
    import torch

    from clip_hpc.ingest.gpu_decode import GPU_BATCH_SIZE

    cuda = torch.cuda.is_available() and not args.dry_run
    if args.dry_run:
        return {
            "device": "cpu",
            "model": "clip-hpc-tiny",
            "images": args.images or 48,
            "batch": 16,
            "workers": 1,
            "vectors": args.vectors or 20_000,
            "dim": 128,
            "build_vectors": 12_000,
            "serve_vectors": 2_000,
            "requests": 24,
            "model_seconds": 1.0,
            "queries": 100,
            "filter_vectors": 20_000,
            "filter_shard_size": 5_000,
            "filter_rounds": 1,
        }
    if not cuda:
        raise SystemExit("gpu_check: torch sees no CUDA device; run with --dry-run on a machine without one")
    return {
        "device": "cuda",
        "model": "ViT-B-32",
        "images": args.images or 3000,
        "batch": GPU_BATCH_SIZE,
        "workers": max(1, (os.cpu_count() or 2) - 1),
        "vectors": args.vectors or 1_000_000,
        "dim": 512,
        "build_vectors": 60_000,
        "serve_vectors": 100_000,
        "requests": 320,
        "model_seconds": 8.0,
        "queries": 500,
        "filter_vectors": 1_000_000,
        "filter_shard_size": 50_000,
        "filter_rounds": 2,
    }


# --- environment ---------------------------------------------------------------------------------------------------
def stage_environment(p: dict[str, Any], work: Path) -> dict[str, Any]:
    import faiss
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "gpu": props.name if props else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "run_on": p["device"],
    }
    out["checks"] = {
        "torch_at_least_2_4": tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4),
        "device_usable": p["device"] == "cpu" or cuda,
    }
    return out


# --- images --------------------------------------------------------------------------------------------------------
def _write_photo(job: tuple[Path, int]) -> None:
    from clip_hpc.devdata.sample_images import synth_image

    path, i = job
    rng = np.random.default_rng(i)
    synth_image(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)]).save(path, "JPEG", quality=int(rng.integers(80, 95)))


def make_images(n: int, work: Path) -> tuple[Path, Path]:
    """`n` photo-like JPEGs (640x480 and larger) in a pool, the awkward kinds beside them, and the same as tars."""
    from clip_hpc.devdata.sample_images import pack_into_tars, write_bad_images
    from clip_hpc.ingest.sources import list_images

    loose = work / "images"
    (loose / "photos").mkdir(parents=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_photo, [(loose / "photos" / f"{i:06d}.jpg", i) for i in range(n)], chunksize=16)
    write_bad_images(loose / "bad")
    pack_into_tars([Path(x) for x in list_images([loose])], work / "tars", max(16, n // 16))
    return loose, work / "tars"


# --- embed ---------------------------------------------------------------------------------------------------------
def run_embed(p: dict[str, Any], source: Path, out: Path, decode: str) -> tuple[dict[str, Any], Any]:
    """One in-process `clip-hpc embed` (the package's loop, not a copy); img/s over the loop's own time."""
    from clip_hpc.formats.emb_dir import EmbDir
    from clip_hpc.ingest.embed import EmbedConfig, embed

    summary = embed(
        EmbedConfig(
            inputs=[str(source)],
            out=str(out),
            model=p["model"],
            pretrained="none",
            batch_size=p["batch"],
            workers=p["workers"],
            shard_size=10**6,
            device=p["device"],
            decode=decode,
            progress=False,
            dtype="float32",
        )
    )
    rank = summary["per_rank"][0]
    done = rank["embedded"] + rank["failed"]
    return {"images": done, "failed": rank["failed"], "img_per_s": round(done / rank["seconds"], 1)}, EmbDir(
        out
    ).read_shard(0)


def failures(shard: Any) -> dict[int, str]:
    return dict(zip(map(int, shard.failed_ids), shard.failed_reasons))


def device_decode_rate(p: dict[str, Any], loose: Path) -> float:
    """The reader alone on the device route: workers read bytes, the device decodes and preprocesses."""
    import torch
    from torch.utils.data import DataLoader

    from clip_hpc.ingest.gpu_decode import choose_route
    from clip_hpc.ingest.image_dataset import ImageDataset, collate
    from clip_hpc.ingest.sources import list_images
    from clip_hpc.model.loading import load_model

    loaded = load_model(p["model"], "none", device=p["device"])
    paths = list_images([loose])
    route = choose_route("gpu", loaded, paths, collate)
    dataset = route.dataset(ImageDataset(range(len(paths)), paths, loaded.preprocess, loaded.image_size, 10**9))
    loader = DataLoader(
        dataset,
        batch_size=p["batch"],
        num_workers=p["workers"],
        collate_fn=route.collate,
        pin_memory=p["device"] == "cuda",
    )
    t0, n = time.perf_counter(), 0
    for batch in route.batches(loader):
        n += len(batch["ids"])
    if p["device"] == "cuda":
        torch.cuda.synchronize()
    return round(n / (time.perf_counter() - t0), 1)


def stage_embed(p: dict[str, Any], work: Path, images: tuple[Path, Path]) -> dict[str, Any]:
    from clip_hpc.bench.embed_rates import decode_rate, model_rate

    loose, tars = images
    runs = {}
    for kind, source in (("loose", loose), ("tar", tars)):
        for decode in ("cpu", "gpu"):
            runs[f"{kind}_{decode}_decode"], _ = run_embed(p, source, work / f"emb-{kind}-{decode}", decode)
    out: dict[str, Any] = {
        "model": p["model"],
        "batch": p["batch"],
        "workers": p["workers"],
        "end_to_end": runs,
        "decode_only_cpu_workers_img_per_s": round(decode_rate(loose, p["model"], p["workers"], p["batch"]), 1),
        "decode_only_device_img_per_s": device_decode_rate(p, loose),
        "model_only_img_per_s": model_only_rate(p),
        "model_only_with_host_copy_img_per_s": round(model_rate(p["model"], p["batch"], p["model_seconds"]), 1),
        "model_only_precision": "bf16" if p["device"] == "cuda" else "fp32 (CPU)",
    }
    out["fp32_device_vs_cpu_min_cosine"] = device_vs_cpu_cosine(p, loose)
    out["checks"] = {
        "all_runs_embedded": all(r["images"] > 0 for r in runs.values()),
        "fp32_cosine_at_least_0.999": out["fp32_device_vs_cpu_min_cosine"] >= 0.999,
    }
    return out


def model_only_rate(p: dict[str, Any]) -> float:
    """Inference alone on a batch already on the device (bench_embed's model_rate copies it from the host each
    time, which on a GPU measures the copy as much as the model)."""
    import torch

    from clip_hpc.model.loading import load_model

    loaded = load_model(p["model"], "none", device=p["device"])
    x = torch.randn(p["batch"], 3, loaded.image_size, loaded.image_size, device=loaded.device)
    loaded.encode_images(x)  # warm-up (and cuDNN's choice of kernels)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < p["model_seconds"]:
        loaded.encode_images(x)  # returns host numpy: each call waits for the GPU
        n += p["batch"]
    return round(n / (time.perf_counter() - t0), 1)


def device_vs_cpu_cosine(p: dict[str, Any], loose: Path, n: int = 64) -> float:
    """The same 64 preprocessed images through the model on the device and on the CPU, both fp32."""
    import torch

    from clip_hpc.ingest.images import decode_image
    from clip_hpc.model.loading import load_model

    photos = sorted((loose / "photos").glob("*.jpg"))[:n]
    on_cpu = load_model(p["model"], "none", device="cpu", precision="fp32")
    on_device = load_model(p["model"], "none", device=p["device"], precision="fp32")
    pixels = torch.stack([on_cpu.preprocess(decode_image(x, min_size=on_cpu.image_size)) for x in photos])
    cosine = np.sum(on_cpu.encode_images(pixels) * on_device.encode_images(pixels), axis=1)
    return round(float(cosine.min()), 6)


def stage_gpu_decode(p: dict[str, Any], work: Path, images: tuple[Path, Path]) -> dict[str, Any]:
    """The device route against the CPU route on the same files: same failures, near-identical embeddings (the CPU
    decodes JPEGs at draft scale, the device at full size)."""
    _, cpu = run_embed(p, images[0], work / "dec-cpu", "cpu")
    _, dev = run_embed(p, images[0], work / "dec-gpu", "gpu")
    cosine = np.sum(np.asarray(cpu.embeddings) * np.asarray(dev.embeddings), axis=1)
    out = {
        "failed_cpu_route": failures(cpu),
        "failed_device_route": failures(dev),
        "embedded": len(dev.ids),
        "min_cosine_device_vs_cpu_decode": round(float(cosine.min()), 6),
    }
    out["checks"] = {
        "same_failure_records": out["failed_cpu_route"] == out["failed_device_route"],
        "failures_recorded": len(out["failed_cpu_route"]) >= 4,
        "same_ids": list(cpu.ids) == list(dev.ids),
        "cosine_at_least_0.99": out["min_cosine_device_vs_cpu_decode"] >= 0.99,
    }
    return out


# --- index ---------------------------------------------------------------------------------------------------------
# --- serve ---------------------------------------------------------------------------------------------------------
def stage_serve(p: dict[str, Any], work: Path) -> dict[str, Any]:
    """`clip-hpc serve --device DEVICE` under 1, 8 and 32 clients (bench_serve's load generator and check)."""
    from clip_hpc.bench import serve_load
    from clip_hpc.client.process import serve_child
    from clip_hpc.model.loading import load_model

    index, index_info = serve_load.build(work / "serve", p["model"], p["serve_vectors"], "auto")
    rows = []
    with serve_child(
        index, work / "serve", "--port", "0", "--device", p["device"], env={"CLIP_HPC_TOKEN": serve_load.TOKEN}
    ) as child:
        url = child.endpoint.base_url
        asyncio.run(serve_load.load(url, 4, serve_load.query_texts(16, seed=999)))  # warm up
        for clients in SERVE_CLIENTS:
            texts = serve_load.query_texts(max(p["requests"], 4 * clients), seed=clients)
            rows.append(asyncio.run(serve_load.load(url, clients, texts)))
        reference = load_model(p["model"], "none", device="cpu", full_context=True)
        same = serve_load.served_equals_full_context(url, index, reference, serve_load.query_texts(10, seed=7))
    out = {
        "index": index_info,
        "device": p["device"],
        "load": rows,
        "served_vs_cpu_encoder": same,
        "server_precision": "bf16 (load_model's auto on CUDA)" if p["device"] == "cuda" else "fp32",
    }
    out["checks"] = {
        "no_errors": all(r["errors"] == 0 for r in rows),
        "vector_within_1e-3": same["max_abs_vector_diff"] <= 1e-3,
    }
    return out


# --- driver --------------------------------------------------------------------------------------------------------
def run_stage(name: str, fn: Callable[[], dict[str, Any]], result: dict[str, Any], out: Path) -> None:
    """Time a stage; an exception is that stage's failure (recorded), not the end of the check."""
    t0 = time.perf_counter()
    try:
        stage = fn()
    except Exception as exc:
        stage = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
            "checks": {"ran": False},
        }
    stage["seconds"] = round(time.perf_counter() - t0, 1)
    stage["ok"] = all(stage["checks"].values())
    result["stages"][name] = stage
    result["ok"] = all(s["ok"] for s in result["stages"].values())
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"gpu_check: {name} {'ok' if stage['ok'] else 'FAILED'} in {stage['seconds']} s", file=sys.stderr, flush=True)


def table(result: dict[str, Any]) -> str:
    s = result["stages"]
    lines = ["| stage | s | ok | figures |", "|---|---|---|---|"]
    figures = {
        "environment": lambda x: (
            f"torch {x['torch']}, CUDA {x['cuda']}, {x['gpu']}, faiss {x['faiss']} ({x['faiss_gpus']} GPUs)"
        ),
        "filter": lambda x: (
            "scan / read-only, median: warm {warm}, cold {cold} (goal 0.8); ".format(**x["median_ratio"])
            + f"top {x['top_check']['rows']} equal to the CPU scan's: {x['checks']['top_rows_equal_cpu']}"
        ),
        "embed": lambda x: (
            ", ".join(f"{k} {v['img_per_s']} img/s" for k, v in x["end_to_end"].items())
            + f"; decode-only CPU {x['decode_only_cpu_workers_img_per_s']}, "
            f"device {x['decode_only_device_img_per_s']}; "
            f"model-only {x['model_only_img_per_s']} ({x['model_only_precision']}); fp32 cosine "
            f"{x['fp32_device_vs_cpu_min_cosine']}"
        ),
        "gpu_decode": lambda x: (
            f"{len(x['failed_cpu_route'])} failures, same: "
            f"{x['checks']['same_failure_records']}; cosine {x['min_cosine_device_vs_cpu_decode']}"
        ),
        "index": lambda x: (
            ", ".join(f"{k} train {v['train_s']} s recall {v['recall_at_10']}" for k, v in x["train"].items())
            + f"; build {x['build']['index_key']}"
        ),
        "serve": lambda x: (
            ", ".join(
                f"{r['clients']} clients p50 {r['p50_ms']} p99 {r['p99_ms']} ms {r['qps']} q/s" for r in x["load"]
            )
            + f"; vector diff {x['served_vs_cpu_encoder']['max_abs_vector_diff']:.2g}"
        ),
    }
    for name, stage in s.items():
        try:
            text = stage.get("error") or figures[name](stage)
        except (KeyError, TypeError) as exc:
            text = f"(missing {exc})"
        lines.append(f"| {name} | {stage['seconds']} | {'yes' if stage['ok'] else 'NO'} | {text} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON document goes here")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (see above)")
    ap.add_argument("--images", type=int, default=0, help="generated JPEGs (default 3000; dry run 48)")
    ap.add_argument("--vectors", type=int, default=0, help="vectors for the training check (default 1M; dry 20k)")
    ap.add_argument("--stages", default="environment,filter,embed,gpu_decode,index,serve")
    args = ap.parse_args()
    p = plan(args)
    result: dict[str, Any] = {"dry_run": args.dry_run, "plan": p, "stages": {}, "ok": True}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        stages = args.stages.split(",")
        images = make_images(p["images"], work) if {"embed", "gpu_decode"} & set(stages) else None
        result["images_s"] = round(time.perf_counter() - t0, 1)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "environment": lambda: stage_environment(p, work),
            "filter": lambda: filter_rates.stage_filter(p, work),
            "embed": lambda: stage_embed(p, work, images),
            "gpu_decode": lambda: stage_gpu_decode(p, work, images),
            "index": lambda: gpu_index_check.stage_index(p, work),
            "serve": lambda: stage_serve(p, work),
        }
        for name in stages:
            run_stage(name, steps[name], result, args.out)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print(table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

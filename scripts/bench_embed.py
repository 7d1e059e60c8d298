#!/usr/bin/env python3
"""Embedding throughput: end to end with 1 and 2 MPI ranks, plus decode-only and model-only rates, so that the
bottleneck is visible; each end-to-end run on loose files, on the same files packed into WebDataset tars, and (with
`s3` in `--inputs`, needs `moto[server]` and s3fs) on the same tars in a local S3 server (moto, 127.0.0.1), side by
side. With `--captions`, also captioned tars embedded without and with `embed --captions`, side
by side, so the cost of the caption embeddings is one row apart. Prints a JSON document, then a table.

    python scripts/bench_embed.py [--images 256] [--models clip-hpc-tiny,ViT-B-32] [--ranks 1,2] [--inputs loose,tar,s3]
                                  [--captions]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clip_hpc.bench.embed_rates import decode_rate, model_rate
from clip_hpc.devdata.local_s3 import moto_server, s3_env, upload
from clip_hpc.devdata.sample_images import pack_into_tars, write_sample_tars
from clip_hpc.ingest.sources import list_images

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_ranks(
    images: Path | str,
    model: str,
    ranks: int,
    n: int,
    batch: int,
    workers: int,
    tmp: Path,
    inputs: str = "loose",
    captions: bool = False,
    env: dict[str, str] | None = None,
) -> dict:
    """One fresh `clip-hpc embed` under mpiexec; the rate counts images over the slowest rank's loop time."""
    out = tmp / f"emb-{model}-{ranks}-{inputs}-{int(captions)}".replace(" ", "_")
    code = (
        "import json, sys; from clip_hpc.ingest.embed import EmbedConfig, embed; "
        "from clip_hpc.cluster.jobenv import job_env, use_threads; from clip_hpc.cluster.world import world; "
        "use_threads(job_env().threads_per_rank(world().local_size)); "  # as `clip-hpc embed` sizes its threads
        "s = embed(EmbedConfig(inputs=[sys.argv[1]], out=sys.argv[2], model=sys.argv[3], pretrained='none', "
        "batch_size=int(sys.argv[4]), workers=int(sys.argv[5]), shard_size=int(sys.argv[6]), progress=False, "
        "captions=sys.argv[7] == '1')); "
        "print('BENCH' + json.dumps(s['per_rank'], default=str)) if s['per_rank'] else None"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            str(ranks),
            sys.executable,
            "-c",
            code,
            str(images),
            str(out),
            model,
            str(batch),
            str(workers),
            str(max(1, n // (4 * ranks))),
            str(int(captions)),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - t0
    per_rank = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("BENCH")))
    loop = max(r["seconds"] for r in per_rank)
    return {
        "model": model,
        "inputs": inputs + (" --captions" if captions else ""),
        "ranks": ranks,
        "images": n,
        "img_per_s": n / loop,
        "wall_s_with_startup": wall,
        "per_rank_img_per_s": [(r["embedded"] + r["failed"]) / r["seconds"] for r in per_rank if r["seconds"]],
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--big-model-images", type=int, default=64, help="fewer images for ViT-B-32 on a CPU")
    ap.add_argument("--models", default="clip-hpc-tiny,ViT-B-32")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--inputs",
        default="loose,tar",
        help="loose files, and/or the same files packed into tars, and/or those tars in a local S3 server (s3)",
    )
    ap.add_argument("--per-tar", type=int, default=64, help="samples per tar for the tar runs")
    ap.add_argument(
        "--captions", action="store_true", help="add captioned tars embedded without and with --captions, side by side"
    )
    return ap.parse_args()


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def sample_inputs(tmp: Path, n: int, kinds: list[str], per_tar: int, s3: str | None) -> tuple[Path, Path]:
    """`n` sample images as loose files, and packed into tars (uploaded to the local S3 server when there is one)."""
    images = tmp / f"images-{n}"
    if not images.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_sample_images.py"), str(images), "-n", str(n)],
            check=True,
            capture_output=True,
        )
    tars = tmp / f"tars-{n}"
    if ("tar" in kinds or "s3" in kinds) and not tars.exists():
        pack_into_tars([Path(p) for p in list_images([images])], tars, per_tar)
        if s3:
            upload(s3, {f"bench/{tars.name}/{p.name}": p for p in sorted(tars.glob("*.tar"))})
    return images, tars


def model_runs(model: str, n: int, args: argparse.Namespace, tmp: Path, s3: str | None) -> list[dict]:
    """Every rank count, each input kind side by side (so all see the same machine load), then the captioned tars."""
    kinds = args.inputs.split(",")
    images, tars = sample_inputs(tmp, n, kinds, args.per_tar, s3)
    runs = []
    for ranks in map(int, args.ranks.split(",")):
        for kind in kinds:
            source = {"tar": tars, "s3": f"s3://bench/{tars.name}/"}.get(kind, images)
            env = s3_env(s3) if kind == "s3" and s3 else None
            runs.append(run_ranks(source, model, ranks, n, args.batch_size, args.workers, tmp, kind, env=env))
        if args.captions:  # the shapes' real captions; without, then with the text tower
            captioned, per = tmp / f"captioned-{n}", min(n, args.per_tar)
            if not captioned.exists():
                write_sample_tars(captioned, -(-n // per), per)
            for with_captions in (False, True):
                runs.append(
                    run_ranks(
                        captioned,
                        model,
                        ranks,
                        -(-n // per) * per,
                        args.batch_size,
                        args.workers,
                        tmp,
                        "captioned tar",
                        with_captions,
                    )
                )
    return runs


def print_table(results: dict) -> None:
    print(
        "\n| model | inputs | ranks | end-to-end img/s | with start-up and listing img/s | decode-only img/s | "
        "model-only img/s |\n|---|---|---|---|---|---|---|"
    )
    for r in results["runs"]:
        print(
            f"| {r['model']} | {r['inputs']} | {r['ranks']} | {r['img_per_s']:.1f} | "
            f"{r['images'] / r['wall_s_with_startup']:.1f} | "
            f"{results['decode_only'][r['model']]:.1f} | "
            f"{results['model_only'][r['model']]:.1f} |"
        )


def main() -> None:
    args = parse_args()
    results: dict = {"machine": machine(), "runs": [], "decode_only": {}, "model_only": {}}
    with tempfile.TemporaryDirectory() as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        s3 = stack.enter_context(moto_server()) if "s3" in args.inputs.split(",") else None
        for model in args.models.split(","):
            n = args.images if model == "clip-hpc-tiny" else args.big_model_images
            results["runs"] += model_runs(model, n, args, tmp, s3)
            images = tmp / f"images-{n}"
            results["decode_only"][model] = decode_rate(images, model, max(1, args.workers), args.batch_size)
            results["model_only"][model] = model_rate(model, args.batch_size)
    print(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()

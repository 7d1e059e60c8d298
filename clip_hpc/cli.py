"""`clip-hpc` and its subcommands. Thin: each parses its arguments and calls one stage's public entry.

Any `UserError` becomes a one-line message and exit code 2; a traceback is a bug.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from clip_hpc.errors import UserError

Handler = Callable[[argparse.Namespace], int]


# --- embed -----------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, default_model: str = "ViT-B-32") -> None:
    p.add_argument("--model", default=default_model, help="open_clip model name, or clip-hpc-tiny / clip-hpc-demo")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag (from the cache), a local checkpoint path, or 'none' for random weights "
                        "(default: the model's bundled weights or laion2b_s34b_b79k for ViT-B-32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def cmd_embed(args: argparse.Namespace) -> int:
    from clip_hpc.embed import EmbedConfig, embed

    summary = embed(EmbedConfig(
        inputs=args.inputs, out=args.out, file_list=args.file_list, model=args.model, pretrained=args.pretrained,
        batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size, precision=args.precision,
        device=args.device, append=args.append, dtype=args.dtype, max_pixels=args.max_pixels))
    # Rank 0 speaks for an MPI job (only it gathers per_rank and writes the manifest); other ranks exit 0.
    if summary is None or summary.get("per_rank") is None:
        return 0
    return 0 if summary.get("complete", True) else 1


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images on all ranks into HDF5 shards (resumable)")
    p.add_argument("inputs", nargs="*", help="image files or directories (searched recursively)")
    p.add_argument("--out", required=True, help="EMB_DIR: shards, inputs.txt and manifest.json go here")
    p.add_argument("--file-list", help="a text file with one image path per line")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank (default: SLURM_CPUS_PER_TASK-1 or 2)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per work unit / shard")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored embedding dtype")
    p.add_argument("--max-pixels", type=int, default=None, help="skip images with more pixels (decompression bombs)")
    p.add_argument("--append", action="store_true", help="add new files in the inputs as new units at the end")
    p.set_defaults(func=cmd_embed)


# --- info ------------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from clip_hpc.info import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe an EMB_DIR or INDEX_DIR")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


# --- fetch-model -----------------------------------------------------------------------------------------------
def cmd_fetch_model(args: argparse.Namespace) -> int:
    from clip_hpc.models import fetch_model

    print(fetch_model(args.name, args.tag, args.cache_dir))
    return 0


def add_fetch_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download weights once, on a node with internet, for offline compute nodes")
    p.add_argument("name")
    p.add_argument("tag")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_fetch_model)


# --- index, search, serve, check-ports, demo: registered below as their stages land -----------------------------


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [add_embed, add_info, add_fetch_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-hpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"clip-hpc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clip-hpc {args.command}: interrupted", file=sys.stderr)
        return 130

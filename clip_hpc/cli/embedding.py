"""`clip-hpc embed`, `info`, `fetch-model` and `export`: the commands about embeddings and models."""

from __future__ import annotations

import argparse
import json


# --- embed -----------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, default_model: str = "ViT-B-32") -> None:
    p.add_argument("--model", default=default_model, help="open_clip model name, or clip-hpc-tiny / clip-hpc-demo")
    p.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (from the cache), a local checkpoint path, or 'none' for random weights "
        "(default: the model's bundled weights or laion2b_s34b_b79k for ViT-B-32)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def cmd_embed(args: argparse.Namespace) -> int:
    from clip_hpc.cluster.jobenv import job_env, use_threads
    from clip_hpc.cluster.world import world
    from clip_hpc.ingest.embed import EmbedConfig, embed

    use_threads(job_env().threads_per_rank(world().local_size))  # this rank's share of the node's CPUs
    summary = embed(
        EmbedConfig(
            inputs=args.inputs,
            out=args.out,
            file_list=args.file_list,
            model=args.model,
            pretrained=args.pretrained,
            batch_size=args.batch_size,
            workers=args.workers,
            shard_size=args.shard_size,
            precision=args.precision,
            device=args.device,
            append=args.append,
            dtype=args.dtype,
            max_pixels=args.max_pixels,
            decode=args.decode,
            captions=args.captions,
        )
    )
    return 0 if summary["complete"] else 1  # rank 0 decides for an MPI job and tells every rank


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images on all ranks into HDF5 shards (resumable)")
    p.add_argument(
        "inputs",
        nargs="*",
        help="image files, WebDataset .tar shards (or a quoted brace pattern like "
        "'data/{00000..00099}.tar') or directories (searched recursively); "
        "any of them may be a URL (s3://bucket/prefix/, s3://b/{00..09}.tar: "
        "pip install 'clip-hpc[s3]'; credentials and AWS_ENDPOINT_URL from "
        "the standard AWS sources)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="EMB_DIR: shards, inputs.txt and manifest.json go here; a directory "
        "on a POSIX file system, never a URL (HDF5 needs one)",
    )
    p.add_argument("--file-list", help="a text file with one image or tar path (or URL) per line")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers per rank (default: SLURM_CPUS_PER_TASK-1, at most the CPUs this task may "
        "run on, or 2)",
    )
    p.add_argument("--shard-size", type=int, default=10000, help="images per work unit / shard")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored embedding dtype")
    p.add_argument("--max-pixels", type=int, default=None, help="skip images with more pixels (decompression bombs)")
    p.add_argument("--append", action="store_true", help="add new files in the inputs as new units at the end")
    p.add_argument(
        "--captions",
        action="store_true",
        help="also embed each image's caption (tar .txt/.json) with the model's text tower and store the "
        "image-caption cosine 'similarity'; costs one text encode per captioned image (see the "
        "README's embedding table) and a second embedding per row on disk",
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="who decodes JPEGs: cpu (DataLoader workers), gpu (nvJPEG on the model's device, the rest "
        "on the CPU), auto (gpu for a CUDA model on mostly-JPEG inputs)",
    )
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
    from clip_hpc.cluster.profile import profile_weights_dir
    from clip_hpc.model.loading import fetch_model

    print(fetch_model(args.name, args.tag, args.cache_dir or profile_weights_dir(args.profile)))
    return 0


def add_fetch_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download weights once, on a node with internet, for offline compute nodes")
    p.add_argument("name")
    p.add_argument("tag")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where to cache (default: the profile's CLIP_HPC_WEIGHTS, where its jobs look)",
    )
    p.add_argument("--profile", default=None, help="the jobs' cluster profile (default: $CLIP_HPC_PROFILE, if set)")
    p.set_defaults(func=cmd_fetch_model)


def cmd_export(args: argparse.Namespace) -> int:
    from clip_hpc.export import export_embeddings

    done = export_embeddings(args.emb_dir, args.out, args.format)
    print(f"{args.out}: {done['rows']} embeddings in {done['files']} img_emb/metadata file pairs")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an EMB_DIR in clip-retrieval's layout for embedding_reader/autofaiss")
    p.add_argument("emb_dir")
    p.add_argument("--format", default="embedding-reader", choices=["embedding-reader"])
    p.add_argument("--out", required=True, help="folder to create: img_emb/img_emb_N.npy, metadata/metadata_N.parquet")
    p.set_defaults(func=cmd_export)

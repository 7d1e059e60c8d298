"""`clip-hpc` and its subcommands. Thin: each parses its arguments and calls one stage's public entry.

Any `UserError` becomes a one-line message and exit code 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from clip_hpc.errors import UserError
from clip_hpc.index.defaults import train_size_help
from clip_hpc.ingest.text import argv_text, one_line  # search text in (cp1252 if not UTF-8), hits out (escaped)
from clip_hpc.server.batch_defaults import BATCH_WINDOW_MS, MAX_BATCH
from clip_hpc.subsets.dedup_cli import add_dedup

Handler = Callable[[argparse.Namespace], int]
SIGPIPE_EXIT = 141  # what a shell reports for a process ended by SIGPIPE: the reader closed the pipe


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
    from clip_hpc.model.loading import fetch_model

    print(fetch_model(args.name, args.tag, args.cache_dir))
    return 0


def add_fetch_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download weights once, on a node with internet, for offline compute nodes")
    p.add_argument("name")
    p.add_argument("tag")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_fetch_model)


# --- index, search ----------------------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    import tempfile

    from clip_hpc.cluster.jobenv import job_env, use_threads
    from clip_hpc.cluster.world import world
    from clip_hpc.formats.embedding_folder import import_embedding_folder, is_embedding_folder
    from clip_hpc.index.build import build_index
    from clip_hpc.index.update import update_index
    from clip_hpc.ingest.object_store import require_posix

    require_posix(args.out)
    use_threads(faiss_threads=job_env().cpus)  # FAISS's OpenMP would take the node's cores, not the job's
    with tempfile.TemporaryDirectory(
        prefix=".clip-hpc-import-", dir=os.path.dirname(os.path.abspath(args.out))
    ) as scratch:
        emb_dir = args.emb_dir
        if is_embedding_folder(emb_dir):  # clip-retrieval's layout: read it into shards first
            if world().size > 1:
                raise UserError(
                    f"{emb_dir} is an embedding-reader folder, which one rank indexes: run clip-hpc "
                    "index without mpiexec/srun"
                )
            from clip_hpc.model.loading import resolve_pretrained  # the model's own weights unless named

            emb_dir = import_embedding_folder(
                args.emb_dir,
                os.path.join(scratch, "emb"),
                model=args.model,
                pretrained=resolve_pretrained(args.model, args.pretrained),
            ).root
        if args.update:
            info = update_index(emb_dir, args.out, nprobe=args.nprobe, refine=args.refine, progress=not args.quiet)
        else:
            info = build_index(
                emb_dir,
                args.out,
                index_key=args.index_key,
                train_size=args.train_size,
                refine=args.refine,
                nprobe=args.nprobe,
                refine_factor=args.refine_factor,
                lists=args.lists,
                progress=not args.quiet,
                vectors=args.vectors,
                rerank_tier=args.rerank_tier,
            )
    if not world().is_root:  # every rank built it; one reports
        return 0
    if args.json:
        print(json.dumps({"path": str(args.out), **info.to_dict()}, indent=2))
    else:
        from clip_hpc.index.summary import summary_line

        print(summary_line(info, str(args.out), updated=args.update))
    return 0


def add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build (or --update) a FAISS index with metadata from an EMB_DIR")
    p.add_argument("emb_dir", help="an EMB_DIR, or an embedding-reader folder (img_emb/, metadata/)")
    p.add_argument(
        "--model",
        default="ViT-B-32",
        help="for an embedding-reader folder: the model that made the vectors (recorded for serve)",
    )
    p.add_argument("--pretrained", default=None, help="for an embedding-reader folder: its weights (default: embed's)")
    p.add_argument(
        "--out",
        required=True,
        help="INDEX_DIR (written to a temporary directory, renamed at the end); "
        "a directory on a POSIX file system, never a URL (FAISS needs one)",
    )
    p.add_argument("--index-key", default="auto", help="'auto' or any FAISS factory string, e.g. IVF1024,PQ32")
    p.add_argument("--train-size", type=int, default=None, help=train_size_help())
    p.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-rank candidates exactly with vectors.npy (default: on for compressed indexes)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="default nprobe (default: smallest with recall@10 >= 0.95)")
    p.add_argument(
        "--refine-factor",
        type=int,
        default=None,
        help="candidates per result taken from the codes (default: the cheapest that reaches recall@10 "
        ">= 0.95, with nprobe)",
    )
    p.add_argument("--update", action="store_true", help="add units not yet indexed, without retraining")
    p.add_argument(
        "--lists",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="where a many-rank build merges the inverted lists: in index.faiss (memory) or an on-disk "
        "lists.ivfdata the server memory-maps (disk); auto: disk above 4 GiB of codes",
    )
    p.add_argument(
        "--vectors",
        choices=("images", "captions"),
        default="images",
        help="index the image embeddings, or the caption embeddings of embed --captions (ids are the "
        "image ids; images without a caption are left out)",
    )
    p.add_argument(
        "--rerank-tier",
        choices=("auto", "on", "off"),
        default="auto",
        help="a 4-bit copy of every vector in RAM (d/2 bytes) that re-scores the candidates before the "
        "exact re-rank; auto: from 50,000 vectors, kept only where the self-check finds it pays",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the whole report (index.json, plus path) as one JSON document instead of the summary line",
    )
    p.set_defaults(func=cmd_index)


def cmd_search(args: argparse.Namespace) -> int:
    if args.with_vector and not args.json:
        raise UserError("--with-vector adds the query vector to the JSON output: give --json too")
    if args.url or args.connection_file:
        if args.with_vector or args.caption or args.min_similarity is not None:
            raise UserError("--with-vector, --caption and --min-similarity work with a local INDEX_DIR only")
        return cmd_search_remote(args)
    if not args.index_dir:
        raise UserError("give INDEX_DIR (or --url URL / --connection-file F to ask a running server)")
    from clip_hpc.search.engine import search_local

    hits, query = search_local(
        args.index_dir,
        text=argv_text(args.text or ""),
        image=args.image,
        k=args.k,
        nprobe=args.nprobe,
        device=args.device,
        caption=args.caption and argv_text(args.caption),
        min_similarity=args.min_similarity,
    )
    if args.with_vector:
        print(json.dumps({"results": [hit.to_dict() for hit in hits], "query_vector": query.tolist()}, indent=2))
    else:
        print_hits([hit.to_dict() for hit in hits], args.json)
    return 0


def cmd_search_remote(args: argparse.Namespace) -> int:
    """Client mode: `clip-hpc search --url URL --token T TEXT`; the lone positional is the text, not a directory."""
    from clip_hpc.client.endpoint import resolve_endpoint
    from clip_hpc.client.http_client import remote_search

    if args.index_dir and args.text:
        raise UserError("with --url or --connection-file give only the text query, not INDEX_DIR")
    text = argv_text(args.text or args.index_dir or "")
    endpoint = resolve_endpoint(
        url=args.url,
        token=args.token or os.environ.get("CLIP_HPC_TOKEN"),
        connection_file=args.connection_file,
        server=args.server,
    )
    print_hits(remote_search(endpoint, text, image=args.image, k=args.k)["results"], args.json)
    return 0


def print_hits(hits: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"results": hits}, indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            caption = f"  {one_line(hit['caption'])}" if hit.get("caption") else ""
            print(f"{rank:3d}  {hit['score']:.4f}  {one_line(hit['path'])}{caption}")


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="query an INDEX_DIR by text or image; prints ranked paths and scores")
    p.add_argument("index_dir", nargs="?", default=None, help="the INDEX_DIR (not in client mode)")
    p.add_argument("text", nargs="?", default=None, help="the text query")
    p.add_argument("--image", help="an image file to search by")
    p.add_argument("--url", help="client mode: ask the server at this URL (the tunnel's http://localhost:PORT)")
    p.add_argument("--token", help="client mode: the server's token (default $CLIP_HPC_TOKEN or the connection file)")
    p.add_argument("--connection-file", help="client mode: the file written by clip-hpc serve")
    p.add_argument("--server", action="store_true", help="client mode on the node itself (port or unix socket)")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--caption", help="only images whose caption holds every word of this text (local mode)")
    p.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        help="only images whose image-caption cosine (embed --captions) is at least this (local mode)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--with-vector", action="store_true", help="with --json: add the query vector searched with")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_search)


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


# --- serve, check-ports ----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from clip_hpc.server.micro_batch import BatchSettings
    from clip_hpc.server.serve import serve

    batching = None if args.no_batching else BatchSettings(args.batch_window_ms, args.max_batch)
    return serve(
        args.index_dir,
        host=args.host,
        port=args.port,
        uds=args.uds,
        connection_file=args.connection_file,
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        nprobe=args.nprobe,
        max_upload_mb=args.max_upload_mb,
        log_level=args.log_level,
        batching=batching,
        full_context=args.full_context,
    )


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an INDEX_DIR over HTTP (token auth; port or 0600 unix socket)",
        description="The token comes from $CLIP_HPC_TOKEN, else it is random; the ssh command names "
        "the login host from $CLIP_HPC_LOGIN_HOST.",
    )
    p.add_argument("index_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 lets the login node forward to it)")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    p.add_argument("--uds", help="listen on this unix socket (mode 0600) instead of a port")
    p.add_argument(
        "--connection-file",
        help="where to write host, port, token, URL and ssh command (mode 0600; "
        "default ~/.clip-hpc/connections/<host>-<pid>.json)",
    )
    p.add_argument("--model", default=None, help="model name (default: the one recorded in index.json)")
    p.add_argument("--pretrained", default=None, help="weights (default: the ones recorded in index.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger request bodies get 413")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=BATCH_WINDOW_MS,
        help="concurrent queries wait at most this long to share one model call and one FAISS search",
    )
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="the most queries in one micro-batch")
    p.add_argument("--no-batching", action="store_true", help="encode and search each query alone (old design)")
    p.add_argument(
        "--full-context",
        action="store_true",
        help="encode text at the model's full context even where the short one is exact (old design)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_check_ports(args: argparse.Namespace) -> int:
    from clip_hpc.client.check import check_ports

    steps = check_ports(
        connection_file=args.connection_file, port=args.port, token=args.token, host=args.host, server=args.server
    )
    for step in steps:
        print(step.line(), flush=True)
    return 0 if all(step.ok for step in steps) else 1


def add_check_ports(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-ports", help="diagnose the laptop -> tunnel -> server chain, one hop at a time")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connection-file", help="the file written by clip-hpc serve (copied to the laptop)")
    where.add_argument("--port", type=int, help="the local port of the tunnel")
    p.add_argument("--token", help="the server's token (default: from the connection file)")
    p.add_argument("--host", default="localhost", help="where the tunnel listens (default localhost)")
    p.add_argument(
        "--server",
        action="store_true",
        help="run on the node itself, against the connection file's host and port or socket",
    )
    p.set_defaults(func=cmd_check_ports)


# --- demo ------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from clip_hpc.demo import run_demo

    return run_demo(args.out, n_images=args.images, ranks=args.ranks, index_key=args.index_key, wait=not args.no_wait)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo: images, mpiexec embed, index, serve, queries")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks for the embed step (mpiexec -n)")
    p.add_argument("--index-key", default="IVF32,PQ16x4fs", help="FAISS factory string or 'auto'")
    p.add_argument("--no-wait", action="store_true", help="stop the server after the example queries")
    p.set_defaults(func=cmd_demo)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_embed,
    add_info,
    add_fetch_model,
    add_index,
    add_search,
    add_export,
    add_dedup,
    add_serve,
    add_check_ports,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-hpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`clip-hpc ...`; a reader that goes away (`clip-hpc info X | head -1`) ends the command quietly."""
    try:
        try:
            return run(argv)
        finally:
            sys.stdout.flush()  # also after --help: a closed pipe surfaces here, not as a warning at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return SIGPIPE_EXIT


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn a `UserError` or an OSError (full disk, read-only mount) into one line on stderr
    and exit code 2. Under MPI an unexpected exception aborts the whole job rather than leave ranks waiting."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        return _fail(args.command, str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:
        from clip_hpc.errors import os_error_message

        return _fail(args.command, os_error_message(exc))
    except KeyboardInterrupt:
        print(f"clip-hpc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        _abort_mpi_job()
        raise


def _fail(command: str, message: str) -> int:
    from clip_hpc.cluster.world import speaks_for_job, world

    if speaks_for_job(world()):  # under MPI every rank raises the same error; say it once
        print(f"clip-hpc {command}: error: {message}", file=sys.stderr)
    return 2


def _abort_mpi_job() -> None:
    """A bug on one rank of an MPI job: print it and abort every rank (exit 2), instead of a hang in a collective."""
    if "mpi4py" not in sys.modules:
        return
    from clip_hpc.cluster.world import world

    w = world()
    if w.comm is not None and w.size > 1:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        w.comm.Abort(2)

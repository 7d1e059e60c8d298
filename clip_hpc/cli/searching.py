"""`clip-hpc index` and `search`: build an INDEX_DIR, and query one (locally or through a server)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from clip_hpc.errors import UserError
from clip_hpc.index.defaults import train_size_help
from clip_hpc.index.memory import DEFAULT_MAX_RAM_TEXT, TIER_CODES, parse_size
from clip_hpc.ingest.text import argv_text, one_line  # search text in (cp1252 if not UTF-8), hits out (escaped)
from clip_hpc.server.token_env import TOKEN_ENV


# --- index, search ----------------------------------------------------------------------------------------------
def build_only_flags(args: argparse.Namespace) -> list[str]:
    """The build choices given beside --update, which adds to the index as it was trained and would ignore them."""
    given = {
        "--index-key": args.index_key not in (None, "", "auto"),
        "--train-size": args.train_size is not None,
        "--refine-factor": args.refine_factor is not None,
        "--lists": args.lists != "auto",
        "--rerank-tier": args.rerank_tier != "auto",
        "--max-ram": args.max_ram is not None,
        "--graph-candidate": args.graph_candidate,
    }
    return [flag for flag, is_given in given.items() if is_given]


def cmd_index(args: argparse.Namespace) -> int:
    import tempfile

    from clip_hpc.cluster.jobenv import job_env, use_threads
    from clip_hpc.cluster.world import idle_without_mpi, world
    from clip_hpc.formats.embedding_folder import import_embedding_folder, is_embedding_folder
    from clip_hpc.index.build import build_index
    from clip_hpc.index.update import update_index
    from clip_hpc.ingest.object_store import require_posix

    if args.update and (ignored := build_only_flags(args)):
        raise UserError(
            f"--update adds to the index as it was built and cannot honour {', '.join(ignored)}: leave "
            f"{'it' if len(ignored) == 1 else 'them'} out, or build a new index (another --out)"
        )
    idle = idle_without_mpi(world())
    if idle:  # exit 0: srun --kill-on-bad-exit would take rank 0's build down with a failing rank
        if world().rank == 1:  # one line for the job, not one per idle rank
            print(f"clip-hpc index: {idle}", file=sys.stderr)
        return 0
    require_posix(args.out)
    max_ram = parse_size(args.max_ram) if args.max_ram is not None else None
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
            info = update_index(
                emb_dir, args.out, nprobe=args.nprobe, refine=args.refine, progress=not args.quiet, vectors=args.vectors
            )
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
                vectors=args.vectors or "images",
                rerank_tier=args.rerank_tier,
                max_ram=max_ram,
                graph_candidate=args.graph_candidate,
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
    p.add_argument(
        "--update",
        action="store_true",
        help="add units not yet indexed, without retraining (with --nprobe, --refine/--no-refine, --vectors; the "
        "other build choices are refused)",
    )
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
        default=None,
        help="index the image embeddings (default), or the caption embeddings of embed --captions (ids are the "
        "image ids; images without a caption are left out); --update adds what the index holds",
    )
    p.add_argument(
        "--rerank-tier",
        choices=("auto", "on", "off", *TIER_CODES),
        default="auto",
        help="a 4-bit copy of every vector in RAM (SQ4, d/2 bytes) that re-scores the candidates before the "
        "exact re-rank; auto: wherever the auto key has inverted lists (from 10,000 vectors), SQ4 if it fits "
        "--max-ram, else 8-bit PQ (PQ: d/8 bytes), else none, kept only where the self-check finds it pays; auto also "
        "times SQ8 codes in the same lists (IVF-SQ8, d bytes; up to 250,000 vectors, within --max-ram) and serves them "
        "where fastest; off: neither; on: SQ4; SQ8 (d bytes), SQ4, PQ: that code",
    )
    p.add_argument(
        "--max-ram",
        default=None,
        metavar="SIZE",
        help=f"RAM the served index may hold: inverted lists, centroids, ids and the re-rank tier, not vectors.npy "
        f"(read from disk); e.g. 512M, 16G, 2GiB (binary units). The tier's code is chosen within it; an index "
        f"that cannot fit a given budget is an error. Default: the tier is chosen within {DEFAULT_MAX_RAM_TEXT} "
        "(autofaiss's max_index_memory_usage), and an index larger than that is built without a tier, not refused",
    )
    graph = "experimental: also time an HNSW graph (HNSW32,Flat, ~2.3 KB/vector of RAM; 10k-250k vectors) and serve "
    p.add_argument("--graph-candidate", action="store_true", help=graph + "it where fastest (docs/indexing.md)")
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
        token=args.token or os.environ.get(TOKEN_ENV),
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


# argparse takes only -1 and -.5 for negative numbers: `--min-similarity -inf` (or -1e-3) was "expected one argument"
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def finite_float(text: str) -> float:
    """A finite number, else argparse's one-line error naming the option."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="query an INDEX_DIR by text or image; prints ranked paths and scores")
    p._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own attribute (typeshed declares it), no public hook
    p.add_argument("index_dir", nargs="?", default=None, help="the INDEX_DIR (not in client mode)")
    p.add_argument("text", nargs="?", default=None, help="the text query")
    p.add_argument("--image", help="an image file to search by")
    p.add_argument("--url", help="client mode: ask the server at this URL (the tunnel's http://localhost:PORT)")
    p.add_argument("--token", help=f"client mode: the server's token (default ${TOKEN_ENV} or the connection file)")
    p.add_argument("--connection-file", help="client mode: the file written by clip-hpc serve")
    p.add_argument("--server", action="store_true", help="client mode on the node itself (port or unix socket)")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--caption", help="only images whose caption holds every word of this text (local mode)")
    p.add_argument(
        "--min-similarity",
        type=finite_float,
        default=None,
        help="only images whose image-caption cosine (embed --captions) is at least this (local mode)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--with-vector", action="store_true", help="with --json: add the query vector searched with")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_search)

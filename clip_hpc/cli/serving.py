"""`clip-hpc serve`, `check-ports` and `demo`: the server, the laptop's diagnosis of the way to it, the demo."""

from __future__ import annotations

import argparse

from clip_hpc.server.batch_defaults import BATCH_WINDOW_MS, MAX_BATCH
from clip_hpc.server.token_env import TOKEN_ENV


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
        other_model=args.other_model,
    )


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an INDEX_DIR over HTTP (token auth; port or 0600 unix socket)",
        description=f"The token comes from ${TOKEN_ENV}, else it is random; the ssh command names "
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
    p.add_argument(
        "--other-model",
        action="store_true",
        help="serve with a --model/--pretrained other than index.json's (queries land in another space)",
    )
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

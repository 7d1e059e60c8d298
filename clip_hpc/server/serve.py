"""`clip-hpc serve`: load the model and index once, bind a port or a 0600 unix socket, announce the server
(connection file, ssh command, URL), then run uvicorn until SIGINT, SIGTERM, SIGHUP or SIGUSR1 and clean up after
itself (the connection file holds the token: no clean exit leaves it behind)."""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_hpc.errors import UserError
from clip_hpc.formats.connection import (
    LOOPBACK,
    ConnectionInfo,
    claim_connection_file,
    default_connection_path,
    remove_connection_file,
    ssh_command,
    write_connection_file,
)
from clip_hpc.formats.index_dir import IndexDir, IndexInfo
from clip_hpc.search.engine import SearchEngine, default_encoder
from clip_hpc.server.app import create_app
from clip_hpc.server.auth import resolve_token
from clip_hpc.server.guard import ACCEPT_BATCH, DEFAULT_HEADER_TIMEOUT, guarded_protocol, install_log_rate_limit
from clip_hpc.server.micro_batch import DEFAULT_BATCHING, BatchSettings
from clip_hpc.server.runtime import ServingRuntime
from clip_hpc.server.served_engine import ServedEngine
from clip_hpc.server.shared_encoder import SharedEncoder
from clip_hpc.server.sockets import bind_tcp, bind_unix, check_bind_host, check_port, unix_socket_path

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


class _Stopped(Exception):
    """SIGTERM (scancel, the end of the job's time) after a graceful shutdown: a clean exit, files cleaned up."""


def _stop(_signum: int, _frame: Any) -> None:
    raise _Stopped


EXTRA_STOP_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)  # uvicorn itself handles SIGINT and SIGTERM


MMAP_THRESHOLD = 4 << 20  # blocks this large or larger are mmapped: freed, they go straight back to the system
TRIM_THRESHOLD = 32 << 20  # free memory at the top of an arena kept for the next request rather than returned


def _tune_malloc() -> None:
    """glibc keeps freed blocks of a few MB (decoded uploads) in per-thread arenas unless they are mmapped, so
    blocks from MMAP_THRESHOLD up are. Fixing that threshold also freezes the trim threshold at 128 KiB, and the
    compute thread's heap then shrank and grew again in every text batch: ~85 page faults a query at 8 clients
    (~20 with TRIM_THRESHOLD), and the 8-client p99 several ms longer (README, serving under load)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def check_recorded_model(info: IndexInfo, model_name: str | None, pretrained: str | None) -> None:
    """A model or weights other than index.json's would encode every query into another space, without a word
    (clip-hpc-demo and clip-hpc-tiny are both 128-d): refused here, where a user named one (`serve --model`)."""
    for flag, asked, recorded in (("--model", model_name, info.model), ("--pretrained", pretrained, info.pretrained)):
        if asked is not None and recorded is not None and asked != recorded:
            raise UserError(
                f"the index was built with {info.model} (pretrained {info.pretrained}), not {flag} {asked}: its "
                "queries would be encoded by another model; leave the option out, or pass --other-model to serve "
                "it anyway"
            )


def load_engine(
    index_dir: str,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    nprobe: int | None = None,
    text_cache_size: int = 1024,
    batching: BatchSettings | None = DEFAULT_BATCHING,
    full_context: bool = False,
    other_model: bool = False,
) -> ServedEngine:
    """The engine with its model loaded now (not on the first user's query), shared by every request thread;
    torch uses as many threads as this job has CPUs, all on the runtime's one compute thread (compute.py), which
    also loads the model. index.json is read once, here. `batching=None`, `full_context`: the old design.
    A `model` or `pretrained` other than index.json's is refused unless `other_model`."""
    info = IndexDir(index_dir).check_integrity()  # a damaged index stops here: before binding, no connection file
    if not other_model:
        check_recorded_model(info, model, pretrained)
    model_encoder = default_encoder(info, model, pretrained, device)
    model_encoder.full_context = full_context
    runtime = ServingRuntime.start(batching)
    if runtime.compute.run(lambda: model_encoder.model.device.type) == "cuda":
        runtime.compute.encoder_on_gpu()
    encoder = SharedEncoder(model_encoder, runtime, text_cache_size)
    engine = SearchEngine(index_dir, info=info, encoder=encoder, nprobe=nprobe)
    runtime.compute.run(model_encoder.encode_text, ["warm up"])  # past the cache: the first query is a miss too
    return ServedEngine(engine, encoder, runtime)


def freeze_loaded_objects() -> None:
    """Keep what loading made (~430k objects with ViT-B-32: modules, tokenizer tables) out of the garbage
    collector's sight: a full collection over them stops every thread for ~150 ms, the 8-client p99 (measured)."""
    gc.collect()
    gc.freeze()


def announce(n: int, info: ConnectionInfo, conn_path: Path, where: str, loopback_port: int | None) -> None:
    """What the job log shows: where the server listens, the connection file, the ssh command and the URL."""
    print(
        f"clip-hpc serve: {n} images, listening on {where} (node {info.host})\n"
        f"  connection file: {conn_path}\n"
        f"  on your laptop:  {info.ssh_command}\n"
        f"  then open:       {info.url}",
        flush=True,
    )
    if loopback_port is not None:
        print(
            "  (if compute nodes refuse ssh, restart with --host 0.0.0.0 and tunnel through the login node: "
            f"{ssh_command(info.host, port=loopback_port, bind_host='0.0.0.0')}; the token still guards it)",
            flush=True,
        )
    sys.stdout.flush()


def guarded_server(app: FastAPI, log_level: str, header_timeout: float, max_connections: int | None) -> uvicorn.Server:
    """uvicorn with the slow-loris guard (guard.py) as its HTTP protocol, no access log or server header, and a
    rate-limited log."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        server_header=False,
        http=guarded_protocol(header_timeout, max_connections),
        backlog=ACCEPT_BATCH,
    )
    install_log_rate_limit()
    return uvicorn.Server(config)


def serve(
    index_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    uds: str | None = None,
    connection_file: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    nprobe: int | None = None,
    max_upload_mb: float = 20.0,
    log_level: str = "warning",
    batching: BatchSettings | None = DEFAULT_BATCHING,
    full_context: bool = False,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int | None = None,
    other_model: bool = False,
) -> int:
    """Load once, bind, announce (connection file, ssh command, URL), then serve until a stop signal."""
    if uds:  # a socket path or an address that cannot work fails now, not after the model and index have loaded
        uds = str(unix_socket_path(uds))
    else:
        check_bind_host(host)
        check_port(port)
    conn_path = claim_connection_file(connection_file or default_connection_path())
    _tune_malloc()
    served = load_engine(
        index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
        nprobe=nprobe,
        batching=batching,
        full_context=full_context,
        other_model=other_model,
    )
    token = resolve_token()
    app = create_app(served, token, max_upload_bytes=int(max_upload_mb * 2**20))
    freeze_loaded_objects()
    sock = bind_unix(uds) if uds else bind_tcp(host, port)
    bound_port = None if uds else int(sock.getsockname()[1])
    info = ConnectionInfo.for_this_server(
        token=token, port=bound_port, uds=uds, bind_host=host, index_dir=str(Path(index_dir).absolute())
    )
    server = guarded_server(app, log_level, header_timeout, max_connections)

    def _graceful(_signum: int, _frame: Any) -> None:
        server.should_exit = True

    # from before the file exists until it is removed, every stop signal ends in the `finally` below
    previous = {sig: signal.signal(sig, _graceful) for sig in EXTRA_STOP_SIGNALS}
    previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _stop)  # uvicorn re-raises it after shutting down
    try:
        conn_path = write_connection_file(conn_path, info)
        announce(
            served.engine.n,
            info,
            conn_path,
            uds or f"{host}:{bound_port}",
            None if uds or host not in LOOPBACK else bound_port,
        )
        server.run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_connection_file(conn_path)
        if uds:
            Path(uds).unlink(missing_ok=True)
    return 0

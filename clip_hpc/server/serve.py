"""`clip-hpc serve`: load the model and index once, bind a port or a 0600 unix socket, announce the server
(connection file, ssh command, URL), then run uvicorn until SIGINT or SIGTERM and clean up after itself."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from clip_hpc.client.connection import (LOOPBACK, ConnectionInfo, default_connection_path, remove_connection_file,
                                        ssh_command, write_connection_file)
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.search import SearchEngine, default_encoder
from clip_hpc.server.app import create_app
from clip_hpc.server.auth import resolve_token
from clip_hpc.server.batching import BatchSettings
from clip_hpc.server.shared_encoder import SharedEncoder
from clip_hpc.server.sockets import bind_tcp, bind_unix
from clip_hpc.server.threads import use_job_cpus


class _Stopped(Exception):
    """SIGTERM (scancel, the end of the job's time) after a graceful shutdown: a clean exit, files cleaned up."""


def _stop(_signum: int, _frame: Any) -> None:
    raise _Stopped


def load_engine(index_dir: str, *, model: str | None = None, pretrained: str | None = None, device: str = "auto",
                nprobe: int | None = None, text_cache_size: int = 1024,
                batching: BatchSettings | None = BatchSettings(), full_context: bool = False) -> SearchEngine:
    """The engine with its model loaded now (not on the first user's query), shared by every request thread;
    torch and FAISS use as many threads as this job has CPUs. `batching=None`, `full_context`: the old design."""
    encoder = default_encoder(IndexDir(index_dir).load_info().to_dict(), model, pretrained, device)
    use_job_cpus(encoder_on_gpu=encoder.model.device.type == "cuda")
    encoder.full_context = full_context
    engine = SearchEngine(index_dir, encoder=SharedEncoder(encoder, text_cache_size, batching), nprobe=nprobe)
    encoder.encode_text(["warm up"])  # past the cache: the first user's query is a miss like any other
    return engine


def serve(index_dir: str, *, host: str = "127.0.0.1", port: int = 0, uds: str | None = None,
          connection_file: str | None = None, model: str | None = None, pretrained: str | None = None,
          device: str = "auto", nprobe: int | None = None, max_upload_mb: float = 20.0,
          log_level: str = "warning", batching: BatchSettings | None = BatchSettings(),
          full_context: bool = False) -> int:
    """Load once, bind, announce (connection file, ssh command, URL), then serve until SIGINT/SIGTERM."""
    import uvicorn

    engine = load_engine(index_dir, model=model, pretrained=pretrained, device=device, nprobe=nprobe,
                         batching=batching, full_context=full_context)
    token = resolve_token()
    app = create_app(engine, token, max_upload_bytes=int(max_upload_mb * 2**20))
    sock = bind_unix(uds) if uds else bind_tcp(host, port)
    uds = str(Path(uds).expanduser().absolute()) if uds else None
    bound_port = None if uds else int(sock.getsockname()[1])
    info = ConnectionInfo.for_this_server(token=token, port=bound_port, uds=uds, bind_host=host,
                                          index_dir=str(Path(index_dir).absolute()))
    conn_path = write_connection_file(connection_file or default_connection_path(), info)
    where = uds or f"{host}:{bound_port}"
    print(f"clip-hpc serve: {engine.n} images, listening on {where} (node {info.host})\n"
          f"  connection file: {conn_path}\n"
          f"  on your laptop:  {info.ssh_command}\n"
          f"  then open:       {info.url}", flush=True)
    if not uds and host in LOOPBACK:
        print("  (if compute nodes refuse ssh, restart with --host 0.0.0.0 and tunnel through the login node: "
              f"{ssh_command(info.host, port=bound_port, bind_host='0.0.0.0')}; the token still guards it)",
              flush=True)
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            server_header=False)
    previous = signal.signal(signal.SIGTERM, _stop)  # uvicorn re-raises SIGTERM after its graceful shutdown
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        remove_connection_file(conn_path)
        if uds:
            Path(uds).unlink(missing_ok=True)
    return 0

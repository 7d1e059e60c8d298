"""`clip-hpc demo`: the main job end to end, offline, on one machine: sample images, `mpiexec -n 2` embedding,
an IVF-PQ index, a token-protected server, and a few text queries through it.

It drives the real CLI in subprocesses, exactly as a user or an sbatch script would, so it proves the installed
commands rather than library internals.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from clip_hpc.client.endpoint import Endpoint
from clip_hpc.client.process import run_child, start_child, stop_process, stop_signals_raise, wait_for_server
from clip_hpc.errors import UserError
from clip_hpc.formats.index_dir import IndexDir

DEMO_QUERIES = ("a red circle", "two yellow squares", "a blue star", "a green triangle on a white background")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clip_hpc", *args]


def _mpiexec() -> str:
    found = Path(sys.executable).parent / "mpiexec"
    return str(found) if found.exists() else (shutil.which("mpiexec") or "")


def _run(cmd: Sequence[str], what: str) -> None:
    shown = ["clip-hpc", *cmd[3:]] if list(cmd[:3]) == _cli() else list(cmd)
    print(f"\n$ {' '.join(shown)}", flush=True)
    code = run_child(cmd)
    if code != 0:
        raise UserError(f"demo step '{what}' failed (exit {code}); see its output above")


def demo_model() -> tuple[str, str | None]:
    """The shipped demo model when its weights are in the package, else the tiny config with random weights."""
    from clip_hpc.model.loading import bundled_checkpoint

    return ("clip-hpc-demo", None) if bundled_checkpoint("clip-hpc-demo") else ("clip-hpc-tiny", "none")


def read_captions(images: Path) -> dict[str, str]:
    """The demo images' true captions, shown beside each hit so a reader can judge the results."""
    import json

    path = images / "captions.jsonl"
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["path"]: row["caption"] for row in rows}


def print_queries(endpoint: Endpoint, queries: Sequence[str], captions: dict[str, str], k: int = 5) -> None:
    from clip_hpc.client.http_client import remote_search

    for query in queries:
        result = remote_search(endpoint, query, k=k)
        print(f"\nquery: {query!r}  ({result.get('took_ms', 0):.1f} ms)")
        for rank, hit in enumerate(result["results"], 1):
            name = Path(hit["path"]).name
            print(f"  {rank}. {hit['score']:.3f}  {name}  {captions.get(name, '')}".rstrip())


def run_demo(
    out: str | os.PathLike = "demo-out",
    *,
    n_images: int = 2000,
    ranks: int = 2,
    index_key: str = "IVF32,PQ16x4fs",
    wait: bool = True,
    queries: Sequence[str] = DEMO_QUERIES,
) -> int:
    """The demo's steps; SIGTERM or SIGHUP stop it as Ctrl-C does, and every child (mpiexec, the server) goes
    with it: they also die with this process if it is killed outright (see client/process.py)."""
    try:
        with stop_signals_raise():
            return _run_steps(Path(out).resolve(), n_images, ranks, index_key, wait, queries)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the children are stopped by now
        print("\nclip-hpc demo: stopped", file=sys.stderr, flush=True)
        return 130


def _run_steps(out: Path, n_images: int, ranks: int, index_key: str, wait: bool, queries: Sequence[str]) -> int:
    from clip_hpc.devdata.captioned_shapes import write_demo_images

    images, emb, index = out / "images", out / "embeddings", out / "index"
    model, pretrained = demo_model()
    model_args = ["--model", model] + (["--pretrained", pretrained] if pretrained else [])
    if not (images / "captions.jsonl").exists():
        print(f"writing {n_images} captioned demo images to {images}", flush=True)
        write_demo_images(images, n_images)
    mpiexec = _mpiexec()
    embed_cmd = _cli(
        "embed",
        str(images),
        "--out",
        str(emb),
        *model_args,
        "--shard-size",
        "250",
        "--batch-size",
        "64",
        "--workers",
        "1",
    )
    if mpiexec and ranks > 1:
        print(f"\n$ mpiexec -n {ranks} clip-hpc embed ...", flush=True)
        if run_child([mpiexec, "-n", str(ranks), *embed_cmd]) != 0:
            raise UserError("demo step 'embed' failed; see its output above")
    else:
        _run(embed_cmd, "embed")
    if not IndexDir(index).looks_like_one():
        _run(_cli("index", str(emb), "--out", str(index), "--index-key", index_key, "--quiet"), "index")
    conn = out / "connection.json"
    conn.unlink(missing_ok=True)
    print(f"\n$ clip-hpc serve {index} --port 0 --connection-file {conn}", flush=True)
    server = start_child(_cli("serve", str(index), "--port", "0", "--connection-file", str(conn)))
    try:
        endpoint = wait_for_server(conn, server)
        print_queries(endpoint, queries, read_captions(images))
        print(f"\nopen the gallery: {endpoint.base_url}/?token={endpoint.token}")
        if wait:
            print("serving; press Ctrl-C to stop", flush=True)
            server.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while serving: the way a demo ends
        pass
    finally:
        stop_process(server)
    return 0

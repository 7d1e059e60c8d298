"""The Python API through a server (`clip_hpc.connect`, as a laptop notebook uses it through the tunnel): the same
ids and scores as a local `open_index` and as `clip-hpc search --url`, the same images and export, one-line errors,
and not one heavy import (torch, FAISS, h5py, numpy) on the laptop side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import pytest

import clip_hpc
from api_fixtures import assert_same
from clip_hpc.cli import main as cli_main
from clip_hpc.errors import UserError
from clip_hpc.server.sockets import free_port
from test_client_imports import HEAVY, imported_modules


@pytest.fixture(scope="module")
def local(demo_index):
    with clip_hpc.open_index(demo_index, device="cpu") as opened:
        yield opened


@pytest.fixture(scope="module")
def remote(demo_server):
    with clip_hpc.connect(demo_server.url, token=demo_server.token) as connected:
        yield connected


def test_remote_text_search_matches_local_and_the_cli(remote, local, demo_server, capsys):
    found = remote.search("a red circle", k=8)
    assert_same(found, local.search("a red circle", k=8))
    assert [h.url for h in found] == [f"{demo_server.url}/api/images/{h.id}" for h in found]
    capsys.readouterr()
    args = ["search", "--url", demo_server.url, "--token", demo_server.token, "a red circle", "-k", "8", "--json"]
    assert cli_main(args) == 0
    assert_same(found, json.loads(capsys.readouterr().out)["results"])


def test_connection_file_brings_the_token(demo_server, local):
    with clip_hpc.connect(demo_server.connection_file) as by_file:
        assert_same(by_file.search("a blue star", k=5), local.search("a blue star", k=5))


QUERIES = [
    {"text": "a red square", "image": 5, "negatives": [5, 9], "weights": {"text": 2.0}, "k": 9},
    {"text": "a yellow circle", "filters": {"caption": "yellow"}, "k": 5},
    {"text": "a shape", "diversity": 0.7, "k": 6, "min_score": 0.0},
    {"text": "a red circle", "negatives": ["a blue star", 3], "weights": {"negative": 0.5}, "k": 7},
]


@pytest.mark.parametrize("query", QUERIES, ids=[",".join(sorted(q)) for q in QUERIES])
def test_remote_combined_queries_match_local(remote, local, query):
    assert_same(remote.search(**query), local.search(**query))


def test_remote_image_queries_match_local(remote, local, tmp_path):
    query = tmp_path / "q.jpg"
    query.write_bytes(remote.image_bytes(3))
    assert remote.image_bytes(3) == local.image_bytes(3)
    for image in (query, query.read_bytes(), remote.image(3)):
        assert_same(remote.search(image=image, text="a circle", k=6), local.search(image=image, text="a circle", k=6))


def test_remote_grid_and_export(remote, local, tmp_path):
    results = remote.search("a green circle", k=4)
    page = results._repr_html_()
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', page)) == 4
    assert all(f"{h.score:.4f}" in page for h in results)
    out = remote.export(results, tmp_path / "remote.zip")
    mine = local.export(local.search("a green circle", k=4), tmp_path / "local.zip")
    theirs, ours = zipfile.ZipFile(out), zipfile.ZipFile(mine)
    assert sorted(theirs.namelist()) == sorted(ours.namelist())
    remote_meta, local_meta = (json.loads(z.read("metadata.json")) for z in (theirs, ours))
    assert [{**m, "score": None} for m in remote_meta] == [{**m, "score": None} for m in local_meta]
    assert [m["score"] for m in remote_meta] == pytest.approx([m["score"] for m in local_meta], abs=1e-5)
    assert not list(tmp_path.glob(".remote.zip.*"))


def test_remote_errors_are_one_line(demo_server):
    with clip_hpc.connect(demo_server.url, token="wrong") as bad:
        with pytest.raises(UserError, match="server answered 401"):
            bad.search("a cat")
    with clip_hpc.connect(f"http://127.0.0.1:{free_port()}", token="t") as gone:
        with pytest.raises(UserError, match="cannot reach .*check-ports"):
            gone.search("a cat")
    with clip_hpc.connect(demo_server.url, token=demo_server.token) as ok:
        with pytest.raises(UserError, match="server answered 404"):
            ok.search(image=10_000)
        with pytest.raises(UserError, match="server answered 4"):
            ok.search("x", k=0)


def test_connect_loads_nothing_heavy(demo_server):
    """`import clip_hpc; clip_hpc.connect(...)`, a search and its grid, as a laptop notebook runs them."""
    script = (
        "import clip_hpc, sys\n"
        f"r = clip_hpc.connect({demo_server.url!r}, token={demo_server.token!r})\n"
        "found = r.search('a red circle', k=3)\n"
        "assert len(found) == 3 and found._repr_html_().count('<img ') == 3\n"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True, timeout=120
    )
    modules = imported_modules(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clip_hpc.api.query" in modules and "httpx" in modules  # the parse saw the real imports
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"clip_hpc.connect imported {heavy[:10]}"

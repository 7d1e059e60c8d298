"""The CLI's own behaviour: a closed pipe ends a command quietly, and help text quotes the code's constants."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clip_hpc.formats.shard import ShardBatch
from clip_hpc.index.defaults import TRAIN_PER_LIST, TRAIN_PER_LIST_MAX
from conftest import BIN, run_cli
from index_fixtures import synthetic_emb_dir


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory) -> Path:
    return synthetic_emb_dir(tmp_path_factory.mktemp("cli") / "emb", 600, shard_size=100)[0]


def through_pipe(args: list[str], reader: str, stderr: Path) -> tuple[int, str]:
    """`clip-hpc ARGS 2>STDERR | READER` in a real shell; returns clip-hpc's exit status and what the reader printed."""
    command = " ".join(f"'{a}'" for a in [str(BIN / "clip-hpc"), *args])
    script = f'{command} 2>"{stderr}" | {reader}; echo "rc=${{PIPESTATUS[0]}}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300).stdout
    printed, rc = out.rsplit("rc=", 1)
    return int(rc), printed


@pytest.mark.parametrize("args", [["info", "EMB"], ["info", "EMB", "--json"], ["index", "--help"], ["--help"]])
@pytest.mark.parametrize("reader", ["head -1", "head -n 0"])  # head -n 0 closes the pipe before anything is written
def test_a_closed_pipe_ends_quietly(emb_dir, tmp_path, args, reader):
    stderr = tmp_path / "stderr"
    rc, printed = through_pipe([str(emb_dir) if a == "EMB" else a for a in args], reader, stderr)
    assert stderr.read_text() == "", stderr.read_text()  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert rc in (0, 141), rc  # 141: ended because the reader left, as a process killed by SIGPIPE reports
    if reader == "head -1":
        assert printed.count("\n") == 1 and printed.strip()
        full = run_cli(*[str(emb_dir) if a == "EMB" else a for a in args], check=True).stdout
        assert full.startswith(printed)


def test_train_size_help_quotes_the_code():
    text = " ".join(run_cli("index", "--help", check=True).stdout.split())
    assert f"default {TRAIN_PER_LIST} x lists" in text and f"at most {TRAIN_PER_LIST_MAX} x lists" in text
    assert "40 x" not in text


def test_index_ends_with_a_summary_of_numbers_or_one_json_document(emb_dir, tmp_path):
    """The closing line holds plain numbers (no dict reprs) that are index.json's served figures; --json prints
    index.json (plus the path) as the only output."""
    import json
    import re

    out = tmp_path / "plain"
    lines = run_cli("index", emb_dir, "--out", out, "--quiet", check=True).stdout.splitlines()
    info = json.loads((out / "index.json").read_text())
    assert len(lines) == 1 and "{" not in lines[0], lines
    number = r"(\d+(?:\.\d+)?)"
    found = re.fullmatch(
        rf"(.+): {number} vectors, (\S+) nprobe {number}, RAM {number} B/vector, disk {number} B/vector, built in "
        rf"{number} s on "
        rf"1 rank\(s\); recall@10 {number} served \(in-distribution {number}, text-like {number}"
        r"(?:, captions [\d.]+)?(?:, below the [\d.]+ target)?\)",
        lines[0],
    )
    assert found, lines[0]
    label = "refine" if info["refine"] else "no_refine"
    assert found.groups() == (
        str(out),
        str(info["n"]),
        info["index_key"],
        str(info["nprobe"]),
        str(info["ram_bytes_per_vector"]),
        str(info["disk_bytes_per_vector"]),
        str(info["timings"]["total_s"]),
        f"{info['recall']['served']:.4f}",
        f"{info['recall']['in_distribution'][label]:.4f}",
        f"{info['recall']['off_distribution'][label]:.4f}",
    )
    as_json = run_cli("index", emb_dir, "--out", tmp_path / "json", "--quiet", "--json", check=True).stdout
    report = json.loads(as_json)
    assert report.pop("path") == str(tmp_path / "json")
    assert report == json.loads((tmp_path / "json" / "index.json").read_text())


def test_search_prints_one_line_per_hit_whatever_the_path_or_caption_holds(capsys):
    """A caption or name with a line break (`\\n`, `\\r`, U+2028: captions keep them) or a bidi override printed
    as is: a hit ran over two lines for `head -k`/`cut`, or the terminal drew the line reversed."""
    from clip_hpc.cli.searching import print_hits

    odd = ["two\nlines", "cr\rhere", "ls\u2028ps\u2029", "form\x0cfeed\x85nel", "bidi\u202eevil\u2066x"]
    print_hits(
        [{"id": i, "score": 0.5, "path": f"/d/{text}.jpg", "caption": text} for i, text in enumerate(odd)], False
    )
    lines = capsys.readouterr().out.splitlines()  # splitlines also breaks at \x0c, \x85, U+2028 and U+2029
    assert len(lines) == len(odd)
    assert lines[0] == "  1  0.5000  /d/two\\nlines.jpg  two\\nlines"
    assert "\u202e" not in lines[4] and "bidi\\u202eevil\\u2066x" in lines[4]
    print_hits([{"id": 0, "score": 0.5, "path": "/d/é 😀 ש.jpg", "caption": "café 😀 שלום"}], False)
    assert capsys.readouterr().out == "  1  0.5000  /d/é 😀 ש.jpg  café 😀 שלום\n"  # text is left alone


def test_a_caption_filter_in_bytes_that_are_not_utf8_is_read_as_cp1252(tmp_path, capsys):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates: a Latin-1 terminal's `caf\\xe9` matched no
    caption and said nothing (the text query itself was already read back as cp1252)."""
    import numpy as np

    from clip_hpc.cli import main
    from clip_hpc.formats.emb_dir import EmbDir
    from clip_hpc.index.build import build_index

    rows = np.random.default_rng(5).standard_normal((12, 128)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([f"/img/{i}.jpg" for i in range(12)])
    emb.write_shard(
        0,
        ShardBatch(
            embeddings=rows.astype(np.float16),
            ids=range(12),
            paths=[f"/img/{i}.jpg" for i in range(12)],
            captions=["café au lait" if i == 7 else "a cup of tea" for i in range(12)],
            attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 12, "dtype": "float16"},
        ),
    )
    build_index(emb.root, tmp_path / "index", progress=False)
    assert main(["search", str(tmp_path / "index"), "a drink", "--caption", "caf\udce9", "--json"]) == 0
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)["results"]] == [7]

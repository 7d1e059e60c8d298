"""The quick-start demo command, as `make demo` runs it but stopping after its example queries."""

import json
import re

import pytest

from conftest import run_cli


@pytest.mark.mpi
@pytest.mark.slow
def test_demo_runs_every_stage_and_its_queries_find_matching_images(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--images", 300, "--no-wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 300 of 300 images" in proc.stdout
    assert (out / "index" / "index.json").exists()
    assert json.loads((out / "index" / "index.json").read_text())["index_key"].startswith("IVF")
    assert re.search(r"open the gallery: http://127\.0\.0\.1:\d+/\?token=\S+", proc.stdout)
    assert not (out / "connection.json").exists(), "the server must be stopped and clean up after --no-wait"
    # 'a red circle' -> its top hits' true captions mention red discs or circles (the shipped model works)
    block = proc.stdout.split("query: 'a red circle'")[1].split("query:")[0]
    hits = [line for line in block.splitlines() if re.match(r"\s+\d\. ", line)]
    assert len(hits) == 5
    assert sum("red" in h and ("circle" in h or "disc" in h) for h in hits) >= 3, block

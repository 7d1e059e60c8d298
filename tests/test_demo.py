"""The quick-start demo command, as `make demo` runs it but stopping after its example queries."""

import json
import re

import pytest

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `clip-hpc demo --no-wait` run for the module's tests (its output folder, the finished process)."""
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    return out, run_cli("demo", "--out", out, "--images", 300, "--no-wait", timeout=900)


@pytest.mark.mpi
@pytest.mark.slow
def test_demo_runs_every_stage_and_its_queries_find_matching_images(demo_run):
    out, proc = demo_run
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


def output_shape(line: str) -> str:
    """A printed line with what varies from run to run taken out: numbers, query texts, hit names, the token."""
    line = re.sub(r"token=\S+", "token=T", line)
    line = re.sub(r"query: '[^']*'", "query: Q", line)
    line = re.sub(r"\d+(?:\.\d+)?", "N", line)
    hit = re.match(r"(\s+N\. N  )", line)
    return hit.group(1) + "HIT" if hit else line


def readme_quick_start_output() -> list[str]:
    """The output block the README's quick start shows (the fenced block after 'From a run on')."""
    text = (ROOT / "README.md").read_text()
    block = text.split("From a run on", 1)[1].split("```\n", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.mpi
@pytest.mark.slow
def test_the_readme_quick_start_output_is_what_the_demo_prints(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {output_shape(line) for line in proc.stdout.replace(str(out), "demo-out").splitlines()}
    shown = readme_quick_start_output()
    assert len(shown) >= 6
    for line in shown:
        shape = output_shape(line)
        if shape.endswith(" ..."):  # the README cuts a long line: its start must be printed
            assert any(p.startswith(shape[:-4]) for p in printed), (line, sorted(printed))
        else:
            assert shape in printed, (line, sorted(printed))

"""examples/search.ipynb run by a real Jupyter kernel (nbclient + ipykernel), once on the demo INDEX_DIR and once
through `connect` to the served demo index; its grid is then drawn by headless Chromium and the screenshot read."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image, ImageStat

from conftest import ROOT
from test_web import CHROMIUM, chromium

NOTEBOOK = ROOT / "examples" / "search.ipynb"
GRID_CELL = 'results = index.search("a red circle", k=12)'


def run_notebook(source: str, export_to: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute the notebook top to bottom with SOURCE and EXPORT_TO from the environment; any cell error fails."""
    monkeypatch.setenv("CLIP_HPC_NOTEBOOK_SOURCE", source)
    monkeypatch.setenv("CLIP_HPC_NOTEBOOK_EXPORT", str(export_to))
    monkeypatch.delenv("CLIP_HPC_TOKEN", raising=False)  # the connection file must bring it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def html_of(notebook: nbformat.NotebookNode, starts: str) -> str:
    cell = next(c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(starts))
    return next(o["data"]["text/html"] for o in cell.outputs if "text/html" in o.get("data", {}))


def check_run(notebook: nbformat.NotebookNode, export_to: Path) -> str:
    grid = html_of(notebook, GRID_CELL)
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', grid)) == 12
    assert len(re.findall(r'<b class="score">0\.\d{4}</b>', grid)) == 12
    assert "circle" in grid  # captions drawn
    assert len(re.findall(r"<img ", html_of(notebook, "similar = index.search"))) == 8
    assert len(re.findall(r'<figure class="clip-hpc-hit"', html_of(notebook, 'index.search("a shape"'))) >= 1
    with zipfile.ZipFile(export_to) as exported:
        assert len([n for n in exported.namelist() if n.startswith("images/")]) == 5
    return grid


@pytest.fixture(scope="module")
def local_grid(demo_index, tmp_path_factory) -> str:
    export_to = tmp_path_factory.mktemp("nb-local") / "picked.zip"
    with pytest.MonkeyPatch.context() as monkeypatch:
        return check_run(run_notebook(str(demo_index), export_to, monkeypatch), export_to)


def test_notebook_runs_on_a_local_index(local_grid):
    assert local_grid


def test_notebook_runs_through_connect(demo_server, tmp_path, monkeypatch, local_grid):
    export_to = tmp_path / "picked.zip"
    grid = check_run(run_notebook(str(demo_server.connection_file), export_to, monkeypatch), export_to)
    scores = re.findall(r'<b class="score">([\d.]+)</b>', grid)
    assert scores == re.findall(r'<b class="score">([\d.]+)</b>', local_grid)  # the same search, served


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent")
def test_grid_draws_in_a_browser(local_grid, tmp_path, artifacts_dir):
    page = tmp_path / "grid.html"
    page.write_text(f"<!doctype html><html><body style='margin:0;background:#fff'>{local_grid}</body></html>")
    dom = chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert dom.count("<img ") == 12 and dom.count('class="score"') == 12
    shot = artifacts_dir / "notebook-grid.png"
    shot.unlink(missing_ok=True)
    chromium(page.as_uri(), tmp_path / "profile", f"--screenshot={shot}")
    with Image.open(shot) as image:
        grid_area = image.convert("RGB").crop((0, 0, image.width, 200))  # the first row of thumbnails
        colours = grid_area.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the grid area is blank"
        assert max(ImageStat.Stat(grid_area).stddev) > 20

"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing page or an API name that no
longer resolves fails), and its reference is generated from the public API's docstrings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PUBLIC = (
    "clip_hpc.api.local.open_index",
    "clip_hpc.api.remote.connect",
    "clip_hpc.api.local.Index.search",
    "clip_hpc.api.remote.RemoteIndex.search",
    "clip_hpc.api.results.Results.to_pandas",
    "clip_hpc.api.stages.embed",
    "clip_hpc.index.build.build_index",
)


def test_docs_build_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"  # the dev extra installs it: missing is a failure, not a skip
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = (tmp_path / "reference" / "index.html").read_text()
    missing = [name for name in PUBLIC if f'id="{name}"' not in reference]
    assert missing == [], f"the API reference lacks {missing}"
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {"api", "embed", "indexing", "serving", "clusters", "faults", "benchmarks", "design"} <= pages
    assert all((tmp_path / ("" if page == "index" else page) / "index.html").exists() for page in pages)

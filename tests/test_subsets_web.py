"""The gallery's subset panel in a real browser: for a text query, the count of images at or above the threshold
(estimated from the index, and saying so) and the exact `clip-hpc filter` command and sbatch line for it."""

from __future__ import annotations

import html
import re

from server_fixtures import TOKEN
from test_web import CHROMIUM, chromium, pytestmark  # noqa: F401  (the browser marks)


def test_subset_panel_counts_and_gives_the_filter_command(live_server, tmp_path):
    dom = chromium(f"{live_server.url}/?token={TOKEN}&q=it%27s+a+red+circle&k=12", tmp_path / "p", "--dump-dom")
    assert 'data-state="done"' in dom and '<div id="subset">' in dom, dom[-2000:]
    threshold = float(re.search(r'<output id="threshold-value">([-0-9.]+)</output>', dom).group(1))
    with live_server.client() as c:
        scores = [
            h["score"] for h in c.get("/api/search", params={"q": "it's a red circle", "k": 10000}).json()["results"]
        ]
    expected = sum(s >= threshold for s in scores)
    assert expected >= 12  # the default threshold is the last shown result's score
    count = html.unescape(re.search(r'<span id="subset-count">([^<]*)</span>', dom).group(1))
    assert count == f"about {expected:,} images score \u2265 {threshold:.2f} (estimated from the index)"
    command = html.unescape(re.search(r'<code id="filter-command">([^<]*)</code>', dom).group(1))
    args = f"EMB_DIR --out subset --text 'it'\\''s a red circle' --threshold {threshold:.2f} --to tars"
    assert command == f"clip-hpc filter {args}"
    assert html.unescape(re.search(r'<code id="sbatch-command">([^<]*)</code>', dom).group(1)) == (
        f"sbatch slurm/filter.sbatch {args}"
    )
    random = chromium(f"{live_server.url}/?token={TOKEN}&random=1&k=3", tmp_path / "p2", "--dump-dom")
    assert '<div id="subset" hidden="">' in random

"""The gallery in a real browser: headless Chromium opens it with the token, as a user does through the tunnel, and
the test reads the DOM the page's JavaScript built from the live server's answers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from server_fixtures import TOKEN

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (scripts/install_test_services.sh installs it)"
    ),
]


def chromium(url: str, profile: Path, *args: str) -> str:
    """One headless run with a fresh profile; --virtual-time-budget lets the page's fetches finish first."""
    shutil.rmtree(profile, ignore_errors=True)
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--window-size=1280,900",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def result_ids(dom: str) -> list[int]:
    return [int(i) for i in re.findall(r'<figure class="result[^"]*" data-id="(\d+)"', dom)]


def test_gallery_searches_by_text_through_the_token_url(live_server, tmp_path, artifacts_dir):
    url = f"{live_server.url}/?token={TOKEN}&q=a+red+circle&k=12"
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    assert 'data-state="done"' in dom, dom[-2000:]
    with live_server.client() as c:
        expected = [h["id"] for h in c.get("/api/search", params={"q": "a red circle", "k": 12}).json()["results"]]
    assert result_ids(dom) == expected
    assert '12 results for "a red circle"' in dom
    assert all(f'src="/api/images/{i}/thumb"' in dom for i in expected)

    shot = artifacts_dir / "gallery.png"
    shot.unlink(missing_ok=True)
    chromium(url, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000  # the thumbnails drew (a blank page is a few kB)


def test_gallery_more_like_this_and_random(live_server, tmp_path):
    like = chromium(f"{live_server.url}/?token={TOKEN}&like=7&k=5", tmp_path / "p1", "--dump-dom")
    assert result_ids(like)[0] == 7 and len(result_ids(like)) == 5
    drawn = chromium(f"{live_server.url}/?token={TOKEN}&random=1&k=9", tmp_path / "p2", "--dump-dom")
    assert len(set(result_ids(drawn))) == 9 and "a random draw" in drawn


def test_gallery_without_token_shows_nothing(live_server, tmp_path):
    dom = chromium(f"{live_server.url}/?q=red", tmp_path / "p3", "--dump-dom")
    assert "token missing or wrong" in dom and not result_ids(dom)

"""`clip-hpc search --url` (client/http_client.py) against a real server: any text a shell can hand it is one
line of results or one line of error, never a traceback. About 15 s (the session's live server)."""

from __future__ import annotations

import json

from conftest import run_cli


def _remote(live_server, *args: str):
    return run_cli("search", "--url", live_server.url, "--token", live_server.token, "--json", *args)


def test_a_text_too_long_for_a_url_is_one_line_from_the_server(live_server):
    proc = _remote(live_server, "red " * 20_000, "-k", "2")  # 80,000 characters: no URL holds it
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert proc.stderr.count("\n") == 1 and "at most 2000 characters" in proc.stderr
    short = _remote(live_server, "red " * 100, "-k", "2")
    assert short.returncode == 0 and len(json.loads(short.stdout)["results"]) == 2


def test_a_query_in_bytes_that_are_not_utf8_is_searched_as_cp1252(live_server):
    """A Latin-1 terminal sends `café` as b'caf\\xe9'; Python hands it over as a lone surrogate."""
    latin1 = _remote(live_server, "caf\udce9 au lait", "-k", "3")
    assert latin1.returncode == 0 and "Traceback" not in latin1.stderr, latin1.stderr[-800:]
    utf8 = _remote(live_server, "café au lait", "-k", "3")
    assert json.loads(latin1.stdout) == json.loads(utf8.stdout)

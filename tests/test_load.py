"""A short run of the load benchmark as a test: 8 clients for 15 s with 200 slow-loris connections open. No
request may fail, a normal query answers while the slow-loris connections are held, and the server's RSS grows by
a bounded amount. Cost: ~25 s."""

from __future__ import annotations

import pytest

from clip_hpc.client.endpoint import resolve_endpoint
from clip_hpc.devdata.load_bench import run_load
from clip_hpc.search.engine import SearchEngine
from server_fixtures import start_server


@pytest.mark.slow
def test_mixed_load_with_slowloris_has_no_errors_and_bounded_memory(served_index, tmp_path):
    engine = SearchEngine(served_index, model_name="clip-hpc-tiny", pretrained="none")
    ids = engine.meta.all_ids()
    engine.close()
    with start_server(served_index, tmp_path / "srv") as srv:
        endpoint = resolve_endpoint(connection_file=srv.connection_file, server=True)
        result = run_load(endpoint, server_pid=srv.proc.pid, ids=ids, clients=8, seconds=15, slowloris=200)
        with srv.client() as c:  # after the run, with a fresh slow-loris wave closed: still answering
            assert c.get("/api/search", params={"q": "a red circle", "k": 5}).status_code == 200
    summary = result.summary()
    assert summary["kinds"]["all"]["errors"] == 0, summary["error_samples"]
    assert all(summary["kinds"][k]["requests"] > 0 for k in ("text", "upload", "by_id")), summary
    assert summary["rss_after_mb"] - summary["rss_before_mb"] < 300, summary

"""Fixtures for the router tests: the real app (`create_app`) over a real served engine (`load_engine`, the tiny
model on the CPU, the session's `served_index`), called in process through FastAPI's TestClient (httpx, no socket)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from clip_hpc.server.app import create_app
from clip_hpc.server.routes.state import AppState
from clip_hpc.server.serve import load_engine
from clip_hpc.server.served_engine import ServedEngine

ROUTE_TOKEN = "route-token-" + "y" * 24
UPLOAD_LIMIT = 2**20


@dataclass
class InProcessApp:
    """The served engine (for direct searches to compare with) and clients with and without the token."""

    served: ServedEngine
    state: AppState
    client: TestClient
    anonymous: TestClient


@pytest.fixture(scope="session")
def routes_app(served_index) -> Iterator[InProcessApp]:
    served = load_engine(str(served_index), device="cpu")
    try:
        app = create_app(served, ROUTE_TOKEN, max_upload_bytes=UPLOAD_LIMIT)
        headers = {"Authorization": f"Bearer {ROUTE_TOKEN}"}
        with TestClient(app, headers=headers) as client, TestClient(app) as anonymous:
            yield InProcessApp(served, app.state.clip_hpc, client, anonymous)
    finally:
        served.close()  # the index, then the runtime's compute thread
        assert not served.runtime.compute.thread.is_alive()

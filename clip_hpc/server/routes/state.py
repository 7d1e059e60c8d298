"""`AppState`: what every route shares (the engine, the batched search, the images, the metrics), made once by
`app.create_app`, stored on `app.state` and handed to each route by the `State` dependency instead of closures."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException

from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.batched_search import BatchedSearch
from clip_hpc.server.metrics import Metrics, batch_metric_lines
from clip_hpc.server.served_engine import ServedEngine
from clip_hpc.server.served_images import ServedImages
from clip_hpc.server.shared_encoder import SharedEncoder


@dataclass(frozen=True)
class AppState:
    engine: SearchEngine
    encoder: SharedEncoder
    searcher: BatchedSearch
    images: ServedImages
    metrics: Metrics
    decode_slots: threading.BoundedSemaphore  # uploads and thumbnails: a full-size decode can take hundreds of MB
    recorded: dict[str, Any]  # what index.json records, for /api/info

    @classmethod
    def build(cls, served: ServedEngine, *, thumb_cache_size: int, max_decodes: int) -> AppState:
        engine, encoder, runtime = served.engine, served.encoder, served.runtime
        decode_slots = threading.BoundedSemaphore(max_decodes)
        metrics = Metrics(
            index_vectors=int(engine.n),
            cache_counts=encoder.cache_counts,
            extra=lambda: batch_metric_lines(runtime.batch_sizes()),
        )
        return cls(
            engine=engine,
            encoder=encoder,
            searcher=BatchedSearch(engine, encoder, runtime),
            images=ServedImages(engine, decode_slots, thumb_cache_size),
            metrics=metrics,
            decode_slots=decode_slots,
            recorded=engine.info.to_dict(),
        )

    def require_ids(self, ids: list[int]) -> None:
        missing = [i for i in ids if not self.engine.contains(i)]
        if missing:
            raise HTTPException(404, f"ids not in the index: {missing[:10]}")


def install_state(app: FastAPI, state: AppState) -> None:
    """Where `app_state` finds it."""
    app.state.clip_hpc = state


async def app_state(request: Request) -> AppState:
    """Async, so that FastAPI calls it on the event loop rather than sending each request through the threadpool."""
    state: AppState = request.app.state.clip_hpc
    return state


State = Annotated[AppState, Depends(app_state)]

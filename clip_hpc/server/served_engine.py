"""`ServedEngine`: an index loaded for serving, as `serve.load_engine` makes it and `app.create_app` takes it, so
the app gets the shared encoder and the runtime by name instead of fishing them out of the engine."""

from __future__ import annotations

from dataclasses import dataclass

from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.runtime import ServingRuntime
from clip_hpc.server.shared_encoder import SharedEncoder


@dataclass(frozen=True)
class ServedEngine:
    """The engine, the shared encoder it queries through (the very object `engine.encoder` is), and the runtime
    both run on."""

    engine: SearchEngine
    encoder: SharedEncoder
    runtime: ServingRuntime

    def __post_init__(self) -> None:
        if self.engine.encoder is not self.encoder:
            raise ValueError(
                "the engine must query through the served shared encoder: request threads would "
                "otherwise call the model concurrently"
            )

    def close(self) -> None:
        """The index files, then the compute thread: nothing may query it afterwards."""
        self.engine.close()
        self.runtime.compute.close()

"""LocalBackend: one aggregated worker in the router's own process (no launcher, no peers).

It runs the same engine loop as a worker rank (ranks/worker.py): one `Engine.step()` per turn,
whose StepOutput says everything that happened; with no router books to tell, only the finished
results leave. The job summary's worker entry is the engine's own `report()`, as on a rank.
"""

from __future__ import annotations

from kvrelay.ranks.engine.engine import Engine
from kvrelay.core.request import Request, RequestResult


class LocalBackend:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, request: Request) -> None:
        self.engine.add_request(request)

    def kv_capacity_tokens(self) -> int:
        return self.engine.kv.num_blocks * self.engine.kv.block_size

    def poll(self) -> list[RequestResult]:
        if not self.engine.has_work():
            return []
        return self.engine.step().finished

    def stats(self) -> dict:
        return {"workers": [{"role": "aggregated", **self.engine.report()}]}

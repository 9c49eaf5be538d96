"""LocalBackend: one aggregated worker in the router's own process (no launcher, no peers)."""

from __future__ import annotations

from dataclasses import asdict

from kvrelay.ranks.engine.engine import Engine
from kvrelay.core.request import Request, RequestResult


class LocalBackend:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, request: Request) -> None:
        self.engine.add_request(request)

    def poll(self) -> list[RequestResult]:
        if not self.engine.has_work():
            return []
        results = self.engine.step()
        self.engine.prefilled.clear()  # no router books to tell in one process
        return results

    def stats(self) -> dict:
        e = self.engine
        return {
            "workers": [
                {
                    "role": "aggregated",
                    "device": str(e.runner.device),
                    "kv_blocks": e.pool.num_blocks,
                    "block_size": e.pool.block_size,
                    **asdict(e.stats),
                    "memory": e.runner.memory_report(),
                }
            ]
        }

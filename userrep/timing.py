"""Wall time per stage of a job, logged as each stage ends."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.started = self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 2)
        self.last = now
        log.info(f"  {name:<22} {self.timings[name]:>7.2f}s")

    def finish(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.started, 2)}

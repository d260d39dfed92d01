"""Wall time per stage of a job, logged as each stage ends."""

from __future__ import annotations

import time


class Stopwatch:
    def __init__(self, log=print):
        self.log, self.timings = log, {}
        self.started = self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 2)
        self.last = now
        self.log(f"  {name:<22} {self.timings[name]:>7.2f}s")

    def finish(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.started, 2)}

"""Serving latency: Ray Serve + BentoML vs a bare FastAPI doing the same work, in one run (JSON).

Needs a promoted batch in WORK (run `make demo` first). Sequential requests from one client:

* embedding GET (online-store read), also from 8 clients at once,
* event POST (validate, durable log, state update, re-embed, online write; the server's own
  receipt -> online write time is reported too),
* recommend POST (online-store read + future-listening head).

    python bench/serving_latency.py [--work work] [--n 300]
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOKEN: str | None = None  # the servers' write token (main sets it once they are started)


def _call(url: str, body=None):
    from serving.smoke import call

    return call(url, body, TOKEN)


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def concurrent_gets(api: str, users: list[str], n: int, clients: int) -> dict:
    """``n`` GETs per client from ``clients`` threads at once; latency percentiles and requests/s."""
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[float]:
        timings = []
        for i in range(n):
            started = time.perf_counter()
            status, _ = _call(f"{api}/users/{users[(k * n + i) % len(users)]}/embedding")
            timings.append(time.perf_counter() - started)
            assert status == 200
        return timings

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = [t for ts in pool.map(client, range(clients)) for t in ts]
    return {**percentiles(timings), "requests_per_s": round(len(timings) / (time.perf_counter() - started), 1)}


def measure(api: str, tasks: str, users: list[str], items: list[str], ts: str, n: int) -> dict:
    out = {
        "embedding_get": concurrent_gets(api, users, n, clients=1),
        "embedding_get_8_clients": concurrent_gets(api, users, n, clients=8),
    }
    timings, fresh = [], []
    for i in range(n):
        body = {"user_id": users[i % len(users)], "item_id": items[i % len(items)], "ts": ts}
        started = time.perf_counter()
        status, reply = _call(f"{api}/events?wait=true", body)
        timings.append(time.perf_counter() - started)
        assert status == 200, reply
        fresh.append(reply["freshness_ms"] / 1000)
    out["event_post"] = percentiles(timings)
    out["event_receipt_to_online_write"] = percentiles(fresh)
    timings = []
    for i in range(n):
        started = time.perf_counter()
        status, _ = _call(f"{tasks}/recommend/artists", {"user_id": users[i % len(users)], "k": 10})
        timings.append(time.perf_counter() - started)
        assert status == 200
    out["recommend_post"] = percentiles(timings)
    return out


def main() -> None:
    from serving.auth import client_token
    from serving.smoke import free_port, promoted, start, stop

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    manifest, ids, items = promoted(args.work)
    users, items = ids[:200], items[:200]
    ts = manifest["as_of"]

    proc, api, tasks = start(args.work, args.work / "serve-bench.log")
    global TOKEN
    TOKEN = client_token(args.work)
    try:
        served = measure(api, tasks, users, items, ts, args.n)
    finally:
        stop(proc)
    port = free_port()
    bare = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("serving_bare.py")),
            "--work",
            str(args.work),
            "--port",
            str(port),
        ],
        start_new_session=True,
    )
    try:
        from serving.launch import wait_ready

        wait_ready(f"http://127.0.0.1:{port}/readyz", timeout_s=240, proc=bare)
        baseline = measure(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", users, items, ts, args.n)
    finally:
        bare.send_signal(signal.SIGINT)
        bare.wait(timeout=60)
    ratios = {k: round(served[k]["p50_ms"] / max(baseline[k]["p50_ms"], 1e-9), 2) for k in served}
    p99_ratios = {k: round(served[k]["p99_ms"] / max(baseline[k]["p99_ms"], 1e-9), 2) for k in served}
    print(
        json.dumps(
            {
                "requests_per_endpoint": args.n,
                "ray_serve_and_bentoml": served,
                "bare_fastapi": baseline,
                "p50_ratio_served_over_bare": ratios,
                "p99_ratio_served_over_bare": p99_ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

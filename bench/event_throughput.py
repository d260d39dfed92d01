"""Event ingestion throughput: acknowledged events/s at 1, 8 and 32 clients, one event or ten per
request, against `userrep serve` on a promoted batch (run `make demo` first), in one run (JSON).

Each client posts in a loop for `--seconds`. `ack` cells count an event once its request is
answered 202 (durable in the log); `wait` cells (`?wait=true`) once it is answered 200 (applied,
re-embedded, written online), and report the server's receipt -> online-write time
(`freshness_ms`); the last two cells offer a paced 100 events/s. Request latency is reported as
p50/p99.

    python bench/event_throughput.py [--work work] [--seconds 10] [--replicas 1] [--events-log redis://...] [--ingress serve] [--paced-only]
"""

import argparse
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TOKEN: str | None = None  # the servers' write token (main sets it once they are started)


def _call(url: str, body=None):
    from serving.smoke import call

    return call(url, body, TOKEN)


def run(
    api: str,
    users: list[str],
    items: list[str],
    ts: str,
    clients: int,
    per_request: int,
    seconds: float,
    run_id: str,
    wait: bool,
    rate: float | None = None,
) -> dict:
    """One cell; ``rate``: events/s offered in all (paced), else as fast as the clients go."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies, freshness, accepted, errors = [], [], [0], [0]

    def client(k: int) -> None:
        interval = None if rate is None else clients * per_request / rate  # seconds between this client's requests
        next_at = time.monotonic() + (0 if interval is None else interval * k / clients)
        while time.monotonic() < deadline:
            if interval is not None:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            n = next(counter)
            body = [
                {
                    "event_id": f"{run_id}-{n}-{j}",
                    "user_id": users[(n * per_request + j) % len(users)],
                    "item_id": items[(n + j) % len(items)],
                    "ts": ts,
                }
                for j in range(per_request)
            ]
            started = time.perf_counter()
            status, reply = _call(f"{api}/events" + ("?wait=true" if wait else ""), body)
            elapsed = time.perf_counter() - started
            with lock:
                if status == (200 if wait else 202):
                    accepted[0] += reply["accepted"]
                    latencies.append(elapsed)
                    freshness.append(reply["freshness_ms"])
                else:
                    errors[0] += 1

    if wait:  # the ack cells leave a backlog when they outrun the consumer: drain it, or it is measured here
        drained = time.monotonic()
        while _call(f"{api}/events?wait=true", [{"user_id": users[0], "item_id": items[0], "ts": ts}])[0] != 200:
            assert time.monotonic() - drained < 300, "backlog not drained in 5 minutes"
    started = time.monotonic()
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - started
    ms = np.array(latencies) * 1000
    return {
        "mode": "wait" if wait else "ack",
        "offered_events_per_s": rate,
        "clients": clients,
        "events_per_request": per_request,
        "events_per_s": round(accepted[0] / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 1),
        "errors": errors[0],
        "request_p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "request_p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "freshness_p50_ms": round(float(np.percentile(freshness, 50)), 1) if freshness else None,
        "freshness_p99_ms": round(float(np.percentile(freshness, 99)), 1) if freshness else None,
    }


def main() -> None:
    from serving.auth import client_token
    from serving.smoke import promoted, start, stop

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas of the embedding API")
    parser.add_argument(
        "--events-log", default="", help="default: the embedded SQLite log; or redis://HOST:PORT/STREAM"
    )
    parser.add_argument("--ingress", default="haproxy", help="haproxy (the default of userrep serve) or serve")
    parser.add_argument("--paced-only", action="store_true", help="only the two paced freshness cells")
    args = parser.parse_args()
    manifest, ids, items = promoted(args.work)
    users, items = ids[:2000], items[:500]
    run_id = f"bench-{int(time.time())}"
    options = ("--replicas", str(args.replicas), "--ingress", args.ingress) + (
        ("--events-log", args.events_log) if args.events_log else ()
    )
    proc, api, _ = start(args.work, args.work / "serve-events-bench.log", options=options)
    global TOKEN
    TOKEN = client_token(args.work)
    try:
        cells = (
            [(False, c, n, None) for n in (1, 10) for c in (1, 8, 32)]
            + [(True, c, n, None) for n in (1, 10) for c in (1, 8)]
            + [(True, 8, 1, 100.0), (True, 8, 10, 100.0)]
        )  # freshness at 100 events/s offered
        cells = cells[-2:] if args.paced_only else cells
        rows = [
            run(
                api,
                users,
                items,
                manifest["as_of"],
                clients,
                per_request,
                args.seconds,
                f"{run_id}-{wait}-{clients}-{per_request}-{rate}",
                wait,
                rate,
            )
            for wait, clients, per_request, rate in cells
        ]
    finally:
        stop(proc)
    print(
        json.dumps(
            {
                "seconds_per_cell": args.seconds,
                "users": len(ids),
                "replicas": args.replicas,
                "ingress": args.ingress,
                "events_log": args.events_log or "sqlite",
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Faults under load on the production profile: two API replicas sharing one Redis (AOF, fsync
always) as event stream and per-user state, 8 clients posting 10 events per request; a kill -9 of
one replica, then of Redis, mid-load. Prints JSON: events acknowledged, lost (acknowledged but
not in the stream), applied twice or not applied (each user's state weight against the
acknowledged events), and how long a killed replica took to answer /readyz again.

Needs a promoted batch in WORK (run `make demo` first) and `redis-server` on the PATH. Each
replica is the embedding API (serving/api.py) over ``OnlineService`` in one plain uvicorn process
(no Ray, so a kill -9 hits exactly one logger + consumer); it runs without the Feast store (the
shared state holds each changed user's newest embedding), which this bench does not measure.
A client whose request fails retries the same events (same ``event_id``s) on the other replica.

    python bench/replica_faults.py [--work work] [--seconds 14]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def replica_main(work: Path, port: int, log: str) -> None:
    import uvicorn

    from serving.api import Holder, create_app
    from userrep.online import OnlineService

    class One(Holder):
        service = OnlineService(work / "batches", None, log)

    One.service.watch(1.0)
    uvicorn.run(create_app(One), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_replica(work: Path, port: int, log: str, out: Path) -> tuple[subprocess.Popen, float]:
    """Start one replica; returns it and the seconds from process start to /readyz 200."""
    from serving.smoke import call

    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "replica", "--work", str(work), "--port", str(port), "--log", log],
        stdout=open(out, "a"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited; see {out}")
        try:
            if call(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return proc, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.05)


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    import redis

    from userrep.redislog import REDIS_DURABLE_ARGS

    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            *REDIS_DURABLE_ARGS,
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            if client.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def main() -> None:
    from serving.smoke import call, free_port, promoted
    from userrep.eventlog import open_log
    from userrep.state import decode_user

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--seconds", type=float, default=14.0)
    args = parser.parse_args()
    manifest, ids, items = promoted(args.work)
    users, items, batch = ids[:400], items[:200], manifest["batch_id"]
    scratch = Path(tempfile.mkdtemp(prefix="userrep-faults-"))
    redis_port, ports = free_port(), [free_port(), free_port()]
    redis_proc = start_redis(redis_port, scratch)
    where = f"redis://127.0.0.1:{redis_port}/faults-{uuid.uuid4().hex[:6]}"
    log = open_log(where)
    result = {"users": len(ids), "seconds": args.seconds}
    replicas = [None, None]
    try:
        replicas[0], result["first_replica_ready_s"] = start_replica(args.work, ports[0], where, scratch / "r0.log")
        replicas[1], result["second_replica_ready_s"] = start_replica(args.work, ports[1], where, scratch / "r1.log")
        before = {u: float(decode_user(b)[0].weight.sum()) for u, b in log.load(batch, users).items()}
        acked, lock, failures, stop = set(), threading.Lock(), [0], threading.Event()

        def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                body = [
                    {
                        "event_id": f"c{k}-{n}-{j}",
                        "user_id": users[(k * 37 + n * 10 + j) % len(users)],
                        "item_id": items[(n + j) % len(items)],
                        "ts": manifest["as_of"],
                    }
                    for j in range(10)
                ]
                n += 1
                for attempt in range(400):  # the same events until acknowledged, alternating replicas
                    try:
                        status, reply = call(f"http://127.0.0.1:{ports[(k + attempt) % 2]}/events", body)
                    except OSError:
                        status, reply = None, None
                    if status == 202:
                        with lock:
                            acked.update(reply["event_ids"] + reply["duplicates"])
                        break
                    with lock:
                        failures[0] += 1
                    time.sleep(0.05)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(args.seconds * 0.25)
            replicas[0].send_signal(signal.SIGKILL)  # logger + consumer gone mid-load
            replicas[0].wait()
            result["replica_killed_at_s"] = round(time.monotonic() - started, 1)
            replicas[0], result["killed_replica_ready_again_s"] = start_replica(
                args.work, ports[0], where, scratch / "r0.log"
            )
            time.sleep(max(0.0, args.seconds * 0.6 - (time.monotonic() - started)))
            redis_proc.send_signal(signal.SIGKILL)  # only the append-only file remains
            redis_proc.wait()
            result["redis_killed_at_s"] = round(time.monotonic() - started, 1)
            redis_proc = start_redis(redis_port, scratch)
            time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
            stop.set()
            for future in futures:
                future.result()
        result["events_acknowledged"] = len(acked)
        result["events_per_s"] = round(len(acked) / (time.monotonic() - started), 1)
        result["failed_requests_retried"] = failures[0]
        logged = {e["event_id"] for _, r in log.read() if r["kind"] == "events" for e in r["events"]}
        result["acknowledged_but_lost"] = len(acked - logged)
        expected = {u: before[u] for u in users}
        for event_id in acked & logged:
            k, n, j = (int(x) for x in event_id[1:].split("-"))
            expected[users[(k * 37 + n * 10 + j) % len(users)]] += 1.0
        deadline = time.monotonic() + 60
        while True:  # until the consumers caught up (or a minute)
            now = {u: float(decode_user(b)[0].weight.sum()) for u, b in log.load(batch, users).items()}
            if all(abs(now[u] - expected[u]) < 1e-6 for u in users) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        result["users_over_counted"] = sum(now[u] > expected[u] + 1e-6 for u in users)
        result["users_under_counted"] = sum(now[u] < expected[u] - 1e-6 for u in users)
        result["events_not_applied"] = round(sum(max(expected[u] - now[u], 0) for u in users))
    finally:
        for proc in replicas + [redis_proc]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "replica":
        replica = argparse.ArgumentParser()
        replica.add_argument("cmd")
        replica.add_argument("--work", type=Path)
        replica.add_argument("--port", type=int)
        replica.add_argument("--log")
        a = replica.parse_args()
        replica_main(a.work, a.port, a.log)
    else:
        main()

"""A short end-to-end smoke of both servers (the end of `make demo`): start `userrep serve`,
register a new user, post listening events, show the embedding move and the recommendations
change, ask for similar users, stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.auth import Tokens, client_token, ensure_write_token
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.registry import read_pointer

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body=None, token: str | None = None):
    """(status, parsed JSON) of a GET, or a POST of ``body``; ``token``: sent as a bearer token."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class Servers:
    """A started `userrep serve` (its process group), its two base URLs and its log."""

    proc: subprocess.Popen
    api: str
    tasks: str
    log_path: Path
    started: float  # time.perf_counter() at launch
    serving_at_launch: str | None  # the batch SERVING.json named when they were started

    def wait_ready(self, timeout_s: float = 240) -> None:
        """Until both servers answer (the serve command prints its last line), or raise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"userrep serve exited ({self.proc.returncode}); see {self.log_path}")
            if "Ctrl-C stops" in self.log_path.read_text():
                return
            time.sleep(1)
        stop(self.proc)
        raise TimeoutError(f"servers not ready after {timeout_s:.0f}s; see {self.log_path}")

    def wait_serving(self, batch_id: str, timeout_s: float = 120) -> None:
        """Until the embedding API answers with ``batch_id`` on ``CONFIRM`` calls in a row (its
        replicas reload on promotion, each on its own), or raise."""
        deadline, in_a_row, seen = time.monotonic() + timeout_s, 0, None
        while time.monotonic() < deadline:
            _, body = call(f"{self.api}/readyz")
            seen = body.get("batch_id")
            in_a_row = in_a_row + 1 if seen == batch_id else 0
            if in_a_row >= CONFIRM:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the embedding API still serves {seen} {timeout_s:.0f}s after {batch_id} was promoted")


SERVE_LOG = "serve.log"  # the smoke's servers' log, in the work dir
CONFIRM = 10  # /readyz answers in a row that count as every replica serving the batch


def launch(work: Path, log_path: Path, options: tuple[str, ...] = ()) -> Servers:
    """Start `userrep serve` (``options``: more of its flags) without waiting for it."""
    if not Tokens.from_env().write:
        ensure_write_token(work)  # here, not by the server: the client reads it before the server is up
    port, bento_port = free_port(), free_port()
    exe = Path(sys.executable).parent / "userrep"
    with open(log_path, "w") as output:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(exe), "serve", "--work", str(work), "--port", str(port), "--bento-port", str(bento_port), *options],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    serving = read_pointer(Path(work) / "batches")["serving"]
    return Servers(
        proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bento_port}", log_path, time.perf_counter(), serving
    )


def start(
    work: Path, log_path: Path, timeout_s: float = 240, options: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str, str]:
    """Start `userrep serve` (``options``: more of its flags); returns it and both base URLs once ready."""
    servers = launch(work, log_path, options)
    servers.wait_ready(timeout_s)
    return servers.proc, servers.api, servers.tasks


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Serve, Ray and BentoML shut down in order
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def promoted(work: Path) -> tuple[dict, list[str], list[str]]:
    """(manifest, user ids, item ids) of the batch serving under WORK (what the benchmarks post)."""
    from userrep.backfill import read_embeddings
    from userrep.batch.registry import batch_dir, serving_batch
    from userrep.data import load_dataset

    root = Path(work) / "batches"
    if serving_batch(root) is None:
        raise SystemExit(f"no promoted batch under {root}: run `make demo` first")
    directory = batch_dir(root, serving_batch(root))
    manifest = read_manifest(directory)
    ids, _, _ = read_embeddings(BatchDir(directory).embeddings)
    items = load_dataset(manifest["data"]["path"]).items.column("item_id").to_pylist()
    return manifest, [str(u) for u in ids], items


def _cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_smoke(
    work: Path,
    onboarding_artists: list[str],
    items: list[str],
    ts: str,
    replicas: int = 2,
    servers: Servers | None = None,
) -> dict:
    """Returns what it measured; raises if any step does not answer as it should. Two replicas of
    the embedding API by default: the sign-up, the events and the reads may land on either.
    ``servers``: already launched (``launch_servers``; the demo starts them while batch 2 trains),
    checked to serve the batch promoted since; otherwise started here."""
    work = Path(work)
    servers = servers or launch_servers(work, replicas)
    try:
        servers.wait_ready()
        serving = read_pointer(work / "batches")["serving"]
        servers.wait_serving(serving)
        how = (
            f"up in {time.perf_counter() - servers.started:.0f}s"
            if servers.serving_at_launch == serving
            else f"started while it trained, on {servers.serving_at_launch}; switched on promotion, no restart"
        )
        log.info(
            f"servers serving {serving} ({how}; {replicas} embedding API replicas sharing the event log and "
            f"user state): {servers.api} (docs {servers.api}/docs), {servers.tasks}"
        )
        api, tasks, token = servers.api, servers.tasks, client_token(work)
        user = f"demo-newcomer-{int(time.time())}"
        status, created = call(f"{api}/users", {"user_id": user, "onboarding_artists": onboarding_artists}, token)
        assert status == 201, created
        log.info(
            f"POST /users {user} (onboarding {onboarding_artists}) -> cold-start embedding of batch "
            f"{created['batch_id']}, |e| = {np.linalg.norm(created['embedding']):.2f}"
        )
        _, before = call(f"{tasks}/recommend/artists", {"user_id": user, "k": 5}, token)
        log.info(f"recommendations before listening: {[a['artist_id'] for a in before['artists']]}")
        events = [
            {"event_id": f"{user}:{i}", "user_id": user, "item_id": item, "ts": ts, "weight": 1.0}
            for i, item in enumerate(items)
        ]
        status, posted = call(f"{api}/events?wait=true", events, token)
        assert status == 200, posted
        moved = posted["users"][0]["embedding"]
        log.info(
            f"POST /events?wait=true ({len(events)} plays) -> embedding moved: cosine to cold start "
            f"{_cosine(created['embedding'], moved):.3f}; receipt -> online write {posted['freshness_ms']:.0f} ms"
        )
        status, retried = call(f"{api}/events", events, token)  # the client's retry after a lost reply
        assert status == 202 and retried["accepted"] == 0 and len(retried["duplicates"]) == len(events), retried
        log.info(
            f"POST /events again (a retry, same event_ids) -> 202 in {retried['freshness_ms']:.0f} ms: "
            f"{len(retried['duplicates'])} duplicates acknowledged, 0 applied"
        )
        _, after = call(f"{tasks}/recommend/artists", {"user_id": user, "k": 5}, token)
        log.info(f"recommendations after listening:  {[a['artist_id'] for a in after['artists']]}")
        _, similar = call(f"{api}/users/{user}/similar?k=3", token=token)
        log.info(f"similar users: {[(n['user_id'], n['score']) for n in similar['neighbours']]}")
        for name, route in default_routes().items():  # every other registered task's route
            status, answer = call(f"{tasks}{route}", {"user_id": user}, token)
            assert status == 200, answer
            shown = {k: v for k, v in answer.items() if k not in ("batch_id", "user_id")}
            log.info(f"POST {route} ({name}) -> {json.dumps(shown)[:160]}")
        return {
            "user": user,
            "cosine_moved": _cosine(created["embedding"], moved),
            "recommendations_changed": before["artists"] != after["artists"],
            "freshness_ms": posted["freshness_ms"],
        }
    finally:
        stop(servers.proc)
        log.info("servers stopped")


def default_routes() -> dict[str, str]:
    """The BentoML routes of the registered tasks (``userrep.tasks.registry``) whose request has
    a default for every field, beside future listening's, which the smoke calls itself."""
    from pydantic import ValidationError

    from userrep.tasks.registry import tasks

    found = {}
    for name, task in tasks().items():
        if task.route is None or task.request is None or task.route == "/recommend/artists":
            continue
        try:
            task.request()
        except ValidationError:  # a field the smoke cannot choose (e.g. which artists)
            continue
        found[name] = task.route
    return found


def launch_servers(work: Path, replicas: int = 2) -> Servers:
    """`userrep serve` for the smoke: ``replicas`` embedding API replicas, log in WORK/serve.log."""
    return launch(Path(work), Path(work) / SERVE_LOG, options=("--replicas", str(replicas)))

"""Both servers over real HTTP on 127.0.0.1: `userrep serve` started once for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from serving.auth import WRITE_TOKEN_FILE
from serving.smoke import free_port
from tests.conftest import copy_work
from userrep.backfill import read_embeddings
from userrep.baselines import decayed_matrix, user_artist_matrix
from userrep.batch import registry as batches
from userrep.batch.gate import run_gate
from userrep.batch.heads import load_head
from userrep.data import load_dataset
from userrep.encoders import events_before
from userrep.eventlog import open_log
from userrep.features import FeatureSpace
from userrep.featurize import build_user_features
from userrep.model import UserAutoencoder, embed
from userrep.onlinestore import online_history
from userrep.store import StoreConfig, open_store
from userrep.tasks.future_listening import deployed_scores

pytestmark = pytest.mark.slow


READ_TOKEN = "reader-" + "x" * 24  # the served fixture's read token (the environment's)
TOKEN: dict[str, str] = {}  # the write token `userrep serve` made in the work dir (the fixture reads it)


def call(url: str, body=None, raw: bytes | None = None, timeout: float = 30, auth: bool | str = True):
    """``auth``: True sends the write token (it reads too), a string sends that, False nothing."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    token = TOKEN["write"] if auth is True else auth or None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = {"raw": text}
        return exc.code, dict(exc.headers), parsed


@pytest.fixture(scope="module")
def served(small_world, two_batches, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve") / "work"
    copy_work(two_batches, work)
    root, ds = work / "batches", load_dataset(small_world)
    assert run_gate(root / "b2", root / "b1", ds, report=False)["passed"]
    port, bento_port = free_port(), free_port()
    # reads protected too; the write token is the one `userrep serve` makes in the work dir
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "USERREP_READ_TOKEN": READ_TOKEN}
    for name in ("USERREP_WRITE_TOKEN", "USERREP_WRITE_TOKEN_FILE"):
        env.pop(name, None)
    exe = Path(sys.executable).parent / "userrep"
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(
        [str(exe), "serve", "--work", str(work), "--port", str(port), "--bento-port", str(bento_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (work / "serve.log").read_text()[-3000:]
        if "Ctrl-C stops" in (work / "serve.log").read_text():
            break
        time.sleep(1)
    else:
        pytest.fail("servers not ready: " + (work / "serve.log").read_text()[-3000:])
    TOKEN["write"] = (work / WRITE_TOKEN_FILE).read_text().strip()
    yield SimpleServers(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bento_port}", root, ds, work)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the CLI stops Serve, Ray and BentoML
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


class SimpleServers:
    def __init__(self, api, tasks, root, ds, work):
        self.api, self.tasks, self.root, self.ds, self.work = api, tasks, root, ds, work


def batch_vector(root: Path, batch_id: str, user_id: str) -> np.ndarray:
    ids, vectors, _ = read_embeddings(root / batch_id / "embeddings.parquet")
    return vectors[list(ids).index(user_id)]


def user_history(served, batch_id: str, user_id: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The user's (plays, recent) of the head's artists from the batch's data, computed here."""
    space = FeatureSpace.load(served.root / batch_id / "encoders")
    as_of = pd.Timestamp(json.loads((served.root / batch_id / "manifest.json").read_text())["as_of"])
    events = events_before(served.ds, as_of)
    users, columns = np.array([user_id], dtype=object), space.artist_index(meta["artists"])
    plays = user_artist_matrix(events, space, users)[:, columns].toarray()
    half_life = meta["half_life_days"]
    recent = (
        plays if half_life is None else decayed_matrix(events, space, users, as_of, half_life)[:, columns].toarray()
    )
    return plays, recent


def top_artists(served, batch_id: str, user_id: str, k: int, with_history: bool = True) -> list[str]:
    head, meta = load_head(served.root / batch_id / "downstream" / "future_listening.pt")
    vector = batch_vector(served.root, batch_id, user_id)[None, :]
    plays, recent = user_history(served, batch_id, user_id, meta) if with_history else (None, None)
    return [meta["artists"][i] for i in np.argsort(-deployed_scores(head, meta, vector, plays, recent)[0])[:k]]


def test_health_embedding_and_similar(served):
    status, headers, body = call(f"{served.api}/readyz")
    assert status == 200 and body["batch_id"] == "b1" and headers["x-batch-id"] == "b1"
    user = "u0000003"
    status, headers, body = call(f"{served.api}/users/{user}/embedding")
    assert status == 200 and body["batch_id"] == "b1" and headers["x-batch-id"] == "b1"
    assert np.allclose(body["embedding"], batch_vector(served.root, "b1", user), atol=1e-6)
    status, _, body = call(f"{served.api}/users/{user}/similar?k=5")
    assert status == 200 and len(body["neighbours"]) == 5 and user not in [n["user_id"] for n in body["neighbours"]]
    scores = [n["score"] for n in body["neighbours"]]
    assert scores == sorted(scores, reverse=True)
    status, _, openapi = call(f"{served.api}/openapi.json")
    assert status == 200 and "/users/{user_id}/embedding" in openapi["paths"]


def test_an_event_updates_the_embedding_like_a_batch_recomputation(served):
    user, item = "u0000010", "t0000042"
    before = call(f"{served.api}/users/{user}/embedding")[2]["embedding"]
    events = [
        {"user_id": user, "item_id": item, "ts": "2026-07-03T09:30:00Z", "weight": 2.0},
        {"user_id": user, "item_id": "t0000043", "ts": "2026-07-03T10:00:00+02:00"},
    ]
    status, headers, body = call(f"{served.api}/events?wait=true", events)
    assert status == 200 and headers["x-batch-id"] == "b1" and body["freshness_ms"] > 0
    after = np.array(body["users"][0]["embedding"])
    assert not np.allclose(after, before)
    # The same history (the batch's data before its as_of, plus these events) recomputed in batch as of
    # the midnight after the newest event:
    extra = pa.table(
        {
            "user_id": [user, user],
            "item_id": [item, "t0000043"],
            "ts": pa.array(
                pd.to_datetime(["2026-07-03T09:30:00Z", "2026-07-03T08:00:00Z"], utc=True), pa.timestamp("us", tz="UTC")
            ),
            "weight": [2.0, 1.0],
        }
    )
    known = served.ds.events.filter(
        pa.compute.less(
            served.ds.events.column("ts"), pa.scalar(pd.Timestamp("2026-05-01", tz="UTC"), pa.timestamp("us", tz="UTC"))
        )
    )
    ds = replace(served.ds, events=pa.concat_tables([known, extra.cast(served.ds.events.schema)]))
    space = FeatureSpace.load(served.root / "b1" / "encoders")
    features = build_user_features(ds, "2026-07-04", space, user_ids=[user])
    expected = embed(UserAutoencoder.load(served.root / "b1" / "model.pt"), features.matrix)[0]
    assert np.allclose(after, expected, atol=1e-4)
    got = call(f"{served.api}/users/{user}/embedding")[2]  # read back from the online store
    assert np.allclose(got["embedding"], after, atol=1e-6)
    # The heads' history features follow the events too: the played artist gained the events' weight.
    _, meta = load_head(served.root / "b1" / "downstream" / "future_listening.pt")
    artists = space.artists[space.item_artist[space.item_index([item, "t0000043"])]]
    gained = {a: 0.0 for a in artists}
    for artist, weight in zip(artists, (2.0, 1.0)):
        gained[artist] += weight
    store = open_store(StoreConfig(home=served.work / "feast"), apply=False)
    online_plays, _ = online_history(store, [user], "b1", meta["artists"])
    batch_plays, _ = user_history(served, "b1", user, meta)
    for artist, weight in gained.items():
        column = meta["artists"].index(artist)
        assert online_plays[0, column] == pytest.approx(batch_plays[0, column] + weight)
    logged = [r for _, r in open_log(served.work / "online" / "events.sqlite").read()]
    assert any(r["kind"] == "events" and r["events"][0]["user_id"] == user for r in logged)  # durable before the reply


def test_a_retried_event_is_acknowledged_again_and_applied_once(served):
    event = {"event_id": "retry-test-1", "user_id": "u0000011", "item_id": "t0000042", "ts": "2026-07-03T09:30:00Z"}
    status, _, first = call(f"{served.api}/events", event)  # acknowledged once durable
    assert status == 202 and first["accepted"] == 1 and first["event_ids"] == ["retry-test-1"]
    status, _, again = call(f"{served.api}/events?wait=true", [event])  # the client's retry after a lost reply
    assert status == 200 and again["accepted"] == 0 and again["duplicates"] == ["retry-test-1"]
    logged = [
        e
        for _, r in open_log(served.work / "online" / "events.sqlite").read()
        for e in r.get("events", [])
        if e.get("event_id") == "retry-test-1"
    ]
    assert len(logged) == 1


def test_a_new_user_gets_an_embedding_and_recommendations_at_once(served):
    status, headers, body = call(
        f"{served.api}/users",
        {
            "user_id": "newcomer-1",
            "onboarding_artists": ["a000016"],
            "onboarding_genres": ["rock"],
            "attributes": {"country": "SE"},
        },
    )
    assert status == 201 and body["batch_id"] == "b1" and len(body["embedding"]) == 64
    status, _, recs = call(f"{served.tasks}/recommend/artists", {"user_id": "newcomer-1", "k": 5})
    assert status == 200 and recs["batch_id"] == "b1" and len(recs["artists"]) == 5
    status, _, similar = call(f"{served.api}/users/newcomer-1/similar?k=3")
    assert status == 200 and len(similar["neighbours"]) == 3  # inserted into the neighbour index


def test_bento_heads_match_offline_inference_and_refuse_other_batches(served):
    _, meta = load_head(served.root / "b1" / "downstream" / "future_listening.pt")
    # a user with history before b1's as_of (the other tests post events for u0000010 and u0000030)
    user = next(u for u in (f"u{i:07d}" for i in range(20, 100)) if user_history(served, "b1", u, meta)[0].sum() > 0)
    vector = batch_vector(served.root, "b1", user)
    status, _, body = call(
        f"{served.tasks}/recommend/artists", {"embedding": vector.tolist(), "batch_id": "b1", "k": 5}
    )
    assert status == 200 and [a["artist_id"] for a in body["artists"]] == top_artists(served, "b1", user, 5, False)
    # By user id the head also takes the user's history of each artist (from the online store):
    status, _, by_id = call(f"{served.tasks}/recommend/artists", {"user_id": user, "k": 5})
    assert status == 200 and [a["artist_id"] for a in by_id["artists"]] == top_artists(served, "b1", user, 5)
    if meta["design"] == "embedding+history":  # the artists the user played score differently with the history
        every = {"k": len(meta["artists"])}
        plain = call(f"{served.tasks}/recommend/artists", {"embedding": vector.tolist(), "batch_id": "b1", **every})[2]
        scored = call(f"{served.tasks}/recommend/artists", {"user_id": user, **every})[2]
        plain = {a["artist_id"]: a["score"] for a in plain["artists"]}
        assert max(abs(a["score"] - plain[a["artist_id"]]) for a in scored["artists"]) > 1e-3
    # b2 is built but not live (never promoted): an embedding of it is refused, naming it
    status, _, body = call(f"{served.tasks}/recommend/artists", {"embedding": vector.tolist(), "batch_id": "b2"})
    assert status == 410 and "b2" in json.dumps(body)
    status, _, body = call(f"{served.tasks}/recommend/artists", {"user_id": user, "batch_id": "b9"})
    assert status == 404 and "b9" in json.dumps(body)
    artists = meta["artists"][:3]
    status, _, body = call(f"{served.tasks}/predict/artist-preference", {"user_id": user, "artists": artists})
    assert status == 200 and set(body["probabilities"]) == set(artists)
    assert all(0 < p < 1 for p in body["probabilities"].values())


BAD_API = [
    ("malformed JSON", "/events", b'{"user_id": "u0000001",', "body"),
    (
        "wrong type",
        "/events",
        {"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01", "weight": "heavy"},
        "weight",
    ),
    (
        "unknown field",
        "/events",
        {"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01", "mood": "happy"},
        "mood",
    ),
    (
        "NaN weight",
        "/events",
        b'{"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01", "weight": NaN}',
        "weight",
    ),
    (
        "infinite weight",
        "/events",
        b'{"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01", "weight": 1e999}',
        "weight",
    ),
    (
        "negative weight",
        "/events",
        {"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01", "weight": -1},
        "weight",
    ),
    ("bad timestamp", "/events", {"user_id": "u0000001", "item_id": "t0000001", "ts": "yesterday"}, "ts"),
    (
        "far-future timestamp",
        "/events",
        {"user_id": "u0000001", "item_id": "t0000001", "ts": "2099-01-01T00:00:00Z"},
        "events[0].ts",
    ),
    (
        "empty event_id",
        "/events",
        {"event_id": "", "user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01"},
        "event_id",
    ),
    ("unknown item", "/events", {"user_id": "u0000001", "item_id": "no-such-item", "ts": "2026-07-01"}, "item_id"),
    ("empty list", "/events", [], "events"),
    ("oversized body", "/events", b"[" + b" " * (2 << 20) + b"]", "body"),
    ("user without id", "/users", {"onboarding_artists": ["a000016"]}, "user_id"),
]


@pytest.mark.parametrize("name, path, payload, field", BAD_API, ids=[b[0] for b in BAD_API])
def test_bad_input_is_a_4xx_naming_the_field(served, name, path, payload, field):
    raw = payload if isinstance(payload, bytes) else None
    status, _, body = call(served.api + path, None if raw else payload, raw=raw)
    assert 400 <= status < 500, (status, body)
    text = json.dumps(body)
    assert field in text and "Traceback" not in text
    assert call(f"{served.api}/healthz")[0] == 200  # still serving


def test_unknown_users_are_404_with_a_hint(served):
    status, _, body = call(f"{served.api}/users/nobody/embedding")
    assert status == 404 and "user_id" in body["error"] and "POST /users" in body["hint"]
    status, _, body = call(f"{served.api}/events", {"user_id": "nobody", "item_id": "t0000001", "ts": "2026-07-01"})
    assert status == 404
    status, _, body = call(f"{served.tasks}/recommend/artists", {"user_id": "nobody"})
    assert status == 404 and "user_id" in json.dumps(body)
    status, _, body = call(f"{served.tasks}/recommend/artists", {"user_id": "u0000001", "surprise": 1})
    assert 400 <= status < 500 and "surprise" in json.dumps(body)


def test_writes_for_an_erased_id_are_410_naming_it(served):
    from userrep.erasure import id_hash
    from userrep.eventlog import default_log, open_log

    user = "erase-me-1"
    assert call(f"{served.api}/users", {"user_id": user, "onboarding_artists": ["a000016"]})[0] == 201
    # the record ``userrep users forget`` writes in the log (tests/test_erasure.py runs the whole command)
    open_log(default_log(served.root)).erase({id_hash(user): "2026-07-01T00:00:00+00:00"})
    status, _, body = call(f"{served.api}/events", {"user_id": user, "item_id": "t0000001", "ts": "2026-07-01"})
    assert status == 410 and "user_id" in body["error"] and user in body["error"]
    status, _, body = call(f"{served.api}/users", {"user_id": user})
    assert status == 410 and "erased" in body["error"]


def test_batch_switch_under_concurrent_readers_never_mixes_batches(served):
    user = "u0000030"
    vectors = {b: batch_vector(served.root, b, user) for b in ("b1", "b2")}
    tops = {b: top_artists(served, b, user, 3) for b in ("b1", "b2")}
    seen, problems, stop = [], [], threading.Event()

    def read_embeddings_loop():
        while not stop.is_set():
            status, headers, body = call(f"{served.api}/users/{user}/embedding")
            if status != 200 or headers.get("x-batch-id") != body.get("batch_id"):
                problems.append(("embedding", status, body))
                continue
            if not np.allclose(body["embedding"], vectors[body["batch_id"]], atol=1e-5):
                problems.append(("mixed embedding", body["batch_id"]))
            seen.append(("api", body["batch_id"]))

    def read_recommendations_loop():
        while not stop.is_set():
            status, _, body = call(f"{served.tasks}/recommend/artists", {"user_id": user, "k": 3})
            if status != 200:
                problems.append(("recommend", status, body))
                continue
            if [a["artist_id"] for a in body["artists"]] != tops[body["batch_id"]]:
                problems.append(("mixed head/embedding", body["batch_id"]))
            seen.append(("tasks", body["batch_id"]))

    threads = [
        threading.Thread(target=f) for f in (read_embeddings_loop, read_embeddings_loop, read_recommendations_loop)
    ]
    for t in threads:
        t.start()
    time.sleep(2)
    batches.promote(served.root, "b2")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not {("api", "b2"), ("tasks", "b2")} <= set(seen[-50:]):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not problems, problems[:5]
    assert ("api", "b1") in seen and ("api", "b2") in seen and ("tasks", "b1") in seen and ("tasks", "b2") in seen
    last = {kind: batch for kind, batch in seen}
    assert last == {"api": "b2", "tasks": "b2"}
    # a consumer still on b1 (kept live: the previous batch) reads b1's coordinates and b1's heads
    status, headers, body = call(f"{served.api}/users/{user}/embedding?batch_id=b1")
    assert status == 200 and body["batch_id"] == headers.get("x-batch-id") == "b1"
    np.testing.assert_allclose(body["embedding"], vectors["b1"], atol=1e-5)
    status, _, body = call(f"{served.tasks}/recommend/artists", {"user_id": user, "k": 3, "batch_id": "b1"})
    assert status == 200 and body["batch_id"] == "b1" and [a["artist_id"] for a in body["artists"]] == tops["b1"]


def test_writes_need_the_write_token_and_reads_a_read_token(served):
    """No token: 401 naming the header (with WWW-Authenticate); the read token writes nothing
    (403) but reads both servers; a wrong token is a 403; probes stay open. The token file
    `userrep serve` made is private to its owner, and neither token reaches the servers' log."""
    event = {"user_id": "u0000001", "item_id": "t0000001", "ts": "2026-07-01"}
    status, headers, body = call(f"{served.api}/events", event, auth=False)
    assert (
        status == 401 and "Authorization: Bearer" in body["error"] and headers["www-authenticate"].startswith("Bearer")
    )
    assert call(f"{served.api}/users", {"user_id": "intruder"}, auth=False)[0] == 401
    assert call(f"{served.api}/events", event, auth=READ_TOKEN)[0] == 403
    assert call(f"{served.api}/events", event, auth=TOKEN["write"][:-1] + "!")[0] == 403
    assert call(f"{served.api}/users/u0000001/embedding", auth=False)[0] == 401
    assert call(f"{served.api}/users/u0000001/embedding", auth=READ_TOKEN)[0] == 200
    assert call(f"{served.api}/users/u0000001/embedding", auth=TOKEN["write"])[0] == 200
    recommend = {"user_id": "u0000001", "k": 3}
    assert call(f"{served.tasks}/recommend/artists", recommend, auth=False)[0] == 401
    assert call(f"{served.tasks}/recommend/artists", recommend, auth="wrong")[0] == 403
    assert call(f"{served.tasks}/recommend/artists", recommend, auth=READ_TOKEN)[0] == 200
    assert call(f"{served.api}/healthz", auth=False)[0] == 200 and call(f"{served.api}/readyz", auth=False)[0] == 200
    assert (served.work / WRITE_TOKEN_FILE).stat().st_mode & 0o077 == 0
    logs = (served.work / "serve.log").read_text()
    assert "secrets/write.token" in logs and TOKEN["write"] not in logs and READ_TOKEN not in logs


# Fuzzing both servers from their own OpenAPI specs (schemathesis; loopback only, bounded examples):
# whatever a client sends, never a 5xx. Each operation's cases come from its strategy (schemathesis's
# pytest fixtures do not run under this pytest). Last in the module: the generated writes add users.
FUZZ_EXAMPLES = 40  # per operation


@pytest.mark.parametrize("server", ["api", "tasks"])
def test_fuzz_both_servers_never_answer_with_a_server_error(served, server):
    from schemathesis.checks import not_a_server_error

    url = f"{served.api}/openapi.json" if server == "api" else f"{served.tasks}/docs.json"
    schema = schemathesis.openapi.from_url(url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.method.upper() == "POST" for op in operations), [op.label for op in operations]
    headers = {"Authorization": f"Bearer {TOKEN['write']}"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)

        fuzz()

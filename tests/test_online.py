"""The online core (``userrep.online``) without HTTP: idempotent writes, bounded and per-user time,
group commit, events reaching the next batch. Every test runs on both event-log backends: the
embedded file and a Redis stream on a real redis-server (AOF, fsync always) started for the tests."""

from __future__ import annotations

import shutil
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from userrep.batch.build import BuildConfig, build_batch
from userrep.batch.registry import _write_pointer
from userrep.eventlog import open_log
from userrep.model import AEConfig, embed
from userrep.online import OnlineService
from userrep.state import FeatureState, state_features, user_clocks

pytestmark = pytest.mark.usefixtures("closing_services")


@pytest.fixture(scope="module")
def served_root(small_world, tmp_path_factory):
    """One batch (no Feast, no heads) set serving by hand: these tests are about the online core."""
    root = tmp_path_factory.mktemp("online") / "batches"
    build_batch(
        small_world,
        root / "b1",
        "2026-05-01",
        BuildConfig(ae=AEConfig(epochs=3), downstream=None),
        batch_id="b1",
    )
    _write_pointer(root, {"serving": "b1", "history": []})
    return root


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.slow)])
def log(request, tmp_path):
    """Where the service logs writes: a file, or a fresh stream on the test Redis."""
    if request.param == "file":
        return str(tmp_path / "online" / "events.sqlite")
    return f"redis://{request.getfixturevalue('redis_server')}/events-{uuid.uuid4().hex[:8]}"


def service(root, where) -> OnlineService:
    return OnlineService(root, store=None, events_log=where)


def settled(check, timeout_s: float = 30.0) -> None:
    """Wait until ``check()`` holds (records applied by a consumer in the background)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not applied in time"
        time.sleep(0.05)


def logged(where) -> list[dict]:
    """Every event in the log, in order."""
    return [e for _, record in open_log(where).read() if record["kind"] == "events" for e in record["events"]]


def weight_of(online: OnlineService, user: str) -> float:
    """The user's play weight in the shared state of the serving batch."""
    return float(online.user_state(user)[0].weight.sum())


def test_a_retried_event_id_is_acknowledged_and_applied_once_even_after_a_restart(served_root, log):
    online = service(served_root, log)
    user = "u0000005"
    before = weight_of(online, user)
    event = {
        "event_id": "client-7:1",
        "user_id": user,
        "item_id": "t0000001",
        "ts": "2026-05-02T10:00:00Z",
        "weight": 3.0,
    }
    first = online.post_events([event])
    assert first["accepted"] == 1 and first["duplicates"] == []
    again = online.post_events([event, {**event, "event_id": "client-7:2"}, {**event, "event_id": "client-7:2"}])
    assert again["accepted"] == 1 and again["duplicates"] == ["client-7:1", "client-7:2"]
    assert weight_of(online, user) == pytest.approx(before + 6.0)  # 3 + 3, not 3 x 4
    assert [e["event_id"] for e in logged(log)] == ["client-7:1", "client-7:2"]
    restarted = service(served_root, log)  # ids come back from the durable log
    assert restarted.post_events([event])["accepted"] == 0
    assert weight_of(restarted, user) == pytest.approx(before + 6.0)


def test_a_far_future_ts_is_refused_by_field_and_nothing_is_logged(served_root, log):
    online = service(served_root, log)
    late = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=2)).isoformat()
    ok = {"user_id": "u0000006", "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}
    with pytest.raises(ValueError, match=r"events\[1\]\.ts: .* later than the server's clock"):
        online.post_events([ok, {**ok, "ts": late}])
    assert logged(log) == []
    soon = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(minutes=30)).isoformat()  # inside the allowed skew
    assert online.post_events([{**ok, "ts": soon}])["accepted"] == 1


def test_one_users_late_event_moves_only_that_users_windows(served_root, log):
    online = service(served_root, log)
    mover, bystander = "u0000007", "u0000008"
    now = pd.Timestamp.now(tz="UTC").isoformat()  # months after the batch: the mover's 7/30/180-day windows empty
    online.post_events([{"user_id": mover, "item_id": "t0000001", "ts": now}])
    online.post_events([{"user_id": bystander, "item_id": "t0000002", "ts": "2026-05-01T12:00:00Z"}])
    state = FeatureState(online.batch.space, {u: online.user_state(u)[0] for u in (mover, bystander)})
    clocks = dict(zip([mover, bystander], user_clocks(state, [mover, bystander], online.batch.as_of)))
    assert clocks[mover] > pd.Timestamp("2026-11-01", tz="UTC")
    assert clocks[bystander] == pd.Timestamp("2026-05-02", tz="UTC")  # the midnight after its own event
    # The bystander's embedding is its history embedded as of its own clock, not the mover's:
    got = np.array(online.embedding(bystander)["embedding"])
    model = online.batch.model
    own = embed(model, state_features(state, [bystander], clocks[bystander]).matrix)[0]
    moved = embed(model, state_features(state, [bystander], clocks[mover]).matrix)[0]
    assert np.allclose(got, own, atol=1e-5) and not np.allclose(got, moved, atol=1e-2)


def test_concurrent_writers_are_committed_together_and_each_event_counts_once(served_root, log):
    from concurrent.futures import ThreadPoolExecutor

    online = service(served_root, log)
    users = [f"u{i:07d}" for i in range(40, 48)]
    before = {u: weight_of(online, u) for u in users}

    def client(k: int) -> list[dict]:  # each client sends its 10 events twice (a retry) and one shared id
        user = users[k]
        events = [
            {"event_id": f"c{k}-{j}", "user_id": user, "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}
            for j in range(10)
        ]
        shared = {"event_id": "shared", "user_id": users[0], "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}
        return [online.post_events(events), online.post_events(events + [shared])]

    with ThreadPoolExecutor(8) as pool:
        replies = [r for rs in pool.map(client, range(8)) for r in rs]
    assert sum(r["accepted"] for r in replies) == 8 * 10 + 1
    for k, user in enumerate(users):
        assert weight_of(online, user) == pytest.approx(before[user] + 10 + (k == 0))
    ids = [e["event_id"] for e in logged(log)]
    assert len(ids) == len(set(ids)) == 81


def test_events_posted_after_a_batch_reach_the_next_batchs_training_data_and_state_once(small_world, tmp_path, log):
    import shutil

    import pyarrow.compute as pc

    from userrep.batch.registry import read_pointer
    from userrep.data import load_dataset
    from userrep.eventlog import compact, part_files

    data = tmp_path / "world"
    shutil.copytree(small_world, data)  # compaction writes into the dataset
    root = tmp_path / "batches"
    config = BuildConfig(ae=AEConfig(epochs=2), downstream=None)
    build_batch(data, root / "b1", "2026-05-01", config, batch_id="b1")
    _write_pointer(root, {"serving": "b1", "history": []})
    online = service(root, log)
    user, item = "u0000009", "t0000003"

    def originally(before: str) -> float:  # the user's play weight in the dataset as shipped
        ev = load_dataset(small_world).events
        mask = pc.and_(pc.equal(ev.column("user_id"), user), pc.less(ev.column("ts"), pd.Timestamp(before, tz="UTC")))
        return float(pc.sum(ev.filter(mask).column("weight")).as_py() or 0.0)

    posted = [
        {"event_id": f"late-{j}", "user_id": user, "item_id": item, "ts": f"2026-05-1{j}T08:00:00Z", "weight": 2.0}
        for j in range(3)
    ]  # between b1's as_of and b2's
    online.post_events(posted)
    online.post_events([{"event_id": "after-b2", "user_id": user, "item_id": item, "ts": "2026-05-25T08:00:00Z"}])
    online.register_user("signed-up-online", ["a000001"])
    done = compact(log, data)
    assert done["events"] == 4 and len(part_files(data)) == 4  # one part per day
    # retention: the compacted events (all applied by b1's group) left the log; the sign-up stays
    assert done["trimmed_through"] == done["to"] and logged(log) == []
    assert [r["kind"] for _, r in open_log(log).read()] == ["user"]
    assert compact(log, data)["events"] == 0  # a second run appends nothing
    events = load_dataset(data).events
    ours = events.filter(pc.and_(pc.equal(events.column("user_id"), user), pc.equal(events.column("item_id"), item)))
    assert pc.sum(pc.greater_equal(ours.column("ts"), pd.Timestamp("2026-05-10", tz="UTC"))).as_py() == 4

    manifest = build_batch(data, root / "b2", "2026-05-20", config, batch_id="b2")
    assert manifest["data"]["events_watermark"] == done["to"]
    assert any(name.startswith("events.online/") for name in manifest["data"]["fingerprint"])
    _write_pointer(root, {"serving": "b2", "history": ["b1"]})
    assert read_pointer(root)["serving"] == "b2" and online.reload()
    # b2's state: the shipped history before its as_of, the three compacted plays (from its data, not
    # replayed), and the play after its as_of (replayed from the log): each counted once.
    expected = originally("2026-05-20") + 3 * 2.0 + 1.0
    assert weight_of(online, user) == pytest.approx(expected)
    assert online.user_state("signed-up-online")[0].onboarding_artists == ("a000001",)
    restarted = service(root, log)  # b2's shared state is ready: nothing is rebuilt or replayed
    assert restarted.batch.start == online.batch.start and weight_of(restarted, user) == pytest.approx(expected)
    # b1 built fresh now, after the compaction moved its later events from the log into the data:
    # each counted once (from the data; the log no longer holds them)
    open_log(log).drop("b1")
    _write_pointer(root, {"serving": "b1", "history": []})
    assert restarted.reload() and restarted.batch.batch_id == "b1"
    assert weight_of(restarted, user) == pytest.approx(originally("2026-05-01") + 3 * 2.0 + 1.0)


def test_an_acknowledged_write_is_durable_at_once_and_applied_in_order(served_root, log):
    online = service(served_root, log)
    user = "u0000012"
    before = weight_of(online, user)
    event = {"event_id": "ack-1", "user_id": user, "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z", "weight": 2.0}
    ack = online.post_events([event], wait=False)
    assert ack["accepted"] == 1 and ack["event_ids"] == ["ack-1"] and "users" not in ack
    assert "ack-1" in [e.get("event_id") for e in logged(log)]  # in the log before the reply
    done = online.post_events([{**event, "event_id": "ack-2"}], wait=True)  # queued after ack-1
    assert done["users"][0]["user_id"] == user and weight_of(online, user) == pytest.approx(before + 4.0)


def test_two_replicas_consuming_the_same_users_lose_no_update(served_root, log, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import userrep.online

    monkeypatch.setattr(userrep.online, "DELIVER", 2)  # small takes: the two consumers interleave on the backlog
    replicas = [service(served_root, log), service(served_root, log)]  # two consumers of one group
    users = [f"u{i:07d}" for i in range(60, 64)]
    before = {u: weight_of(replicas[0], u) for u in users}

    def client(k: int) -> None:  # every request touches every user, through either replica
        for j in range(6):
            replicas[k % 2].post_events(
                [{"user_id": u, "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"} for u in users], wait=j % 3 == 2
            )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    settled(lambda: all(weight_of(replicas[1], u) == pytest.approx(before[u] + 48) for u in users))
    time.sleep(0.3)  # nothing is applied twice afterwards either
    assert all(weight_of(replicas[0], u) == pytest.approx(before[u] + 48) for u in users)
    assert all(r.applied_records > 0 for r in replicas)  # both did part of the work


def test_a_consumer_that_dies_mid_batch_leaves_its_records_to_another_applied_once(served_root, log):
    writer = OnlineService(served_root, store=None, events_log=log, consumer=False)
    user = "u0000070"
    before = weight_of(writer, user)
    for j in range(5):
        writer.post_events(
            [{"event_id": f"d{j}", "user_id": user, "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}], wait=False
        )
    batch = writer.batch.batch_id
    taken = writer.events_log.deliver(batch, "doomed", 64, 60_000)  # a consumer takes them, then dies
    assert len(taken) == 5 and weight_of(writer, user) == pytest.approx(before)
    survivor = OnlineService(served_root, store=None, events_log=log, claim_idle_ms=300)
    settled(lambda: weight_of(survivor, user) == pytest.approx(before + 5))  # taken over once idle
    # The "dead" one was only stalled: it wakes and commits what it took; nothing is applied twice.
    assert writer.consume(writer.batch, taken) == []
    assert weight_of(writer, user) == pytest.approx(before + 5)


def test_a_replica_hears_when_another_replicas_consumer_applies_its_records(served_root, log):
    import threading

    writer = OnlineService(served_root, store=None, events_log=log, consumer=False)
    ack = writer.post_events(
        [{"event_id": "heard-1", "user_id": "u0000072", "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}],
        wait=False,
    )
    assert ack["accepted"] == 1
    position, batch = open_log(log).last(), writer.batch.batch_id
    follower, heard, stopped = open_log(log), threading.Event(), threading.Event()

    def notify() -> None:  # a wake-up that finds the record applied: what a waiting request needs
        if follower.applied(batch, [position]):
            heard.set()

    thread = threading.Thread(target=follower.follow, args=(notify, stopped), daemon=True)
    thread.start()
    time.sleep(0.2)  # subscribed before the other replica commits
    assert not heard.is_set()
    other = service(served_root, log)  # another replica's consumer applies it
    try:
        assert heard.wait(30), "no notification after another replica's commit"
    finally:
        stopped.set()
        other.close()
        writer.close()
    thread.join(5)
    assert not thread.is_alive()  # follow returns once stopped


def test_a_wait_with_no_consumer_running_times_out_naming_the_events_durable(served_root, log, monkeypatch):
    import userrep.online
    from userrep.online import NotApplied

    monkeypatch.setattr(userrep.online, "WAIT_S", 0.3)
    alone = OnlineService(served_root, store=None, events_log=log, consumer=False)
    event = {"event_id": "lonely-1", "user_id": "u0000071", "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}
    with pytest.raises(NotApplied, match="durable"):
        alone.post_events([event], wait=True)
    assert [e["event_id"] for e in logged(log)] == ["lonely-1"]  # acknowledged by the log all the same
    assert alone.post_events([event], wait=False)["duplicates"] == ["lonely-1"]


@pytest.mark.slow
def test_acknowledged_events_survive_a_kill_9_of_redis(served_root, tmp_path):
    import signal

    from serving.smoke import free_port
    from tests.conftest import start_redis

    port, workdir = free_port(), tmp_path / "redis"
    workdir.mkdir()
    proc = start_redis(port, workdir)
    where = f"redis://127.0.0.1:{port}/events"
    try:
        online = service(served_root, where)
        acked = [
            online.post_events(
                [
                    {
                        "event_id": f"k{i}",
                        "user_id": f"u{i % 50:07d}",
                        "item_id": "t0000001",
                        "ts": "2026-05-02T10:00:00Z",
                    }
                ],
                wait=False,
            )["event_ids"][0]
            for i in range(40)
        ]
        proc.send_signal(signal.SIGKILL)  # no shutdown, no final save: only the append-only file remains
        proc.wait(timeout=10)
        proc = start_redis(port, workdir)
        assert [e["event_id"] for e in logged(where)] == acked
        restarted = service(served_root, where)  # replays the stream: every acknowledged event, once
        assert restarted.post_events(
            [{"event_id": "k0", "user_id": "u0000000", "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"}]
        )["duplicates"] == ["k0"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _with_built_index(served_root, tmp_path, ids_order=slice(None)):
    """A copy of the served batch whose downstream holds an HNSW neighbour index, as the pipeline
    writes one above ``similar_users.EXACT_MAX`` users (here forced on 1,500)."""
    import faiss

    from userrep.backfill import read_embeddings
    from userrep.tasks.similar_users import build_index

    root = tmp_path / "batches"
    shutil.copytree(served_root / "b1", root / "b1")
    _write_pointer(root, {"serving": "b1", "history": []})
    ids, vectors, _ = read_embeddings(root / "b1" / "embeddings.parquet")
    (root / "b1" / "downstream").mkdir()
    faiss.write_index(build_index(vectors, exact_max=10), str(root / "b1" / "downstream" / "similar_users.faiss"))
    np.save(root / "b1" / "downstream" / "similar_users.ids.npy", ids[ids_order].astype(str))
    return root, ids, vectors


def test_serving_loads_the_pipelines_hnsw_index_and_keeps_it_current(served_root, tmp_path):
    import faiss

    root, ids, vectors = _with_built_index(served_root, tmp_path)
    online = service(root, str(tmp_path / "events.sqlite"))
    built = online.batch.index.built
    assert isinstance(built, faiss.IndexHNSWFlat) and built.ntotal == len(ids) and built.hnsw.efSearch == 128
    user = ids[3]
    online.post_events([{"user_id": user, "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z", "weight": 300.0}])
    online.register_user("newcomer-x", onboarding_genres=["rock"])
    moved = np.array(online.embedding(user)["embedding"], np.float32)
    assert not np.allclose(moved, vectors[3], atol=1e-3)
    # the exact neighbours over the batch's vectors with the user's new one and the newcomer added
    everyone = np.vstack([np.delete(vectors, 3, axis=0), online.embedding("newcomer-x")["embedding"]])
    names = np.concatenate([np.delete(ids, 3), ["newcomer-x"]])
    unit = everyone / np.linalg.norm(everyone, axis=1, keepdims=True)
    exact = names[np.argsort(-(unit @ (moved / np.linalg.norm(moved))))[:10]]
    got = [n["user_id"] for n in online.similar(user, k=10)["neighbours"]]
    assert user not in got and len(set(got) & set(exact)) >= 9, (got, exact)  # HNSW: approximate
    # the superseded row is skipped: any query finds the user once, through its new vector
    old = [n["user_id"] for n in online.similar(ids[4], k=len(ids))["neighbours"]]
    assert old.count(user) == 1
    assert online.batch.index.ntotal == len(ids) + 1


def test_a_neighbour_index_of_other_users_is_refused_naming_the_file(served_root, tmp_path):
    root, _, _ = _with_built_index(served_root, tmp_path, ids_order=slice(None, None, -1))
    with pytest.raises(ValueError, match="similar_users.faiss"):
        service(root, str(tmp_path / "events.sqlite"))


SERVER = """
import sys, uvicorn
from pathlib import Path
from serving.api import Holder, create_app
from userrep.online import OnlineService

class One(Holder):
    service = OnlineService(Path(sys.argv[1]), None, sys.argv[2])

uvicorn.run(create_app(One), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", access_log=False)
"""


def _writers(post, n_threads: int, seconds: float) -> tuple[list[tuple[str, float]], int]:
    """``n_threads`` clients posting one event each, as fast as they go, for ``seconds``; returns
    (event id, time.monotonic() of its acknowledgement) of each acknowledged event and the number of
    failed posts."""
    import threading

    acked, failed, lock, stop = [], [0], threading.Lock(), time.monotonic() + seconds

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            event_id, i = f"w{k}-{i}", i + 1
            event = {
                "event_id": event_id,
                "user_id": f"u{i % 50:07d}",
                "item_id": "t0000001",
                "ts": "2026-05-02T10:00:00Z",
            }
            ok = post(event)
            with lock:
                if ok:
                    acked.append((event_id, time.monotonic()))
                else:
                    failed[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return acked, failed[0]


@pytest.mark.slow
def test_a_kill_9_of_the_api_under_8_writers_loses_no_acknowledged_event(served_root, tmp_path):
    """The API over HTTP on 127.0.0.1, eight clients writing; SIGKILL mid-stream (no shutdown):
    every event it acknowledged (202) is in the log afterwards, and a new server treats each as a
    duplicate (applied once)."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    import urllib.error
    import urllib.request

    from serving.smoke import free_port

    where, port = str(tmp_path / "events.sqlite"), free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(served_root), where, str(port)])
    url = f"http://127.0.0.1:{port}/events"
    try:
        settled(lambda: _ready(port), timeout_s=120)

        def post(event) -> bool:
            request = urllib.request.Request(
                url, data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    return reply.status == 202
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        threading.Timer(2.0, server.send_signal, args=(signal.SIGKILL,)).start()
        acks, failed = _writers(post, 8, 4.0)
        acked = [event_id for event_id, _ in acks]
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert len(acked) > 20 and failed > 0  # it was writing, and it died mid-stream
    assert set(acked) <= {e["event_id"] for e in logged(where)}
    restarted = service(served_root, where)
    again = [
        {"event_id": e, "user_id": "u0000001", "item_id": "t0000001", "ts": "2026-05-02T10:00:00Z"} for e in acked[:5]
    ]
    assert restarted.post_events(again)["duplicates"] == acked[:5]  # a client's retry: applied once


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load_loses_no_acknowledged_event(served_root, tmp_path):
    """Four writers through the service on a Redis stream (append-only, fsync always); Redis is
    killed (SIGKILL) mid-stream and started again on its files: every acknowledged event, before
    and after, is in the stream."""
    import signal
    import threading

    from serving.smoke import free_port
    from tests.conftest import start_redis

    port, workdir = free_port(), tmp_path / "redis"
    workdir.mkdir()
    procs = [start_redis(port, workdir)]
    where = f"redis://127.0.0.1:{port}/events"
    online = service(served_root, where)

    def post(event) -> bool:
        try:
            return online.post_events([event], wait=False)["event_ids"] == [event["event_id"]]
        except Exception:  # noqa: BLE001 (Redis down: the write is refused, not acknowledged)
            return False

    down, back = [], []

    def bounce() -> None:
        down.append(time.monotonic())
        procs[0].send_signal(signal.SIGKILL)  # no shutdown: only the append-only file remains
        procs[0].wait(timeout=10)
        time.sleep(0.5)
        procs.append(start_redis(port, workdir))
        back.append(time.monotonic())

    try:
        threading.Timer(1.5, bounce).start()
        acks, _ = _writers(post, 4, 5.0)
        assert len(procs) == 2 and len(acks) > 20
        # writes acknowledged before the kill and again after the restart (a post in between waits
        # for the client's reconnect or fails: never acknowledged without the stream)
        assert any(t < down[0] for _, t in acks) and any(t > back[0] for _, t in acks)
        assert {event_id for event_id, _ in acks} <= {e["event_id"] for e in logged(where)}
    finally:
        online.close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)

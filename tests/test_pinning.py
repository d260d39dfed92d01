"""Consumers pin a batch: the embedding API over HTTP on 127.0.0.1 keeps the serving batch, the
previous ones and the pinned ones live, answers reads in any of them (``batch_id``), applies each
event to all of them, and says 410 / 404 for a batch that is not live / not a batch. On both
event-log backends (SQLite file, a real redis-server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from serving.smoke import free_port
from userrep.backfill import read_embeddings
from userrep.batch import registry as batches
from userrep.batch.build import BuildConfig, build_batch
from userrep.batch.layout import BatchDir
from userrep.batch.registry import _write_pointer
from userrep.data import load_dataset
from userrep.model import AEConfig

pytestmark = pytest.mark.slow  # two batches and a server per backend: ~1 min

SERVER = """
import sys, uvicorn
from pathlib import Path
from serving.api import Holder, create_app
from userrep.online import OnlineService

class One(Holder):
    service = OnlineService(Path(sys.argv[1]), None, sys.argv[2], live_previous=int(sys.argv[4]))
One.service.watch(0.2)

uvicorn.run(create_app(One), host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", access_log=False)
"""


@pytest.fixture(scope="module")
def two_spaces(small_world, tmp_path_factory):
    """b1 (May 1) and b2 (June 30, continuing b1's space); no Feast, no heads: the online core."""
    root = tmp_path_factory.mktemp("pinning") / "batches"
    config = BuildConfig(ae=AEConfig(epochs=3), downstream=None)
    build_batch(small_world, root / "b1", "2026-05-01", config, batch_id="b1")
    build_batch(small_world, root / "b2", "2026-06-30", config, batch_id="b2", anchor=root / "b1")
    return root, load_dataset(small_world)


@pytest.fixture(params=["file", "redis"])
def events_log(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "events.sqlite")
    return f"redis://{request.getfixturevalue('redis_server')}/events-{uuid.uuid4().hex[:8]}"


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def until(check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (found := check()) is None or found is False:
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.2)
    return found


class Server:
    def __init__(self, root: Path, events_log: str, live_previous: int, tmp_path: Path, monkeypatch):
        for name in (
            "USERREP_WRITE_TOKEN",
            "USERREP_WRITE_TOKEN_FILE",
            "USERREP_READ_TOKEN",
            "USERREP_READ_TOKEN_FILE",
        ):
            monkeypatch.delenv(name, raising=False)  # open reads and writes: these tests are about batches
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(root), events_log, str(self.port), str(live_previous)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        until(lambda: self._ready() or None, 120)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
        try:
            return get(f"{self.url}/readyz")[0] == 200
        except OSError:
            return False

    def embedding(self, user: str, batch_id: str | None = None) -> tuple[int, dict]:
        return get(f"{self.url}/users/{user}/embedding" + (f"?batch_id={batch_id}" if batch_id else ""))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def server_factory(tmp_path, monkeypatch):
    started = []

    def start(root: Path, events_log: str, live_previous: int) -> Server:
        started.append(Server(root, events_log, live_previous, tmp_path, monkeypatch))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def stored(root: Path, batch_id: str, user: str) -> np.ndarray:
    ids, vectors, _ = read_embeddings(BatchDir(root / batch_id).embeddings)
    return vectors[list(ids).index(user)]


def test_after_a_promotion_a_pinned_read_answers_in_the_previous_batch_and_events_move_both(
    two_spaces, events_log, server_factory
):
    source, ds = two_spaces
    root = source.parent / f"root-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    for batch_id in ("b1", "b2"):
        (root / batch_id).symlink_to(source / batch_id)
    _write_pointer(root, {"serving": "b1", "history": []})
    server = server_factory(root, events_log, 1)
    user = read_embeddings(BatchDir(root / "b1").embeddings)[0][3]
    status, body = server.embedding(user)
    assert status == 200 and body["batch_id"] == "b1"
    np.testing.assert_allclose(body["embedding"], stored(root, "b1", user), atol=1e-5)

    # the promotion's switch (the gate is tested elsewhere): b2 serves, b1 stays live
    _write_pointer(root, {"serving": "b2", "history": ["b1"], "updated_at": "now"})
    until(lambda: server.embedding(user)[1]["batch_id"] == "b2")
    status, pinned = server.embedding(user, "b1")
    assert status == 200 and pinned["batch_id"] == "b1"
    np.testing.assert_allclose(pinned["embedding"], stored(root, "b1", user), atol=1e-5)
    _, current = server.embedding(user)
    np.testing.assert_allclose(current["embedding"], stored(root, "b2", user), atol=1e-5)
    status, similar = get(f"{server.url}/users/{user}/similar?k=3&batch_id=b1")
    assert status == 200 and similar["batch_id"] == "b1" and len(similar["neighbours"]) == 3

    # one event moves the user in both live batches
    item = ds.items.column("item_id")[0].as_py()
    event = {"event_id": f"pin-{uuid.uuid4().hex[:6]}", "user_id": user, "item_id": item, "ts": "2026-07-01T10:00:00Z"}
    status, applied = post(f"{server.url}/events?wait=true", event)
    assert status == 200 and applied["batch_id"] == "b2", applied
    for batch_id, before in (("b1", pinned), ("b2", current)):
        status, after = server.embedding(user, batch_id)
        assert status == 200 and after["batch_id"] == batch_id
        assert not np.allclose(after["embedding"], before["embedding"], atol=1e-6), batch_id
        assert after["as_of"] == "2026-07-02T00:00:00+00:00"  # the user's clock moved in each

    status, unknown = server.embedding(user, "no-such-batch")
    assert status == 404 and "no-such-batch" in unknown["error"] and unknown["live"] == ["b2", "b1"]
    assert server.embedding(user, "../b1")[0] == 422  # an id is a directory name, never a path


def test_a_batch_outside_the_window_is_410_until_a_consumer_pins_it_and_prune_keeps_it(
    two_spaces, events_log, server_factory
):
    source, _ = two_spaces
    root = source.parent / f"root-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    for batch_id in ("b1", "b2"):  # copies: prune deletes directories
        subprocess.run(["cp", "-r", str(source / batch_id), str(root / batch_id)], check=True)
    _write_pointer(root, {"serving": "b2", "history": ["b1"]})
    server = server_factory(root, events_log, 0)  # no previous batch kept live
    user = read_embeddings(BatchDir(root / "b1").embeddings)[0][3]
    status, gone = server.embedding(user, "b1")
    assert status == 410 and "'b1'" in gone["error"] and gone["live"] == ["b2"]

    batches.pin(root, "b1", "recs-team")
    assert batches.list_batches(root)[0]["pinned_by"] == ["recs-team"]
    status, pinned = until(lambda: (r := server.embedding(user, "b1"))[0] == 200 and r)
    np.testing.assert_allclose(pinned["embedding"], stored(root, "b1", user), atol=1e-5)
    with pytest.raises(batches.BatchError, match="consumer"):
        batches.pin(root, "b1", "bad name!")
    assert batches.prune(root, keep=0)["removed"] == []  # serving, rollback target and pinned: all kept

    _write_pointer(root, {**batches.read_pointer(root), "history": []})  # b1 is no rollback target any more
    assert batches.prune(root, keep=0)["removed"] == []  # the pin alone keeps it
    batches.unpin(root, "recs-team")
    with pytest.raises(batches.BatchError, match="recs-team"):
        batches.unpin(root, "recs-team")
    until(lambda: server.embedding(user, "b1")[0] == 410)
    assert batches.prune(root, keep=0)["removed"] == ["b1"]

"""The near-real-time side of a batch, without any server: what each Ray Serve replica wraps.

``OnlineBatch`` is what one replica holds of a batch (encoders, model, backfilled embeddings,
neighbour index); it is built whole and swapped in by reference, so a request that took one
batch finishes on it: no response mixes batches. The users' incremental feature state is not in
the replica: it lives in the shared store behind the event log (``userrep.eventlog``: SQLite
embedded, Redis in production), keyed by (batch, user), so any replica serves any user and a
restarted replica is ready once its artefacts are loaded.

Each ``OnlineService`` (one per replica) runs two stages:

* the **logger**: every ``POST /events`` request waiting is checked, deduplicated by client
  ``event_id`` and appended as one durable record (group commit), then acknowledged;
* the **consumer**: one member of the serving batch's consumer group. It takes records from the
  group (any replica's), reads the touched users' state once, applies them, re-embeds those users
  once, writes their rows to the online store once, and commits state + "applied" + ack in one
  transaction. A request that asked to wait (``?wait=true``) returns once its record is applied,
  by whichever consumer.

A batch's shared state is written by the first replica that loads it: the batch's dataset as of
its ``as_of`` plus a replay of the logged writes that data does not hold; its consumer group
starts right after the last record replayed, so a write logged during a switch is applied once,
either by the replay or by the group.

Online time, per user: features as of the later of the batch's ``as_of`` and the midnight after the
user's newest accepted event, as a batch recomputation then gives (``userrep.state.user_clocks``); no
client moves another user's windows; an event later than now + ``max_future_s`` is refused naming ``ts``.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userrep import eventlog
from userrep.batch.registry import read_pointer
from userrep.onlinebatch import (
    OnlineBatch,
    UnknownUser,
    apply_delivered,
    load_batch,
    log_sign_up,
    push_changes,
    still_serving,
    user_clock,
    validate_events,
    write_shared_state,
)
from userrep.state import decode_user

log = logging.getLogger(__name__)

MICRO_BATCH = 2000  # events the logger commits together at most (one fsync)
DELIVER = 64  # records a consumer takes at once (one state read, one re-embed, one online write)
CLAIM_IDLE_MS = 5000  # a record another consumer took and left this long is taken over (it died)
MAX_FUTURE_S = 3600.0  # default: how far past the server's clock an event's ts may lie (client clock skew)
WAIT_S = 30.0  # how long ?wait=true waits for the new embedding before answering 504 (the events are durable)


def _take(source: queue.Queue) -> list:
    """The next write of ``source`` (blocking) and every other one waiting, up to ``MICRO_BATCH`` events."""
    items = [source.get()]
    total = len(items[0].rows)
    while total < MICRO_BATCH:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            break
        total += len(items[-1].rows)
    return items


@dataclass
class _Write:
    """One POST /events request waiting for the logger."""

    rows: list[dict]
    durable: threading.Event = field(default_factory=threading.Event)  # logged (or refused)
    position: object = None  # where its fresh events were logged (None: all duplicates)
    ack: dict | None = None
    error: Exception | None = None


class NotApplied(TimeoutError):
    """Durable events whose new embeddings were not written within the wait (HTTP 504)."""


class OnlineService:
    """One replica: reads, near-real-time writes (logger + consumer), reload on promotion."""

    def __init__(
        self,
        root: str | Path,
        store=None,
        events_log: str | Path | None = None,
        max_future_s: float = MAX_FUTURE_S,
        consumer: bool = True,
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ):
        self.root = Path(root)
        self.max_future = pd.Timedelta(seconds=max_future_s)
        self.store_config = store
        # a file (SQLite, embedded default) or redis://HOST:PORT/STREAM (production), see userrep.eventlog
        self.events_log = eventlog.open_log(events_log or eventlog.default_log(self.root))
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # this replica's consumer name
        self.claim_idle_ms = claim_idle_ms
        self._store = None
        self._writer: Any = None  # with the store: its online writes (userrep.onlinestore.OnlineWriter)
        self._batch: OnlineBatch | None = None
        self._queue: queue.Queue[_Write] = queue.Queue()
        self._applied = threading.Condition()  # the local consumer committed something
        self._wake = threading.Event()  # the local logger appended something
        self.stopped = threading.Event()
        self.applied_records = 0  # records this replica's consumer applied (the rest: other replicas')
        _ = self.store  # opened now (seconds): part of getting ready, not of the first read or write
        self.reload()
        threading.Thread(target=self._write_loop, name="event-logger", daemon=True).start()
        if consumer:
            threading.Thread(target=self._consume_loop, name="event-consumer", daemon=True).start()
        threading.Thread(
            target=self.events_log.follow, args=(self._changed, self.stopped), name="log-follower", daemon=True
        ).start()

    # -- batches -------------------------------------------------------------------------
    @property
    def batch(self) -> OnlineBatch:
        """The serving batch (loaded by the constructor, so always there once it returned)."""
        if self._batch is None:
            raise RuntimeError("OnlineService: no batch loaded")
        return self._batch

    def reload(self) -> bool:
        """Load the promoted batch if it changed (or an erasure rewrote its files); the swap is one
        reference assignment. Reads and writes go on on the old batch meanwhile."""
        pointer = read_pointer(self.root)
        if pointer["serving"] is None:
            raise ValueError(f"batch_root: no batch is serving under {self.root}; promote one first")
        if self._batch is not None and still_serving(self.root, self._batch, pointer["serving"]):
            return False
        started = time.perf_counter()
        fresh, manifest = load_batch(self.root, pointer["serving"])
        fresh.start, replayed = self._shared_state(fresh, manifest)
        self._batch = fresh
        keep = {pointer["serving"], *pointer["history"][-1:]}  # the previous one stays ready for a rollback
        for stale in set(self.events_log.batches()) - keep:
            self.events_log.drop(stale)
        log.info(
            f"loaded batch {fresh.batch_id} ({len(fresh.rows)} users"
            + (f", state bootstrapped, {replayed} users changed by the log" if replayed is not None else "")
            + f") in {time.perf_counter() - started:.1f}s"
        )
        return True

    def _shared_state(self, online: OnlineBatch, manifest: dict) -> tuple:
        """The batch's shared state: found ready, or bootstrapped by this replica (one at a time)."""
        ready = self.events_log.ready(online.batch_id)
        if ready is not None:
            return ready, None
        with self.events_log.lock(online.batch_id):
            ready = self.events_log.ready(online.batch_id)
            if ready is not None:  # another replica did it while this one waited
                return ready, None
            return write_shared_state(online, manifest, self.events_log, self._push)

    def watch(self, interval_s: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
        """Poll SERVING.json in a daemon thread and reload on change (a failed load keeps the old batch)."""
        stop = stop or self.stopped

        def loop():
            while not stop.wait(interval_s):
                try:
                    self.reload()
                except Exception as exc:  # keep serving the loaded batch; say why
                    log.warning(f"reload failed, still serving {self.batch.batch_id}: {exc}")

        thread = threading.Thread(target=loop, name="batch-watch", daemon=True)
        thread.start()
        return thread

    @property
    def store(self):
        if self._store is None and self.store_config is not None:
            from userrep.onlinestore import OnlineWriter
            from userrep.store import open_store

            self._store = open_store(self.store_config, apply=False)
            self._writer = OnlineWriter(self._store)
        return self._store

    # -- reads ---------------------------------------------------------------------------
    def user_state(self, user_id: str, online: OnlineBatch | None = None) -> tuple:
        """(state, newest online embedding or None, its time) of a user in the shared store."""
        online = online or self.batch
        blob = self.events_log.load(online.batch_id, [user_id]).get(user_id)
        if blob is None:
            raise UnknownUser(user_id)
        return decode_user(blob)

    def embedding(self, user_id: str) -> dict:
        """The user's newest embedding in the serving batch, with ``as_of``: the time its features
        are as of (the user's clock: the batch's as_of, or the midnight after their newest event)."""
        online = self.batch
        if self.store is not None:  # the online store is the source of truth for reads
            from userrep.onlinestore import online_embeddings

            got, found, stamps = online_embeddings(self.store, [user_id], online.batch_id, with_times=True)
            if found[0]:
                return {
                    "user_id": user_id,
                    "batch_id": online.batch_id,
                    "embedding": got[0].tolist(),
                    "as_of": stamps[0].isoformat(),
                }
        try:  # no online store (or a row not there yet): the shared state's newest embedding
            state, vector, _ = self.user_state(user_id, online)
        except UnknownUser:
            if user_id not in online.rows:
                raise
            vector = None
        if vector is not None:
            return {
                "user_id": user_id,
                "batch_id": online.batch_id,
                "embedding": vector.tolist(),
                "as_of": user_clock(online, user_id, state).isoformat(),
            }
        if user_id in online.rows and online.rows[user_id] < len(online.backfilled):
            return {
                "user_id": user_id,
                "batch_id": online.batch_id,
                "embedding": online.backfilled[online.rows[user_id]].tolist(),
                "as_of": online.as_of.isoformat(),
            }
        raise UnknownUser(user_id)

    def similar(self, user_id: str, k: int = 10) -> dict:
        """Nearest users by cosine. The query is the user's newest embedding; the candidates are
        this replica's index (the batch's users, plus the users whose writes this replica applied)."""
        online = self.batch
        query = np.asarray(self.embedding(user_id)["embedding"], np.float32)
        row = online.rows.get(user_id, -1)
        with online.lock:
            scores, found = online.index.search(query, k + 1)
        neighbours = [
            {"user_id": online.users[int(i)], "score": round(float(s), 6)}
            for s, i in zip(scores[0], found[0])
            if i >= 0 and int(i) != row
        ][:k]
        return {"user_id": user_id, "batch_id": online.batch_id, "neighbours": neighbours}

    # -- writes --------------------------------------------------------------------------
    def post_events(self, events: list[dict], wait: bool = True) -> dict:
        """Validate, then hand the events to the logger, which takes every request waiting at that
        moment (group commit): checks, deduplicates by ``event_id``, one durable append.

        Returns once the events are durable (``wait=False``: their ids, accepted and duplicate)
        or once they are applied and the new embeddings are written (``wait=True``, by whichever
        replica's consumer). Events whose ``event_id`` was accepted before (or repeats within the
        commit) are acknowledged under ``duplicates`` and not applied again.
        """
        received = time.perf_counter()
        online = self.batch
        write = _Write(validate_events(online, events, self.events_log, self.max_future))
        self._queue.put(write)
        write.durable.wait()
        if write.error is not None:
            raise write.error
        reply = dict(write.ack or {})  # set with durable (as is error)
        if wait:
            online = self._wait_applied(write.position, online)
            users = list(dict.fromkeys(row["user_id"] for row in write.rows))
            reply = {**reply, "batch_id": online.batch_id, "users": [self._user_reply(online, u) for u in users]}
        return {**reply, "freshness_ms": round((time.perf_counter() - received) * 1000, 2)}

    def _user_reply(self, online: OnlineBatch, user_id: str) -> dict:
        state, vector, updated = self.user_state(user_id, online)
        if vector is None:  # not changed online in this batch (its events were all duplicates)
            vector = online.backfilled[online.rows[user_id]]
        return {
            "user_id": user_id,
            "embedding": np.asarray(vector).tolist(),
            "as_of": user_clock(online, user_id, state).isoformat(),
            "updated_at": updated,
        }

    def _wait_applied(self, position, online: OnlineBatch) -> OnlineBatch:
        """Until the record at ``position`` is in the serving batch's state (applied by its group,
        or held by its bootstrap after a switch); returns that batch."""
        deadline = time.monotonic() + WAIT_S
        key = self.events_log.key
        while True:
            online = self.batch
            if (
                position is None
                or key(position) <= key(online.start)
                or self.events_log.applied(online.batch_id, [position])
            ):
                return online
            if time.monotonic() > deadline:
                raise NotApplied(
                    f"events: durable at {position} but not applied within {WAIT_S:.0f}s; their embeddings follow"
                )
            with self._applied:
                self._applied.wait(0.02)

    def _write_loop(self) -> None:
        """The logger: every request waiting (up to ``MICRO_BATCH`` events) deduplicated and logged
        in one durable append, then acknowledged."""
        while True:
            writes = _take(self._queue)
            rows = [row for write in writes for row in write.rows]
            try:
                position, duplicates = self.events_log.append_events(rows)
            except Exception as exc:  # noqa: BLE001 (handed to each waiting request)
                log.error(f"event write failed: {type(exc).__name__}: {exc}")
                for write in writes:
                    write.error = exc
                    write.durable.set()
                continue
            self._wake.set()
            repeated, at = set(duplicates), 0
            for write in writes:
                mine = range(at, at + len(write.rows))
                at += len(write.rows)
                fresh = [write.rows[i - mine.start] for i in mine if i not in repeated]
                write.position = position if fresh else None
                write.ack = {
                    "batch_id": self.batch.batch_id,
                    "accepted": len(fresh),
                    "event_ids": [row.get("event_id") for row in fresh],
                    "duplicates": [write.rows[i - mine.start].get("event_id") for i in mine if i in repeated],
                }
                write.durable.set()

    def _changed(self) -> None:
        """Another replica logged or applied something: wake this one's consumer and waiters."""
        self._wake.set()
        with self._applied:
            self._applied.notify_all()

    def _consume_loop(self) -> None:
        """The consumer: records of the serving batch's group, applied a micro-batch at a time."""
        while not self.stopped.is_set():
            online = self.batch
            try:
                entries = self.events_log.deliver(online.batch_id, self.name, DELIVER, self.claim_idle_ms)
                if not entries:
                    if not self.events_log.blocks:  # a local append wakes it at once; other replicas' within 20 ms
                        self._wake.wait(0.02)
                        self._wake.clear()
                    continue
                self.consume(online, entries)
            except Exception as exc:  # noqa: BLE001 (its records stay pending and come back)
                log.warning(f"event apply failed: {type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def consume(self, online: OnlineBatch, entries: list[tuple]) -> list:
        """Apply delivered records once: one state read, one re-embed, one online write, one commit."""
        records = {position: record for position, record in entries if record is not None}

        def work(todo, load):
            return apply_delivered(online, [records[p] for p in todo if p in records], load, self._push)

        done = self.events_log.commit(online.batch_id, [p for p, _ in entries], work)
        self.applied_records += len(done)
        with self._applied:
            self._applied.notify_all()
        return done

    def register_user(self, user_id: str, onboarding_artists=(), onboarding_genres=(), attributes=None) -> dict:
        """Log the sign-up; answer once a consumer applied it (the cold-start embedding)."""
        online = self.batch
        position = log_sign_up(self.events_log, user_id, onboarding_artists, onboarding_genres, attributes)
        self._wake.set()
        online = self._wait_applied(position, online)
        return {**self._user_reply(online, user_id), "batch_id": online.batch_id}

    def _push(self, online: OnlineBatch, result: dict, signed_up=None) -> None:
        if self.store is not None:
            push_changes(self._writer, online, result, signed_up)

    def close(self) -> None:
        """Stop this replica's consumer and batch watch (its unfinished records go to another)."""
        self.stopped.set()

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
* the **consumer**: one member of each live batch's consumer group. It takes records from the
  group (any replica's), reads the touched users' state once, applies them, re-embeds those users
  once, writes their rows to the online store once, and commits state + "applied" + ack in one
  transaction. A request that asked to wait (``?wait=true``) returns once its record is applied
  in every live batch, by whichever consumers.

**Live batches** (``userrep.batch.registry.live_batches``): the serving batch, the
``live_previous`` batches served before it and every pinned one are all loaded; every read may
name one (``batch_id``, default the serving one), and every event updates the user in each. A
consumer whose model was trained on the previous batch keeps reading that batch's coordinates,
kept current, until it moves. A batch that exists but is not live is ``NotLive`` (HTTP 410); an
id no batch has, ``NotLive`` with ``known`` False (HTTP 404).

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
from userrep.batch.layout import manifest_path
from userrep.batch.registry import LIVE_PREVIOUS, live_batches, read_pointer
from userrep.onlinebatch import (
    OnlineBatch,
    apply_delivered,
    load_batch,
    log_sign_up,
    nearest_users,
    push_changes,
    read_embedding,
    still_serving,
    user_clock,
    user_state,
    validate_events,
    write_shared_state,
)
from userrep.onlinebatch import UnknownUser as UnknownUser  # re-exported: the reads raise it (HTTP 404)

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


class NotLive(LookupError):
    """A read named a batch that is not live: one that exists (``known``: HTTP 410) or none (404)."""

    def __init__(self, batch_id: str, known: bool, live: list[str]):
        self.batch_id, self.known, self.live = batch_id, known, live
        why = "is not live" if known else "is not a batch"
        super().__init__(f"batch_id: {batch_id!r} {why} (live: {', '.join(live)})")


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
        live_previous: int = LIVE_PREVIOUS,
    ):
        self.root = Path(root)
        self.live_previous = live_previous
        self.max_future = pd.Timedelta(seconds=max_future_s)
        self.store_config = store
        # a file (SQLite, embedded default) or redis://HOST:PORT/STREAM (production), see userrep.eventlog
        self.events_log = eventlog.open_log(events_log or eventlog.default_log(self.root))
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # this replica's consumer name
        self.claim_idle_ms = claim_idle_ms
        self._store = None
        self._writer: Any = None  # with the store: its online writes (userrep.onlinestore.OnlineWriter)
        self._live: dict[str, OnlineBatch] = {}  # the live batches, the serving one first
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
        if not self._live:
            raise RuntimeError("OnlineService: no batch loaded")
        return next(iter(self._live.values()))

    @property
    def live(self) -> list[OnlineBatch]:
        """Every live batch, the serving one first (one snapshot: a reload swaps the whole dict)."""
        return list(self._live.values())

    def live_batch(self, batch_id: str | None = None) -> OnlineBatch:
        """The live batch ``batch_id`` (None: the serving one); ``NotLive`` otherwise."""
        if batch_id is None:
            return self.batch
        found = self._live.get(batch_id)
        if found is None:
            known = (
                "/" not in batch_id and not batch_id.startswith(".") and manifest_path(self.root / batch_id).exists()
            )
            raise NotLive(batch_id, known, list(self._live))
        return found

    def reload(self) -> bool:
        """Load the live batches if they changed (a promotion, a pin, an erasure that rewrote a
        batch's files); the swap is one reference assignment. Reads and writes go on on the old
        ones meanwhile; a batch already loaded and unchanged is kept as it is."""
        pointer = read_pointer(self.root)
        if pointer["serving"] is None:
            raise ValueError(f"batch_root: no batch is serving under {self.root}; promote one first")
        wanted = live_batches(pointer, self.live_previous)
        current = self._live
        if list(current) == wanted and all(still_serving(self.root, b, b.batch_id) for b in current.values()):
            return False
        live: dict[str, OnlineBatch] = {}
        for batch_id in wanted:  # kept as loaded: unchanged files, its shared state still in the log
            kept = current.get(batch_id)
            usable = kept is not None and still_serving(self.root, kept, batch_id)
            fresh = not usable or self.events_log.ready(batch_id) is None
            live[batch_id] = self._load(batch_id) if fresh or kept is None else kept
        self._live = live
        keep = {*wanted, *pointer["history"][-1:]}  # the previous one stays ready for a rollback
        for stale in set(self.events_log.batches()) - keep:
            self.events_log.drop(stale)
        log.info(f"live batches: {', '.join(live)} (serving {wanted[0]})")
        return True

    def _load(self, batch_id: str) -> OnlineBatch:
        started = time.perf_counter()
        fresh, manifest = load_batch(self.root, batch_id)
        fresh.start, replayed = self._shared_state(fresh, manifest)
        log.info(
            f"loaded batch {fresh.batch_id} ({len(fresh.rows)} users"
            + (f", state bootstrapped, {replayed} users changed by the log" if replayed is not None else "")
            + f") in {time.perf_counter() - started:.1f}s"
        )
        return fresh

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

    # -- reads (userrep.onlinebatch: read_embedding, nearest_users) -----------------------
    def user_state(self, user_id: str, online: OnlineBatch | None = None) -> tuple:
        """(state, newest online embedding or None, its time) of a user in the shared store."""
        return user_state(self.events_log, online or self.batch, user_id)

    def embedding(self, user_id: str, batch_id: str | None = None) -> dict:
        """The user's newest embedding in the live batch ``batch_id`` (default: the serving one)."""
        return read_embedding(self.live_batch(batch_id), self.store, self.events_log, user_id)

    def similar(self, user_id: str, k: int = 10, batch_id: str | None = None) -> dict:
        """Nearest users by cosine in the live batch ``batch_id`` (default: the serving one)."""
        online = self.live_batch(batch_id)
        return nearest_users(online, read_embedding(online, self.store, self.events_log, user_id), k)

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
        """Until the record at ``position`` is in every live batch's state (applied by its group,
        or held by its bootstrap after a switch); returns the serving batch."""
        deadline = time.monotonic() + WAIT_S
        key = self.events_log.key
        while True:
            live = self.live
            if position is None or all(
                key(position) <= key(b.start) or self.events_log.applied(b.batch_id, [position]) for b in live
            ):
                return live[0]
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
        """The consumer: records of each live batch's group, applied a micro-batch at a time."""
        while not self.stopped.is_set():
            delivered = False
            for online in self.live:
                try:
                    entries = self.events_log.deliver(online.batch_id, self.name, DELIVER, self.claim_idle_ms)
                    if entries:
                        delivered = True
                        self.consume(online, entries)
                except Exception as exc:  # noqa: BLE001 (its records stay pending and come back)
                    log.warning(f"event apply failed in batch {online.batch_id}: {type(exc).__name__}: {exc}")
                    time.sleep(0.5)
            if not delivered and not self.events_log.blocks:
                # a local append wakes it at once; other replicas' within 20 ms
                self._wake.wait(0.02)
                self._wake.clear()

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

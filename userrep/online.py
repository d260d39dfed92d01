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

Online time, per user: a user's features are computed as of the later of the batch's ``as_of``
and the midnight after that user's newest accepted event, which is what a batch recomputation of
the same history at that time gives (``userrep.state.user_clocks``). No client can move another
user's windows, and an event dated later than now plus ``max_future_s`` is refused naming ``ts``.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from userrep import eventlog
from userrep.backfill import read_embeddings
from userrep.batches import batch_dir, read_pointer
from userrep.features import FeatureSpace, to_utc
from userrep.layout import read_manifest
from userrep.model import UserAutoencoder, embed
from userrep.state import (
    FeatureState,
    UserState,
    apply_events,
    decode_user,
    encode_user,
    register_user,
    state_features_at,
    state_from_dataset,
    user_clocks,
)
from userrep.tasks.similar_users import LiveIndex, build_index

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


class UnknownUser(KeyError):
    """A user the serving batch has never seen (HTTP 404)."""


class NotApplied(TimeoutError):
    """Durable events whose new embeddings were not written within the wait (HTTP 504)."""


@dataclass
class OnlineBatch:
    batch_id: str
    as_of: pd.Timestamp
    space: FeatureSpace
    model: UserAutoencoder
    index: LiveIndex  # the pipeline's neighbour index plus the users re-embedded online
    rows: dict  # user_id -> index id
    users: dict  # index id -> user_id (neighbour answers)
    space_id: str  # the snapshot the batch's features come from (stamped on pushed feature rows)
    lock: threading.Lock
    backfilled: np.ndarray  # (users, d) the batch's embeddings, rows as in ``rows``
    history: tuple | None = None  # (artist indices, artist ids, half-life): the heads' history features
    start: object = None  # log position its shared state was bootstrapped through (its group starts after)


def load_batch(root: Path, batch_id: str) -> tuple[OnlineBatch, dict]:
    """A batch's artefacts as one replica holds them (no user state); and its manifest."""
    directory = batch_dir(root, batch_id)
    manifest = read_manifest(directory)
    space = FeatureSpace.load(directory / "encoders")
    ids, vectors, _ = read_embeddings(directory / "embeddings.parquet")
    index = LiveIndex(_neighbour_index(directory, ids, vectors))
    online = OnlineBatch(
        batch_id,
        to_utc(manifest["as_of"]),
        space,
        UserAutoencoder.load(directory / "model.pt"),
        index,
        {u: i for i, u in enumerate(ids)},
        dict(enumerate(ids)),
        manifest.get("snapshot") or batch_id,
        threading.Lock(),
        vectors,
        history=_history_spec(directory, space),
    )
    return online, manifest


def _neighbour_index(directory: Path, ids: np.ndarray, vectors: np.ndarray):
    """The index the pipeline built with the batch (HNSW above ``similar_users.EXACT_MAX`` users);
    built here the same way only for a batch without downstream models."""
    import faiss

    path = directory / "downstream" / "similar_users.faiss"
    if not path.exists():
        return build_index(vectors)
    index = faiss.read_index(str(path))
    saved = np.load(directory / "downstream" / "similar_users.ids.npy")
    if index.ntotal != len(ids) or not np.array_equal(saved.astype(object), ids):
        raise ValueError(f"{path}: its {index.ntotal} rows are not the users of embeddings.parquet in file order")
    return index


def bootstrap_state(online: OnlineBatch, manifest: dict, events_log) -> tuple[FeatureState, list[str], object]:
    """A batch's whole user state: its dataset before ``as_of``, the compacted online events at or
    after ``as_of`` (in the data's ``events.online/``), every sign-up in the log (sign-ups are never
    trimmed) and every event logged after the part compacted into the data. The data is read as
    it is now, with its watermark now: a compaction after the batch was built moved events from
    the log into the data, and each is counted once, from the data. Returns (state, users changed
    by online writes, the last log position read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = manifest["data"]["path"]
    compacted = eventlog.watermark(data)
    retained = events_log.retained_from()
    if retained is not None and events_log.key(retained) > events_log.key(compacted):
        raise ValueError(
            f"batch {online.batch_id}: its data {data} holds the event log up to {compacted}, but the "
            f"log was trimmed through {retained}; compact into that dataset first"
        )
    state = state_from_dataset(online.space, data, online.as_of)  # streamed: the events table is never held
    touched = set()
    parts = [pq.read_table(p, columns=["user_id", "item_id", "ts", "weight"]) for p in eventlog.part_files(data)]
    if parts:
        late = pa.concat_tables(parts)
        late = late.filter(pc.greater_equal(late.column("ts"), pa.scalar(online.as_of, late.schema.field("ts").type)))
        touched.update(_apply(online, state, [{"kind": "events", "events": late.to_pylist()}]))
    last = None
    for last, record in events_log.read():
        if record["kind"] == "user" or not eventlog.covered(events_log, last, compacted):
            touched.update(_apply(online, state, [record]))
    return state, sorted(touched), last


def _history_spec(directory: Path, space: FeatureSpace) -> tuple | None:
    """What the batch's heads take besides the embedding: the candidate artists and the recency
    decay of the user's history of them (from the future-listening head; None without one)."""
    path = directory / "downstream" / "future_listening.pt"
    if not path.exists():
        return None
    from userrep.downstream import load_head

    _, meta = load_head(path)
    return space.artist_index(meta["artists"]), meta["artists"], meta.get("half_life_days")


def _apply(online: OnlineBatch, state: FeatureState, records: list[dict]) -> list[str]:
    """Apply logged records to ``state`` (sign-ups, then all events at once); returns the users
    changed. Events of items this batch's encoders do not know (logged under another batch) have
    no vector here and are left out, said in the log line of the caller."""
    touched = []
    for record in records:
        if record["kind"] == "user":
            register_user(
                state,
                record["user_id"],
                record.get("onboarding_artists", ()),
                record.get("onboarding_genres", ()),
                record.get("attributes") or {},
            )
            touched.append(record["user_id"])
    events = pd.DataFrame([e for r in records if r["kind"] == "events" for e in r["events"]])
    if len(events):
        events = events[online.space.item_index(events["item_id"].astype(str).to_numpy(dtype=object)) >= 0]
        touched += apply_events(state, events) if len(events) else []
    return list(dict.fromkeys(touched))


def _clock(online: OnlineBatch, user_id: str, user: UserState) -> pd.Timestamp:
    """Where one user's feature windows end online (``user_clocks``)."""
    return user_clocks(FeatureState(online.space, {user_id: user}), [user_id], online.as_of)[0]


def _reembed(online: OnlineBatch, state: FeatureState, user_ids: list[str]) -> dict:
    """Features and embeddings of users now; re-insert them in this replica's neighbour index."""
    clocks = user_clocks(state, user_ids, online.as_of)
    features = state_features_at(state, user_ids, clocks)
    vectors = embed(online.model, features.matrix)
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    with online.lock:
        rows = []
        for user_id in user_ids:
            row = online.rows.get(user_id)
            if row is None:
                row = online.rows[user_id] = len(online.rows) + 10_000_000  # ids of users added online
                online.users[row] = user_id
            rows.append(row)
        ids = np.array(rows, np.int64)
        online.index.upsert(ids, vectors)
    return {"features": features, "vectors": vectors, "updated_at": now, "clocks": clocks, "state": state}


class OnlineService:
    """One replica: reads, near-real-time writes (logger + consumer), reload on promotion."""

    def __init__(
        self,
        root: str | Path,
        store=None,
        events_log: str | Path | None = None,
        log=print,
        max_future_s: float = MAX_FUTURE_S,
        consumer: bool = True,
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ):
        self.root = Path(root)
        self.max_future = pd.Timedelta(seconds=max_future_s)
        self.store_config = store
        # a file (SQLite, embedded default) or redis://HOST:PORT/STREAM (production), see userrep.eventlog
        self.events_log = eventlog.open_log(events_log or eventlog.default_log(self.root))
        self.log = log
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # this replica's consumer name
        self.claim_idle_ms = claim_idle_ms
        self._store = None
        self._writer: Any = None  # with the store: its online writes (userrep.store.OnlineWriter)
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
        """Load the promoted batch if it changed; the swap is one reference assignment. Reads and
        writes go on on the old batch meanwhile."""
        pointer = read_pointer(self.root)
        if pointer["serving"] is None:
            raise ValueError(f"batch_root: no batch is serving under {self.root}; promote one first")
        if self._batch is not None and pointer["serving"] == self._batch.batch_id:
            return False
        started = time.perf_counter()
        fresh, manifest = load_batch(self.root, pointer["serving"])
        fresh.start, replayed = self._shared_state(fresh, manifest)
        self._batch = fresh
        keep = {pointer["serving"], *pointer["history"][-1:]}  # the previous one stays ready for a rollback
        for stale in set(self.events_log.batches()) - keep:
            self.events_log.drop(stale)
        self.log(
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
            state, touched, last = bootstrap_state(online, manifest, self.events_log)
            vectors, updated = {}, None
            if touched:  # their embeddings and online rows must include the logged writes
                result = _reembed(online, state, touched)
                self._push(online, result)
                vectors, updated = dict(zip(touched, result["vectors"])), result["updated_at"]
            blobs = {
                u: encode_user(s, vectors.get(u), updated if u in vectors else None) for u, s in state.users.items()
            }
            self.events_log.bootstrap(online.batch_id, blobs, last)
            return last, len(touched)

    def watch(self, interval_s: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
        """Poll SERVING.json in a daemon thread and reload on change (a failed load keeps the old batch)."""
        stop = stop or self.stopped

        def loop():
            while not stop.wait(interval_s):
                try:
                    self.reload()
                except Exception as exc:  # keep serving the loaded batch; say why
                    self.log(f"reload failed, still serving {self.batch.batch_id}: {exc}")

        thread = threading.Thread(target=loop, name="batch-watch", daemon=True)
        thread.start()
        return thread

    @property
    def store(self):
        if self._store is None and self.store_config is not None:
            from userrep.store import OnlineWriter, open_store

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
            from userrep.store import online_embeddings

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
                "as_of": _clock(online, user_id, state).isoformat(),
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
        write = _Write(self._validated(online, events))
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
            "as_of": _clock(online, user_id, state).isoformat(),
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

    def _validated(self, online: OnlineBatch, events: list[dict]) -> list[dict]:
        """The events as log rows (ts normalized), or an error naming the field; changes nothing."""
        users = list(dict.fromkeys(e["user_id"] for e in events))
        missing = [u for u in users if u not in online.rows]
        if missing:  # users signed up online are in the shared state
            known = self.events_log.load(online.batch_id, missing)
            unknown = [u for u in missing if u not in known]
            if unknown:
                raise UnknownUser(unknown[0])
        latest = pd.Timestamp.now(tz="UTC") + self.max_future
        rows = []
        for i, event in enumerate(events):
            ts = to_utc(event["ts"], f"events[{i}].ts")
            if ts > latest:
                raise ValueError(
                    f"events[{i}].ts: {ts.isoformat()} is later than the server's clock plus "
                    f"{self.max_future} (max_future_s)"
                )
            row = {**{k: v for k, v in event.items() if v is not None}, "ts": ts.isoformat()}
            weight = row.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"events[{i}].weight: {weight!r}, must be a finite number >= 0")
            rows.append({**row, "weight": weight})  # one shape, whoever else shares the commit
        items = np.array([str(row["item_id"]) for row in rows], object)
        unknown_items = items[online.space.item_index(items) < 0]
        if len(unknown_items):
            raise ValueError(f"item_id: unknown item(s) {sorted(set(unknown_items))[:5]}")
        return rows

    def _write_loop(self) -> None:
        """The logger: every request waiting (up to ``MICRO_BATCH`` events) deduplicated and logged
        in one durable append, then acknowledged."""
        while True:
            writes = _take(self._queue)
            rows = [row for write in writes for row in write.rows]
            try:
                position, duplicates = self.events_log.append_events(rows)
            except Exception as exc:  # noqa: BLE001 (handed to each waiting request)
                self.log(f"event write failed: {type(exc).__name__}: {exc}")
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
                self.log(f"event apply failed: {type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def consume(self, online: OnlineBatch, entries: list[tuple]) -> list:
        """Apply delivered records once: one state read, one re-embed, one online write, one commit."""
        records = {position: record for position, record in entries if record is not None}

        def work(todo, load):
            batch = [records[p] for p in todo if p in records]
            users = list(
                dict.fromkeys(
                    [r["user_id"] for r in batch if r["kind"] == "user"]
                    + [e["user_id"] for r in batch if r["kind"] == "events" for e in r["events"]]
                )
            )
            if not users:
                return {}
            state = FeatureState(online.space, {u: decode_user(b)[0] for u, b in load(users).items()})
            touched = _apply(online, state, batch)
            if len(touched) < len(users):
                self.log(
                    f"batch {online.batch_id}: events of {len(users) - len(touched)} user(s) name items "
                    "its encoders do not know; left out of its online state (they reach the next batch)"
                )
            if not touched:
                return {}
            result = _reembed(online, state, touched)
            signed_up = {r["user_id"] for r in batch if r["kind"] == "user"}
            self._push(online, result, signed_up)  # before the commit: a crash here leaves the records to redo
            return {u: encode_user(state.users[u], v, result["updated_at"]) for u, v in zip(touched, result["vectors"])}

        done = self.events_log.commit(online.batch_id, [p for p, _ in entries], work)
        self.applied_records += len(done)
        with self._applied:
            self._applied.notify_all()
        return done

    def register_user(self, user_id: str, onboarding_artists=(), onboarding_genres=(), attributes=None) -> dict:
        """Log the sign-up; answer once a consumer applied it (the cold-start embedding)."""
        online = self.batch
        record = {
            "kind": "user",
            "user_id": user_id,
            "onboarding_artists": list(onboarding_artists),
            "onboarding_genres": list(onboarding_genres),
            "attributes": attributes or {},
        }
        position = self.events_log.append(record)
        self._wake.set()
        online = self._wait_applied(position, online)
        return {**self._user_reply(online, user_id), "batch_id": online.batch_id}

    def close(self) -> None:
        """Stop this replica's consumer and batch watch (its unfinished records go to another)."""
        self.stopped.set()

    def _push(self, online: OnlineBatch, result: dict, signed_up=None) -> None:
        """Features and embeddings of changed users to the online store, under this batch id.
        ``signed_up``: the users whose sign-up information changed (None: all); only their
        ``user_profile`` rows are written, since events do not change a profile (one Feast write,
        ~3 ms, less per micro-batch of events)."""
        if self.store is None:
            return
        from userrep.backfill import list_column
        from userrep.store import embedding_rows, offline_frames

        features, clocks, write = result["features"], result["clocks"], self._writer
        history, profile = offline_frames(features, online.space_id, clocks)
        write("user_history", history)
        if signed_up is not None:
            profile = profile.filter(pa.array(np.isin(features.user_ids, list(signed_up))))
        write("user_profile", profile)
        write(
            "user_embedding", embedding_rows(features.user_ids, list_column(result["vectors"]), online.batch_id, clocks)
        )
        if online.history is not None:
            from userrep.state import artist_history
            from userrep.store import history_table

            columns, artists, half_life = online.history
            plays, recent = artist_history(result["state"], features.user_ids, clocks, columns, half_life)
            write(
                "user_artist_history", history_table(features.user_ids, artists, plays, recent, online.batch_id, clocks)
            )

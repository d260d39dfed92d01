"""The near-real-time side of a batch, without any server: what Ray Serve wraps.

``OnlineBatch`` is everything one batch serves (encoders, model, incremental feature state,
neighbour index); it is built whole and then swapped in by reference, so a request that took
one batch finishes on it: no response mixes batches. ``OnlineService`` owns the durable event
log, the current ``OnlineBatch`` and the reload when ``SERVING.json`` changes; a new batch's
state is its dataset as of its ``as_of`` plus a replay of the logged writes that data does not
hold (``userrep.eventlog``: the log, and its compaction into the dataset).

Online time, per user: a user's features are computed as of the later of the batch's ``as_of``
and the midnight after that user's newest accepted event, which is what a batch recomputation of
the same history at that time gives (``userrep.state.user_clocks``). No client can move another
user's windows, and an event dated later than now plus ``max_future_s`` is refused naming ``ts``.

Idempotency: an event may carry a client ``event_id``; an id already accepted (in this process or
in the durable log before it) is acknowledged again and never applied twice.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from userrep import eventlog
from userrep.backfill import read_embeddings
from userrep.batches import batch_dir, read_pointer
from userrep.data import load_dataset
from userrep.features import FeatureSpace, to_utc
from userrep.model import UserAutoencoder, embed
from userrep.state import FeatureState, apply_events, register_user, state_features_at, state_from_dataset, user_clocks

MICRO_BATCH = 2000  # events the writer commits together at most (one fsync, one re-embed, one online write)
APPLY_BACKLOG = 8  # logged commits the applier may lag behind before the logger waits for it
MAX_FUTURE_S = 3600.0  # default: how far past the server's clock an event's ts may lie (client clock skew)


def _take(source: queue.Queue, size) -> list:
    """The next item of ``source`` (blocking) and every other one waiting, up to ``MICRO_BATCH`` events."""
    items = [source.get()]
    total = size(items[0])
    while total < MICRO_BATCH:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            break
        total += size(items[-1])
    return items


@dataclass
class _Write:
    """One POST /events request waiting for the writer."""

    rows: list[dict]
    batch: object  # the OnlineBatch the rows were checked against
    durable: threading.Event = field(default_factory=threading.Event)  # logged (or refused)
    done: threading.Event = field(default_factory=threading.Event)  # applied and written online (or failed)
    ack: dict | None = None
    fresh: list[dict] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    result: dict | None = None
    error: Exception | None = None


class UnknownUser(KeyError):
    """A user the serving batch has never seen (HTTP 404)."""


@dataclass
class OnlineBatch:
    batch_id: str
    as_of: pd.Timestamp
    space: FeatureSpace
    model: UserAutoencoder
    state: FeatureState
    index: object  # faiss.IndexIDMap2 over L2-normalized embeddings
    rows: dict  # user_id -> index id
    users: dict  # index id -> user_id (neighbour answers)
    space_id: str  # the snapshot the batch's features come from (stamped on pushed feature rows)
    vectors: dict  # user_id -> (embedding, updated_at) for users changed online
    lock: threading.Lock
    backfilled: np.ndarray = None  # (users, d) the batch's embeddings, rows as in ``rows``
    replayed: list = None  # users whose state the event log changed at load
    history: tuple | None = None  # (artist indices, artist ids, half-life): the heads' history features
    compacted: object = None  # log position up to which the batch's data holds the logged events
    log_position: object = None  # log position up to which the state has been brought

    def clocks(self, user_ids) -> list[pd.Timestamp]:
        return user_clocks(self.state, user_ids, self.as_of)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_batch(root: Path, batch_id: str, events_log, log=print) -> OnlineBatch:
    """``events_log``: an ``eventlog`` backend (or None: nothing to replay)."""
    import faiss

    started = time.perf_counter()
    directory = batch_dir(root, batch_id)
    manifest = json.loads((directory / "manifest.json").read_text())
    space = FeatureSpace.load(directory / "encoders")
    as_of = to_utc(manifest["as_of"])
    state = state_from_dataset(space, load_dataset(manifest["data"]["path"]), as_of)
    ids, vectors, _ = read_embeddings(directory / "embeddings.parquet")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(_normalized(vectors), np.arange(len(ids), dtype=np.int64))
    online = OnlineBatch(batch_id, as_of, space, UserAutoencoder.load(directory / "model.pt"), state, index,
                         {u: i for i, u in enumerate(ids)}, dict(enumerate(ids)), manifest.get("snapshot") or batch_id,
                         {}, threading.Lock(), vectors, history=_history_spec(directory, space))
    online.compacted = manifest["data"].get("events_watermark")
    replayed = _replay(online, events_log)
    log(f"loaded batch {batch_id} ({len(ids)} users, {replayed} logged writes replayed) "
        f"in {time.perf_counter() - started:.1f}s")
    return online


def _replay(online: OnlineBatch, events_log) -> int:
    """Apply the logged writes after ``online.log_position`` that the batch's data does not hold:
    every write logged after the part of the log compacted into that data, and from the compacted
    part the events at or after as_of (the batch's state holds its data's events before as_of
    only; sign-ups are never compacted). Advances ``log_position``; returns the writes applied."""
    if events_log is None:
        return 0
    replayed, touched = 0, set(online.replayed or ())
    for position, record in events_log.read(online.log_position):
        online.log_position = position
        if record["kind"] == "events" and eventlog.covered(events_log, position, online.compacted):
            record = {**record, "events": [e for e in record["events"] if to_utc(e["ts"], "ts") >= online.as_of]}
            if not record["events"]:
                continue
        touched.update(_apply(online, record))
        replayed += 1
    online.replayed = sorted(touched)
    return replayed


def _history_spec(directory: Path, space: FeatureSpace) -> tuple | None:
    """What the batch's heads take besides the embedding: the candidate artists and the recency
    decay of the user's history of them (from the future-listening head; None without one)."""
    path = directory / "downstream" / "future_listening.pt"
    if not path.exists():
        return None
    from userrep.downstream import load_head

    _, meta = load_head(path)
    return space.artist_index(meta["artists"]), meta["artists"], meta.get("half_life_days")


def _apply(online: OnlineBatch, record: dict) -> list[str]:
    """Apply one logged write to a batch's state; returns the users whose features changed."""
    if record["kind"] == "user":
        register_user(online.state, record["user_id"], record.get("onboarding_artists", ()),
                      record.get("onboarding_genres", ()), record.get("attributes") or {})
        return [record["user_id"]]
    return apply_events(online.state, pd.DataFrame(record["events"]))


def _reembed(online: OnlineBatch, user_ids: list[str]) -> dict:
    """Recompute features and embeddings of users now, re-insert them in the neighbour index."""
    clocks = online.clocks(user_ids)
    features = state_features_at(online.state, user_ids, clocks)
    vectors = embed(online.model, features.matrix)
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    rows = []
    for user_id, vector in zip(user_ids, vectors):
        row = online.rows.get(user_id)
        if row is None:
            row = online.rows[user_id] = len(online.rows) + 10_000_000  # ids of users added online
            online.users[row] = user_id
        rows.append(row)
        online.vectors[user_id] = (vector, now)
    ids = np.array(rows, np.int64)
    online.index.remove_ids(ids)  # one pass over the index for the whole micro-batch, not one per user
    online.index.add_with_ids(_normalized(vectors), ids)
    return {"features": features, "vectors": vectors, "updated_at": now, "clocks": clocks}


class OnlineService:
    """Serve the promoted batch: reads, near-real-time writes, reload on promotion."""

    def __init__(self, root: str | Path, store=None, events_log: str | Path | None = None, log=print,
                 max_future_s: float = MAX_FUTURE_S):
        self.root = Path(root)
        self.max_future = pd.Timedelta(seconds=max_future_s)
        self.store_config = store
        # a file (embedded default) or redis://HOST:PORT/STREAM (production profile), see userrep.eventlog
        self.events_log = eventlog.open_log(events_log or eventlog.default_log(self.root))
        self.log = log
        self._write_lock = threading.Lock()
        self._store = None
        self.batch: OnlineBatch | None = None
        self._pointer = None
        self._queue: queue.Queue[_Write] = queue.Queue()
        # Every client event id accepted so far (the log is the record): a retry is applied once.
        self._seen = {e["event_id"] for _, r in self.events_log.read() if r["kind"] == "events"
                      for e in r["events"] if e.get("event_id")}
        self.reload()
        # Bounded: when the applier falls APPLY_BACKLOG commits behind, the logger waits for it, so
        # acknowledged-but-unapplied events (the freshness lag) stay bounded under any load.
        self._applies: queue.Queue[tuple] = queue.Queue(maxsize=APPLY_BACKLOG)
        threading.Thread(target=self._write_loop, name="event-logger", daemon=True).start()
        threading.Thread(target=self._apply_loop, name="event-applier", daemon=True).start()

    # -- batches -------------------------------------------------------------------------
    def reload(self) -> bool:
        """Load the promoted batch if it changed; the swap is one reference assignment."""
        pointer = read_pointer(self.root)
        if pointer["serving"] is None:
            raise ValueError(f"batch_root: no batch is serving under {self.root}; promote one first")
        if self.batch is not None and pointer["serving"] == self.batch.batch_id:
            return False
        # Built outside the write lock (writes go on meanwhile); the writes logged since the load
        # are replayed under it, so none slips between the replay and the swap.
        fresh = load_batch(self.root, pointer["serving"], self.events_log, self.log)
        with self._write_lock:
            _replay(fresh, self.events_log)
            if fresh.replayed:  # their online rows in this batch must include the logged writes
                self._push(fresh, _reembed(fresh, fresh.replayed))
            self.batch = fresh
        self._pointer = pointer
        return True

    def watch(self, interval_s: float = 1.0, stop: threading.Event | None = None) -> threading.Thread:
        """Poll SERVING.json in a daemon thread and reload on change (a failed load keeps the old batch)."""
        stop = stop or threading.Event()

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
            from userrep.store import open_store

            self._store = open_store(self.store_config, apply=False)
        return self._store

    # -- reads ---------------------------------------------------------------------------
    def embedding(self, user_id: str) -> dict:
        online = self.batch
        updated = online.vectors.get(user_id, (None, online.as_of.isoformat()))[1]
        if self.store is not None:  # the online store is the source of truth for reads
            from userrep.store import online_embeddings

            got, found = online_embeddings(self.store, [user_id], online.batch_id)
            if found[0]:
                return {"user_id": user_id, "batch_id": online.batch_id, "embedding": got[0].tolist(),
                        "updated_at": updated}
        if user_id in online.vectors:
            return {"user_id": user_id, "batch_id": online.batch_id, "embedding": online.vectors[user_id][0].tolist(),
                    "updated_at": updated}
        if user_id in online.rows and online.rows[user_id] < len(online.backfilled):  # no online store
            return {"user_id": user_id, "batch_id": online.batch_id,
                    "embedding": online.backfilled[online.rows[user_id]].tolist(), "updated_at": online.as_of.isoformat()}
        raise UnknownUser(user_id)

    def similar(self, user_id: str, k: int = 10) -> dict:
        online = self.batch
        if user_id not in online.rows:
            raise UnknownUser(user_id)
        row = online.rows[user_id]
        query = online.index.reconstruct(int(row))
        with online.lock:
            scores, found = online.index.search(_normalized(query), k + 1)
        neighbours = [{"user_id": online.users[int(i)], "score": round(float(s), 6)}
                      for s, i in zip(scores[0], found[0]) if i >= 0 and int(i) != row][:k]
        return {"user_id": user_id, "batch_id": online.batch_id, "neighbours": neighbours}

    # -- writes --------------------------------------------------------------------------
    def post_events(self, events: list[dict], wait: bool = True) -> dict:
        """Validate, then hand the events to two stages, each taking every request waiting at that
        moment (group commit): the logger (checks, deduplicates, one durable append) and, in log
        order, the applier (state update, one re-embed, one online write per micro-batch).

        Returns once the events are durable (``wait=False``: their ids, accepted and duplicate)
        or once they are applied and the new embeddings are written (``wait=True``). Events whose
        ``event_id`` was accepted before (or repeats within the micro-batch) are acknowledged
        under ``duplicates`` and not applied again.
        """
        received = time.perf_counter()
        online = self.batch
        write = _Write(self._validated(online, events), online)
        self._queue.put(write)
        (write.done if wait else write.durable).wait()
        if write.error is not None:
            raise write.error
        reply = write.result if wait else write.ack
        return {**reply, "freshness_ms": round((time.perf_counter() - received) * 1000, 2)}

    def _validated(self, online: OnlineBatch, events: list[dict]) -> list[dict]:
        """The events as log rows (ts normalized), or an error naming the field; changes nothing."""
        unknown = sorted({e["user_id"] for e in events if e["user_id"] not in online.state.users})
        if unknown:
            raise UnknownUser(unknown[0])
        latest = pd.Timestamp.now(tz="UTC") + self.max_future
        rows = []
        for i, event in enumerate(events):
            ts = to_utc(event["ts"], f"events[{i}].ts")
            if ts > latest:
                raise ValueError(f"events[{i}].ts: {ts.isoformat()} is later than the server's clock plus "
                                 f"{self.max_future} (max_future_s)")
            row = {**{k: v for k, v in event.items() if v is not None}, "ts": ts.isoformat()}
            rows.append({**row, "weight": row.get("weight", 1.0)})  # one shape, whoever else shares the commit
        frame = pd.DataFrame(rows)
        items = online.space.item_index(frame["item_id"].astype(str).to_numpy(dtype=object))
        if (items < 0).any():
            raise ValueError(f"item_id: unknown item(s) {sorted(set(frame['item_id'][items < 0]))[:5]}")
        weight = pd.to_numeric(frame["weight"], errors="coerce")
        if not (np.isfinite(weight) & (weight >= 0)).all():
            raise ValueError("weight: must be a finite number >= 0")
        return rows

    def _write_loop(self) -> None:
        """Stage 1, the one logger: every request waiting (up to ``MICRO_BATCH`` events) is checked,
        deduplicated, logged in one durable append and acknowledged, then handed to the applier."""
        while True:
            writes = _take(self._queue, lambda w: len(w.rows))
            try:
                self._applies.put(self._log_writes(writes))
            except Exception as exc:  # noqa: BLE001 (handed to each waiting request)
                self._fail(writes, exc)

    def _apply_loop(self) -> None:
        """Stage 2, the one applier: every logged commit waiting is applied to the state,
        re-embedded and written online together, in log order."""
        while True:
            commits = _take(self._applies, lambda c: len(c[1]["events"]) if c[1] else 0)
            writes = [w for _, _, ws in commits for w in ws]
            try:
                self._apply_commits(commits)
            except Exception as exc:  # noqa: BLE001
                self._fail(writes, exc)
            for write in writes:
                write.done.set()

    def _fail(self, writes: list["_Write"], exc: Exception) -> None:
        self.log(f"event write failed: {type(exc).__name__}: {exc}")
        for write in writes:
            if write.result is None:
                write.error = write.error or exc
            write.durable.set()
            write.done.set()

    def _log_writes(self, writes: list["_Write"]) -> tuple:
        """(batch, record or None, writes): the fresh events of ``writes`` logged as one record."""
        with self._write_lock:  # a batch switch replays the log under this lock: nothing slips past it
            online = self.batch
            fresh, ids = [], set()
            for write in writes:
                try:  # a batch switched to since the request was checked: check it again against that one
                    if write.batch is not online:
                        self._validated(online, write.rows)
                except (UnknownUser, ValueError) as exc:
                    write.error = exc
                    continue
                for row in write.rows:
                    event_id = row.get("event_id")
                    if event_id is not None and (event_id in self._seen or event_id in ids):
                        write.duplicates.append(event_id)
                        continue
                    ids.add(event_id)
                    write.fresh.append(row)
                fresh += write.fresh
            record = {"kind": "events", "events": fresh} if fresh else None
            if record:
                self.events_log.append(record)
                self._seen.update(i for i in ids if i is not None)
        for write in writes:  # durable: the writes that asked no more are answered now
            if write.error is None:
                write.ack = {"batch_id": online.batch_id, "accepted": len(write.fresh),
                             "event_ids": [row.get("event_id") for row in write.fresh],
                             "duplicates": write.duplicates}
            write.durable.set()
        return online, record, writes

    def _apply_commits(self, commits: list[tuple]) -> None:
        """Apply logged commits (consecutive ones of the same batch as one), re-embed, write online."""
        groups: list[tuple] = []
        for online, record, writes in commits:
            if groups and groups[-1][0] is online:
                groups[-1][1].extend(record["events"] if record else [])
                groups[-1][2].extend(writes)
            else:
                groups.append((online, list(record["events"]) if record else [], list(writes)))
        for online, events, writes in groups:
            by_user = {}
            if events:
                with online.lock:
                    result = _reembed(online, _apply(online, {"kind": "events", "events": events}))
                self._push(online, result)
                by_user = {u: {"user_id": u, "embedding": v.tolist(), "updated_at": result["updated_at"]}
                           for u, v in zip(result["features"].user_ids, result["vectors"])}
            for write in writes:
                if write.error is None:
                    users = list(dict.fromkeys(row["user_id"] for row in write.fresh))
                    write.result = {**write.ack, "users": [by_user[u] for u in users]}

    def register_user(self, user_id: str, onboarding_artists=(), onboarding_genres=(), attributes=None) -> dict:
        with self._write_lock:
            online = self.batch
            record = {"kind": "user", "user_id": user_id, "onboarding_artists": list(onboarding_artists),
                      "onboarding_genres": list(onboarding_genres), "attributes": attributes or {}}
            self.events_log.append(record)
            with online.lock:
                _apply(online, record)
                result = _reembed(online, [user_id])
            self._push(online, result)
        return {"user_id": user_id, "batch_id": online.batch_id, "embedding": result["vectors"][0].tolist(),
                "updated_at": result["updated_at"]}

    def _push(self, online: OnlineBatch, result: dict) -> None:
        """Features and embeddings of changed users to the online store, under this batch id."""
        if self.store is None:
            return
        from userrep.backfill import embeddings_table
        from userrep.store import offline_frames

        features, clocks = result["features"], result["clocks"]
        history, profile = offline_frames(features, online.space_id, clocks)
        self.store.write_to_online_store("user_history", history.to_pandas())
        self.store.write_to_online_store("user_profile", profile.to_pandas())
        table = embeddings_table(features.user_ids, result["vectors"], online.batch_id).to_pandas()
        table["embedding_batch"] = online.batch_id
        table["event_timestamp"] = pd.DatetimeIndex(clocks)
        table["created"] = pd.Timestamp.now(tz="UTC")
        self.store.write_to_online_store("user_embedding", table)
        if online.history is not None:
            from userrep.state import artist_history
            from userrep.store import history_table

            columns, artists, half_life = online.history
            plays, recent = artist_history(online.state, features.user_ids, clocks, columns, half_life)
            rows = history_table(features.user_ids, artists, plays, recent, online.batch_id, clocks)
            if rows.num_rows:
                self.store.write_to_online_store("user_artist_history", rows.to_pandas())


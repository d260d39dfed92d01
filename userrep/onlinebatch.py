"""What one replica holds of a batch (``OnlineBatch``), and the steps on it that need no service:
load it, bootstrap its shared user state, apply logged records, re-embed the changed users,
check incoming events and push changed users to the online store. ``userrep.online`` runs them."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from userrep import eventlog
from userrep.backfill import load_encoder, read_embeddings
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.registry import batch_dir
from userrep.erasure import ErasedUser
from userrep.features import FeatureSpace, to_utc
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

log = logging.getLogger(__name__)


class UnknownUser(KeyError):
    """A user the serving batch has never seen (HTTP 404)."""


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
    erasures: int = 0  # the manifest's count of erasures applied to the batch's files (a change reloads it)


def load_batch(root: Path, batch_id: str) -> tuple[OnlineBatch, dict]:
    """A batch's artefacts as one replica holds them (no user state); and its manifest."""
    directory = batch_dir(root, batch_id)
    manifest = read_manifest(directory)
    space, model = load_encoder(directory)
    ids, vectors, _ = read_embeddings(BatchDir(directory).embeddings)
    index = LiveIndex(_neighbour_index(directory, ids, vectors))
    online = OnlineBatch(
        batch_id,
        to_utc(manifest["as_of"]),
        space,
        model,
        index,
        {u: i for i, u in enumerate(ids)},
        dict(enumerate(ids)),
        manifest.get("snapshot") or batch_id,
        threading.Lock(),
        vectors,
        history=_history_spec(directory, space),
        erasures=manifest.get("erasures", 0),
    )
    return online, manifest


def still_serving(root: Path, online: OnlineBatch, serving: str) -> bool:
    """Whether ``online`` is what serves: the pointer's batch, its files as loaded (an erasure,
    ``userrep.forget``, rewrites them and counts itself in the manifest)."""
    return serving == online.batch_id and read_manifest(batch_dir(root, serving)).get("erasures", 0) == online.erasures


def _neighbour_index(directory: Path, ids: np.ndarray, vectors: np.ndarray):
    """The index the pipeline built with the batch (HNSW above ``similar_users.EXACT_MAX`` users);
    built here the same way only for a batch without downstream models."""
    import faiss

    path = BatchDir(directory).neighbour_index
    if not path.exists():
        return build_index(vectors)
    index = faiss.read_index(str(path))
    saved = np.load(BatchDir(directory).neighbour_ids)
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
        touched.update(apply_records(online, state, [{"kind": "events", "events": late.to_pylist()}]))
    last = None
    for last, record in events_log.read():
        if record["kind"] == "user" or not eventlog.covered(events_log, last, compacted):
            touched.update(apply_records(online, state, [record]))
    return state, sorted(touched), last


def write_shared_state(online: OnlineBatch, manifest: dict, events_log, push) -> tuple[object, int]:
    """Bootstrap the batch's shared state (the caller holds the batch's lock): every user's state
    from ``bootstrap_state``; the users changed by logged writes are re-embedded and ``push``ed
    online first, since their embeddings and online rows must include those writes. Returns (the
    last log position held, the number of such users)."""
    state, touched, last = bootstrap_state(online, manifest, events_log)
    vectors, updated = {}, None
    if touched:
        result = reembed(online, state, touched)
        push(online, result)
        vectors, updated = dict(zip(touched, result["vectors"])), result["updated_at"]
    blobs = {u: encode_user(s, vectors.get(u), updated if u in vectors else None) for u, s in state.users.items()}
    events_log.bootstrap(online.batch_id, blobs, last)
    return last, len(touched)


def _history_spec(directory: Path, space: FeatureSpace) -> tuple | None:
    """What the batch's heads take besides the embedding: the candidate artists and the recency
    decay of the user's history of them (from the future-listening head; None without one)."""
    path = BatchDir(directory).head("future_listening")
    if not path.exists():
        return None
    from userrep.batch.heads import load_head

    _, meta = load_head(path)
    return space.artist_index(meta["artists"]), meta["artists"], meta.get("half_life_days")


def apply_records(online: OnlineBatch, state: FeatureState, records: list[dict]) -> list[str]:
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


def user_clock(online: OnlineBatch, user_id: str, user: UserState) -> pd.Timestamp:
    """Where one user's feature windows end online (``user_clocks``)."""
    return user_clocks(FeatureState(online.space, {user_id: user}), [user_id], online.as_of)[0]


def reembed(online: OnlineBatch, state: FeatureState, user_ids: list[str]) -> dict:
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


def refuse_erased(events_log, users: list[str]) -> None:
    """``ErasedUser`` for the first of ``users`` that was erased (an erased id is not used again)."""
    erased = events_log.erased(users)
    if erased:
        raise ErasedUser(sorted(erased)[0])


def validate_events(online: OnlineBatch, events: list[dict], events_log, max_future: pd.Timedelta) -> list[dict]:
    """The events as log rows (ts normalized), or an error naming the field; changes nothing.
    Users outside the batch are looked up in the shared state (``events_log``: signed up online)."""
    users = list(dict.fromkeys(e["user_id"] for e in events))
    refuse_erased(events_log, users)
    missing = [u for u in users if u not in online.rows]
    if missing:  # users signed up online are in the shared state
        known = events_log.load(online.batch_id, missing)
        unknown = [u for u in missing if u not in known]
        if unknown:
            raise UnknownUser(unknown[0])
    latest = pd.Timestamp.now(tz="UTC") + max_future
    rows = []
    for i, event in enumerate(events):
        ts = to_utc(event["ts"], f"events[{i}].ts")
        if ts > latest:
            raise ValueError(
                f"events[{i}].ts: {ts.isoformat()} is later than the server's clock plus {max_future} (max_future_s)"
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


def log_sign_up(events_log, user_id: str, onboarding_artists, onboarding_genres, attributes) -> object:
    """Log a sign-up (refused for an erased id); returns its position."""
    refuse_erased(events_log, [user_id])
    record = {
        "kind": "user",
        "user_id": user_id,
        "onboarding_artists": list(onboarding_artists),
        "onboarding_genres": list(onboarding_genres),
        "attributes": attributes or {},
    }
    return events_log.append(record)


def push_changes(write, online: OnlineBatch, result: dict, signed_up=None) -> None:
    """Features and embeddings of changed users to the online store (``write``: a
    ``userrep.onlinestore.OnlineWriter``), under this batch id.
    ``signed_up``: the users whose sign-up information changed (None: all); only their
    ``user_profile`` rows are written, since events do not change a profile (one Feast write,
    ~3 ms, less per micro-batch of events)."""
    from userrep.onlinestore import embedding_rows, list_column
    from userrep.store import offline_frames

    features, clocks = result["features"], result["clocks"]
    history, profile = offline_frames(features, online.space_id, clocks)
    write("user_history", history)
    if signed_up is not None:
        profile = profile.filter(pa.array(np.isin(features.user_ids, list(signed_up))))
    write("user_profile", profile)
    write("user_embedding", embedding_rows(features.user_ids, list_column(result["vectors"]), online.batch_id, clocks))
    if online.history is not None:
        from userrep.onlinestore import history_table
        from userrep.state import artist_history

        columns, artists, half_life = online.history
        plays, recent = artist_history(result["state"], features.user_ids, clocks, columns, half_life)
        write("user_artist_history", history_table(features.user_ids, artists, plays, recent, online.batch_id, clocks))


def apply_delivered(online: OnlineBatch, records: list[dict], load, push) -> dict:
    """Apply delivered records to the users they touch (their state read once, ``load``),
    re-embed those users once and ``push`` them online; returns their new encoded state, for the
    caller's commit. The push comes before the commit: a crash between leaves the records to redo."""
    users = list(
        dict.fromkeys(
            [r["user_id"] for r in records if r["kind"] == "user"]
            + [e["user_id"] for r in records if r["kind"] == "events" for e in r["events"]]
        )
    )
    if not users:
        return {}
    state = FeatureState(online.space, {u: decode_user(b)[0] for u, b in load(users).items()})
    touched = apply_records(online, state, records)
    if len(touched) < len(users):
        log.warning(
            f"batch {online.batch_id}: events of {len(users) - len(touched)} user(s) name items "
            "its encoders do not know; left out of its online state (they reach the next batch)"
        )
    if not touched:
        return {}
    result = reembed(online, state, touched)
    push(online, result, {r["user_id"] for r in records if r["kind"] == "user"})
    return {u: encode_user(state.users[u], v, result["updated_at"]) for u, v in zip(touched, result["vectors"])}


# -- reads ------------------------------------------------------------------------------------


def user_state(events_log, online: OnlineBatch, user_id: str) -> tuple:
    """(state, newest online embedding or None, its time) of a user in the batch's shared state."""
    blob = events_log.load(online.batch_id, [user_id]).get(user_id)
    if blob is None:
        raise UnknownUser(user_id)
    return decode_user(blob)


def read_embedding(online: OnlineBatch, store, events_log, user_id: str) -> dict:
    """The user's newest embedding in ``online``, with ``as_of``: the time its features are as of
    (the user's clock: the batch's as_of, or the midnight after their newest event). The online
    store (when there is one) is the source of truth; then the shared state; then the backfill."""
    if store is not None:
        from userrep.onlinestore import online_embeddings

        got, found, stamps = online_embeddings(store, [user_id], online.batch_id, with_times=True)
        if found[0]:
            return {
                "user_id": user_id,
                "batch_id": online.batch_id,
                "embedding": got[0].tolist(),
                "as_of": stamps[0].isoformat(),
            }
    try:  # no online store (or a row not there yet): the shared state's newest embedding
        state, vector, _ = user_state(events_log, online, user_id)
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


def nearest_users(online: OnlineBatch, found: dict, k: int) -> dict:
    """Nearest users by cosine to ``found`` (``read_embedding``'s answer). The candidates are this
    replica's index (the batch's users, plus the users whose writes this replica applied)."""
    user_id = found["user_id"]
    query = np.asarray(found["embedding"], np.float32)
    row = online.rows.get(user_id, -1)
    with online.lock:
        scores, hits = online.index.search(query, k + 1)
    neighbours = [
        {"user_id": online.users[int(i)], "score": round(float(s), 6)}
        for s, i in zip(scores[0], hits[0])
        if i >= 0 and int(i) != row
    ][:k]
    return {"user_id": user_id, "batch_id": online.batch_id, "neighbours": neighbours}

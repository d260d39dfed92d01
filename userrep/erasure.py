"""The erasure record and the filters that honour it (``userrep users forget``: ``userrep.forget``).

An erased user is known afterwards only by the sha256 of their id (``id_hash``) and the time of
the erasure, in two places:

* the dataset's ``erasures.json`` (``{"erased": {hash: time}}``): ``load_dataset`` leaves out
  every row of an erased user (events, compacted online events, users, pairs) and says so in its
  notes, so a batch built later, from this directory or from a re-export that still holds the
  user, never sees them;
* the event log (``erase``/``erased`` of each backend): the service refuses new writes for an
  erased id (HTTP 410), and every read of the log (compaction, a batch's bootstrap replay, the
  consumers) drops the erased users' events and sign-ups (``scrub_entries``), so a record logged
  in flight, or one a Redis stream still holds, is never applied again.

A hash of an id is a pseudonym, not anonymity: ids from a small space can be guessed back. The
record holds nothing else about the user.

Imports nothing from userrep: the loader and the log backends use it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ERASURES = "erasures.json"  # in a dataset directory: the users erased from it
USER_COLUMNS = {"events": ("user_id",), "users": ("user_id",), "pairs": ("user_a", "user_b")}
NOTHING = {"kind": "events", "events": []}  # what an erased user's sign-up reads as (a no-op)


class ErasedUser(KeyError):
    """A write for a user id that was erased (HTTP 410): an erased id is not used again."""


def id_hash(user_id: str) -> str:
    return hashlib.sha256(str(user_id).encode()).hexdigest()


def read_erasures(data: str | Path) -> dict[str, str]:
    """{id hash: erased at} of a dataset (empty: none erased)."""
    path = Path(data) / ERASURES
    return json.loads(path.read_text())["erased"] if path.exists() else {}


def record_erasures(data: str | Path, hashes: dict[str, str]) -> None:
    """Add ``hashes`` to the dataset's record (write-then-rename: the old record or the new one)."""
    path = Path(data) / ERASURES
    erased = {**read_erasures(data), **hashes}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"erased": dict(sorted(erased.items()))}, indent=1))
    os.replace(tmp, path)


def erased_among(ids: Iterable, hashes) -> set[str]:
    """The ids (strings) of ``ids`` whose hash is in ``hashes``."""
    return {u for u in {str(u) for u in ids} if id_hash(u) in hashes}


def naming(table: pa.Table, users: set[str], columns: Iterable[str]) -> pa.Array:
    """Which rows of ``table`` name any of ``users`` in ``columns`` (a boolean mask)."""
    value_set = pa.array(sorted(users), pa.string())
    named = pa.array(np.zeros(table.num_rows, bool))
    for column in columns:
        named = pc.or_(
            named, pc.fill_null(pc.is_in(table.column(column).cast(pa.string()), value_set=value_set), False)
        )
    return named


def without_users(table: pa.Table, users: set[str], columns: Iterable[str]) -> pa.Table:
    """``table`` without the rows naming any of ``users`` in ``columns``."""
    return table.filter(pc.invert(naming(table, users, columns))) if users else table


def drop_erased(table: pa.Table, hashes, columns: Iterable[str]) -> tuple[pa.Table, int]:
    """(``table`` without the rows of erased users, the number of rows left out)."""
    columns = list(columns)
    if not hashes or not table.num_rows:
        return table, 0
    ids = pc.unique(pa.chunked_array([table.column(c).cast(pa.string()) for c in columns]).combine_chunks())
    kept = without_users(table, erased_among(ids.drop_null().to_pylist(), hashes), columns)
    return kept, table.num_rows - kept.num_rows


def record_users(record: dict | None) -> list[str]:
    """The user ids a log record names."""
    if record is None:
        return []
    if record["kind"] == "user":
        return [str(record["user_id"])]
    return [str(e["user_id"]) for e in record.get("events", ())]


def event_ids_of(record: dict | None, users: set[str]) -> list[str]:
    """The client event ids of ``users``' events in a log record (remembered for retries)."""
    if record is None or record["kind"] != "events":
        return []
    return [e["event_id"] for e in record["events"] if str(e["user_id"]) in users and e.get("event_id")]


def scrub(record: dict | None, erased: set[str]) -> dict | None:
    """A log record without the events and sign-ups of ``erased`` users."""
    if record is None or not erased:
        return record
    if record["kind"] == "user":
        return NOTHING if str(record["user_id"]) in erased else record
    return {**record, "events": [e for e in record["events"] if str(e["user_id"]) not in erased]}


def scrub_entries(entries: list[tuple], erased_of: Callable[[list[str]], set[str]]) -> list[tuple]:
    """(position, record) pairs read from a log, scrubbed of the users ``erased_of`` (a backend's
    ``erased``) says were erased: one lookup for the whole page."""
    users = list(dict.fromkeys(u for _, record in entries for u in record_users(record)))
    erased = erased_of(users) if users else set()
    return [(position, scrub(record, erased)) for position, record in entries] if erased else entries

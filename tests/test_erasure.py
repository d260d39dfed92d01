"""The right to erasure (``userrep users forget``): every store that held a user no longer does,
and nothing reads them back: not a later load of the data, not a compaction, not a replay of the
log after a restart, not a write for their id."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import copy_work, write_dataset
from userrep.cli import app
from userrep.data import load_dataset
from userrep.erasure import ERASURES, ErasedUser, id_hash, read_erasures
from userrep.eventlog import compact, open_log, part_files
from userrep.forget import forget

pytestmark = pytest.mark.usefixtures("closing_services")


def ids_in(table, *columns) -> set[str]:
    return {str(v) for c in columns for v in table.column(c).to_pylist()}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_forget_rewrites_the_tables_that_name_a_user_and_a_reexport_holding_them_loads_without_them(
    tmp_path, tiny_tables, fmt
):
    data = write_dataset(tmp_path / "data", fmt, **tiny_tables)
    before = load_dataset(data)
    report = forget(["u2"], data)
    assert set(read_erasures(data)) == {id_hash("u2")} and "u2" not in (data / ERASURES).read_text()
    for name, columns in {"events": ["user_id"], "users": ["user_id"], "pairs": ["user_a", "user_b"]}.items():
        path = data / f"{name}.{fmt}"
        raw = pq.read_table(path) if fmt == "parquet" else load_dataset_table(path)
        assert "u2" not in ids_in(raw, *columns), name
        assert any(key.endswith(path.name) for key in report["dataset"]), name
    after = load_dataset(data)  # every other row is still there, values unchanged
    keep = pc.not_equal(before.events.column("user_id"), "u2")
    assert after.events.equals(before.events.filter(keep))
    assert after.users.num_rows == before.users.num_rows - 1 and after.pairs.num_rows == before.pairs.num_rows - 2
    assert forget(["u2"], data)["dataset"] == {}  # a rerun finds nothing left: files untouched

    # an upstream re-export that still holds the user: the record keeps them out, and says so
    write_dataset(data, fmt, **tiny_tables)
    again = load_dataset(data)
    assert "u2" not in ids_in(again.events, "user_id") | ids_in(again.users, "user_id")
    assert again.events.num_rows == before.events.num_rows - 1
    assert any("left out 1 row(s) of erased users" in note for note in again.notes)


def load_dataset_table(path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = path.read_text().splitlines()[0].split(",")
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())))


def test_forget_refuses_no_ids_or_a_missing_dataset_naming_the_field(tmp_path, tiny_tables):
    data = write_dataset(tmp_path / "data", "csv", **tiny_tables)
    with pytest.raises(ValueError, match="user_id"):
        forget([" "], data)
    result = CliRunner().invoke(app, ["users", "forget", "u1", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "data:" in result.output


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.slow)])
def log(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "online" / "events.sqlite")
    return f"redis://{request.getfixturevalue('redis_server')}/erase-{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
def test_forget_removes_a_user_from_every_store_and_nothing_brings_them_back(two_batches, small_world, tmp_path, log):
    from userrep.batch.layout import BatchDir, read_manifest
    from userrep.batch.registry import missing_tasks
    from userrep.fsio import integrity_problems
    from userrep.online import OnlineService, UnknownUser
    from userrep.onlinestore import online_embeddings
    from userrep.store import open_store

    work = tmp_path / "work"
    store = copy_work(two_batches, work)
    data = tmp_path / "world"
    shutil.copytree(small_world, data)  # the erasure rewrites the dataset: a copy, the batches pointed at it
    for record in (*work.glob("batches/*/build.json"), *work.glob("batches/*/manifest.json")):
        record.write_text(record.read_text().replace(str(small_world), str(data)))
    root = work / "batches"
    gone, kept, signed = "u0000009", "u0000010", f"new-{uuid.uuid4().hex[:6]}"
    assert {gone, kept} <= ids_in(pq.read_table(BatchDir(root / "b1").embeddings), "user_id")

    online = OnlineService(root, store=store, events_log=log)
    event = lambda user, day, n: {"event_id": f"{user}-{n}", "user_id": user, "item_id": "t0000003", "ts": day}  # noqa: E731
    online.post_events([event(gone, "2026-05-10T08:00:00Z", 1), event(kept, "2026-05-10T09:00:00Z", 1)])
    compact(log, data)  # one shared record, now in the dataset's online parts
    online.register_user(signed, ["a000001"])
    online.post_events([event(gone, "2026-05-11T08:00:00Z", 2)])  # theirs only
    online.post_events([event(gone, "2026-05-12T08:00:00Z", 3), event(kept, "2026-05-12T09:00:00Z", 3)])  # shared
    assert online.embedding(gone)["embedding"] and online.embedding(signed)["embedding"]

    args = ["users", "forget", gone, signed, "--data", str(data), "--root", str(root)]
    result = CliRunner().invoke(app, [*args, "--feast-home", str(store.home), "--log", log])
    assert result.exit_code == 0, result.output
    erased = {gone, signed}

    # the dataset: every contract table and online part, read raw
    tables = [*(data / f"{n}.parquet" for n in ("events", "users")), *part_files(data)]
    assert all(not erased & ids_in(pq.read_table(p), "user_id") for p in tables)
    assert not erased & ids_in(pq.read_table(data / "pairs.parquet"), "user_a", "user_b")
    assert kept in ids_in(pq.read_table(part_files(data)[0]), "user_id")  # the shared part kept the others
    # every batch: embeddings, features, neighbour index, hashes refreshed, counted in the manifest
    for batch in ("b1", "b2"):
        files = BatchDir(root / batch)
        for path in (files.embeddings, files.features):
            users = ids_in(pq.read_table(path), "user_id")
            assert not erased & users and kept in users
        assert gone not in set(np.load(files.neighbour_ids).astype(str))
        assert integrity_problems(root / batch) == [] and missing_tasks(root / batch) == []
        assert read_manifest(root / batch)["erasures"] == 1
    # Feast: offline rows of every snapshot and batch, snapshot user lists, online rows
    for path in (store.home / "data").glob("*.parquet"):
        assert not erased & ids_in(pq.read_table(path, columns=["user_id"]), "user_id"), path.name
    for path in (store.home / "snapshots").glob("*/users.npy"):
        assert gone not in set(np.load(path).astype(str))
    feast = open_store(store, apply=False)
    for batch in ("b1", "b2"):
        _, found = online_embeddings(feast, [gone, signed, kept], batch)
        assert list(found) == [False, False, True]
    rows = feast.get_online_features(features=["user_history:history"], entity_rows=[{"user_id": gone}]).to_dict()
    assert rows["history"] == [None]
    # the event log: state gone in every batch, no record readable with them
    events_log = open_log(log)
    assert events_log.load("b1", [gone, signed, kept]).keys() == {kept}
    assert not erased & {u for _, r in events_log.read() for u in _users(r)}
    remembered = lambda ids: {e for e in ids if events_log.client.exists(events_log._key("event_id", e))}  # noqa: E731
    if not log.startswith("redis://"):  # SQLite rewrites in place: not even the raw rows name them
        raw = [text for (text,) in events_log._db().execute("SELECT record FROM log")]
        assert raw and not any(gone in text or signed in text for text in raw)
        remembered = lambda ids: {e for (e,) in events_log._db().execute("SELECT id FROM event_ids")} & set(ids)  # noqa: E731
    # the event ids remembered for retries: theirs go (compacted, logged alone, shared), others' stay
    assert remembered([f"{gone}-{n}" for n in (1, 2, 3)] + [f"{kept}-1", f"{kept}-3"]) == {f"{kept}-1", f"{kept}-3"}

    # the serving replica reloads the rewritten batch; their ids are refused, others still served
    assert online.reload() and online.batch.erasures == 1
    for user in erased:
        with pytest.raises(UnknownUser):
            online.embedding(user)
    assert gone not in {n["user_id"] for n in online.similar(kept, k=50)["neighbours"]}
    with pytest.raises(ErasedUser):
        online.post_events([event(gone, "2026-05-13T08:00:00Z", 4)])
    with pytest.raises(ErasedUser):
        online.register_user(gone)
    online.post_events([event(kept, "2026-05-13T08:00:00Z", 4)])

    # a record logged in flight (past the service's check), then a restart that replays the log
    events_log.append_events([event(gone, "2026-05-14T08:00:00Z", 5)])
    online.close()
    events_log.drop("b1")  # no shared state left: the restarted replica bootstraps from data + log
    restarted = OnlineService(root, store=store, events_log=log)
    with pytest.raises(UnknownUser):
        restarted.user_state(gone)
    assert restarted.user_state(kept)
    compact(log, data)
    assert all(gone not in ids_in(pq.read_table(p), "user_id") for p in part_files(data))
    assert gone not in ids_in(load_dataset(data).events, "user_id")


def _users(record) -> set[str]:
    from userrep.erasure import record_users

    return set(record_users(record))

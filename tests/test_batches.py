"""Batch lifecycle on the small world with a real Feast store: build, gate, promote, roll back, crash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import copy_work
from userrep.backfill import embeddings_table, read_embeddings
from userrep.batch import registry as batches
from userrep.batch.build import BuildConfig
from userrep.batch.downstream import serving_history, task_data
from userrep.batch.gate import run_gate
from userrep.cli import app
from userrep.data import load_dataset
from userrep.features import FeatureSpace
from userrep.fsio import sha256
from userrep.model import AEConfig
from userrep.onlinestore import online_embeddings, online_history
from userrep.store import open_store
from userrep.tasks.registry import tasks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("closing_services")]


@pytest.fixture(scope="module")
def lifecycle(small_world, two_batches, tmp_path_factory):
    """b1 (as of May 1) built, gated and serving; b2 (as of June 30, later data) built, not gated."""
    work = tmp_path_factory.mktemp("lifecycle") / "work"
    config = BuildConfig(ae=AEConfig(epochs=8), feast=copy_work(two_batches, work))
    return work / "batches", load_dataset(small_world), config


def corrupt_copy(root: Path, name: str) -> Path:
    """A copy of b2 to break; its manifest hashes are refreshed so only the content checks can catch it."""
    target = root.parent / "corrupt" / name
    shutil.copytree(root / "b2", target)
    return target


def refresh_hashes(batch: Path) -> None:
    manifest = json.loads((batch / "manifest.json").read_text())
    manifest["files"] = {name: sha256(batch / name) for name in manifest["files"]}
    (batch / "manifest.json").write_text(json.dumps(manifest))


def test_clean_retrain_on_later_data_passes_the_gate(lifecycle):
    root, ds, _ = lifecycle
    record = run_gate(root / "b2", root / "b1", ds)
    assert record["passed"], record["reasons"]
    inputs = record["inputs"]
    assert inputs["knn_overlap"] > 0.5 and inputs["heads_kept"] > 0.9 and inputs["embedding_drift"] < 0.7
    # b2 continues b1's space: the gate reads it unaligned, as b1's consumers would
    assert json.loads((root / "b2" / "manifest.json").read_text())["aligned_to"]["batch_id"] == "b1"
    with_heads = {name for name, task in tasks().items() if task.has_head}
    assert inputs["continues"] and set(inputs["heads_kept_by_task"]) == with_heads
    space = inputs["space"]
    assert space["cosine_median"] > 0.8 and space["knn_embeddings"] >= space["knn_features"] - 0.1, space
    assert (root / "b2" / "gate.json").exists() and (root / "b2" / "drift_report.html").stat().st_size > 10_000
    assert batches.state(root, "b2") == "gated"


def test_each_head_deploys_the_design_that_validates_better_and_its_features_are_online(lifecycle):
    root, ds, config = lifecycle
    manifest = json.loads((root / "b1" / "manifest.json").read_text())
    store = open_store(config.feast, apply=False)
    for task in ("future_listening", "artist_preference"):
        entry = manifest["downstream"][task]
        designs = entry["designs"]
        assert entry["design"] == max(designs, key=designs.get)
        metrics = entry["metrics"]
        # future listening chooses by the validation score: the mean of nDCG@10 and recall@50
        chosen_by = (metrics["ndcg@10"] + metrics["recall@50"]) / 2 if task == "future_listening" else metrics["auc"]
        assert chosen_by == pytest.approx(designs[entry["design"]], abs=1e-5)
    # On this world the user's own history wins both tasks by a wide margin (as in `userrep evaluate`).
    assert manifest["downstream"]["future_listening"]["design"] == "embedding+history"
    data = task_data(root / "b1", ds)
    ids, plays, recent = serving_history(root / "b1", ds, data)
    got_plays, got_recent = online_history(store, ids[:50], "b1", list(data.artists))
    assert (got_plays > 0).sum() > 100
    assert np.allclose(got_plays, plays[:50].toarray()) and np.allclose(got_recent, recent[:50].toarray(), rtol=1e-5)


def test_task_models_train_on_a_seeded_user_sample_and_serve_every_user(lifecycle):
    from userrep.batch.downstream import DownstreamConfig

    root, ds, _ = lifecycle
    full = task_data(root / "b1", ds)
    sampled = task_data(root / "b1", ds, DownstreamConfig(max_users=300))
    assert len(full.user_ids) > 1000 and len(sampled.user_ids) == 300
    assert set(sampled.user_ids) < set(full.user_ids)
    assert list(task_data(root / "b1", ds, DownstreamConfig(max_users=300)).user_ids) == list(sampled.user_ids)
    rows = pd.Index(full.user_ids).get_indexer(sampled.user_ids)
    np.testing.assert_allclose(sampled.x, full.x[rows], atol=1e-5)  # the same users' embeddings, whoever else
    assert len(sampled.train) + len(sampled.valid) == int((sampled.labels.sum(axis=1) > 0).sum())
    ids, _, _ = serving_history(root / "b1", ds, sampled)
    assert len(ids) == json.loads((root / "b1" / "manifest.json").read_text())["users"]


def test_task_data_streamed_from_the_directory_equals_the_loaded_dataset(lifecycle, monkeypatch):
    """The pipeline's steps read the dataset directory a batch of events at a time (``EventSource``):
    the sample, its labels and embeddings and the served history equal those from the loaded table."""
    from userrep import data as data_module
    from userrep.batch.downstream import DownstreamConfig
    from userrep.source import EventSource

    root, ds, _ = lifecycle
    monkeypatch.setattr(data_module, "EVENT_BATCH_ROWS", 5_000)  # many batches on the small world
    source = EventSource(ds.path)
    as_of = pd.Timestamp("2026-04-01", tz="UTC")
    assert ds.events.num_rows > 10 * 5_000
    assert list(source.known_users(as_of)) == list(EventSource(ds).known_users(as_of))
    assert source.first_time() == pd.Timestamp(pa.compute.min(ds.events.column("ts")).as_py())
    config = DownstreamConfig(max_users=300)
    streamed, loaded = task_data(root / "b1", source, config), task_data(root / "b1", ds, config)
    assert list(streamed.user_ids) == list(loaded.user_ids) and len(streamed.user_ids) == 300
    for name in ("x", "labels", "history", "plays", "recent", "cold_x"):
        assert np.array_equal(getattr(streamed, name), getattr(loaded, name)), name
    ids, plays, recent = serving_history(root / "b1", source, loaded)  # summed over 5k-event batches
    want_ids, want_plays, want_recent = serving_history(root / "b1", ds, loaded)
    assert list(ids) == list(want_ids) and plays.nnz == want_plays.nnz > 1000
    np.testing.assert_allclose(plays.toarray(), want_plays.toarray(), rtol=1e-12)
    np.testing.assert_allclose(recent.toarray(), want_recent.toarray(), rtol=1e-9)


def test_shuffled_embeddings_are_blocked_as_unstable(lifecycle):
    root, ds, _ = lifecycle
    bad = corrupt_copy(root, "shuffled")
    ids, vectors, batch_id = read_embeddings(bad / "embeddings.parquet")
    shuffled = vectors[np.random.default_rng(0).permutation(len(vectors))]
    pq.write_table(embeddings_table(ids, shuffled, batch_id), bad / "embeddings.parquet")
    refresh_hashes(bad)
    record = run_gate(bad, root / "b1", ds, report=False)
    assert not record["passed"]
    assert any(r.startswith("stability_knn") for r in record["reasons"]), record["reasons"]


def test_a_feature_column_scaled_tenfold_is_blocked_by_name(lifecycle):
    root, ds, _ = lifecycle
    bad = corrupt_copy(root, "scaled")
    names = [name for _, name, _ in FeatureSpace.load(bad / "encoders").column_names()]
    column = names.index("activity_30d:log_plays")
    table = pq.read_table(bad / "features.parquet")
    matrix = table.column("features").combine_chunks().flatten().to_numpy().reshape(len(table), -1).copy()
    matrix[:, column] *= 10
    flat = pa.array(matrix.ravel(), pa.float32())
    pq.write_table(
        table.set_column(1, "features", pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])),
        bad / "features.parquet",
    )
    refresh_hashes(bad)
    record = run_gate(bad, root / "b1", ds, report=False)
    assert not record["passed"]
    assert any(r.startswith("feature_column_drift") and "activity_30d:log_plays" in r for r in record["reasons"])


def test_a_missing_head_blocks_the_gate_and_promotion(lifecycle):
    root, ds, _ = lifecycle
    bad = corrupt_copy(root, "nohead")
    (bad / "downstream" / "artist_preference.pt").unlink()
    record = run_gate(bad, root / "b1", ds, report=False)
    assert not record["passed"] and "artist_preference" in record["reasons"][0]
    # Even with a forged passing decision, promotion checks the models itself.
    shutil.copytree(bad, root / "nohead")
    manifest = json.loads((root / "nohead" / "manifest.json").read_text())
    (root / "nohead" / "manifest.json").write_text(json.dumps({**manifest, "batch_id": "nohead"}))
    forged = json.loads((root / "b2" / "gate.json").read_text()) if (root / "b2" / "gate.json").exists() else {}
    (root / "nohead" / "gate.json").write_text(json.dumps({**forged, "passed": True, "serving": "b1", "reasons": []}))
    with pytest.raises(batches.BatchError, match="lacks downstream model.*artist_preference"):
        batches.promote(root, "nohead")
    shutil.rmtree(root / "nohead")


def test_a_crash_before_the_switch_leaves_the_old_batch_serving(lifecycle):
    root, ds, _ = lifecycle
    if not (root / "b2" / "gate.json").exists():
        run_gate(root / "b2", root / "b1", ds, report=False)
    assert batches.serving_batch(root) == "b1"
    crash = (
        "import os, sys; from userrep.batch import registry as batches; "
        "os.replace = lambda *a, **k: os._exit(9); batches.promote(sys.argv[1], 'b2')"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr  # died between writing the new pointer and switching
    assert batches.serving_batch(root) == "b1"
    assert [b["batch_id"] for b in batches.list_batches(root) if b["state"] == "serving"] == ["b1"]


def test_promote_rollback_round_trip_and_online_reads_per_batch(lifecycle):
    root, ds, config = lifecycle
    if not (root / "b2" / "gate.json").exists():
        run_gate(root / "b2", root / "b1", ds, report=False)
    pointer = batches.promote(root, "b2")
    assert pointer["serving"] == "b2" and pointer["history"] == ["b1"]
    assert batches.state(root, "b1") == "previous"
    with pytest.raises(batches.BatchError, match="already serving"):
        batches.promote(root, "b2")
    store = open_store(config.feast, apply=False)
    for batch_id in ("b1", "b2"):  # both batches readable online, each with its own vectors
        ids, vectors, _ = read_embeddings(root / batch_id / "embeddings.parquet")
        got, found = online_embeddings(store, ids[:20], batch_id)
        assert found.all() and np.array_equal(got, vectors[:20])
    assert batches.rollback(root)["serving"] == "b1"
    assert batches.read_pointer(root)["history"] == []
    with pytest.raises(batches.BatchError, match="no previous batch"):
        batches.rollback(root)
    assert batches.promote(root, "b2")["serving"] == "b2"  # gated against b1, which serves again


def test_cli_lists_shows_and_refuses_with_reasons(lifecycle):
    root, _, _ = lifecycle
    runner = CliRunner()
    listed = runner.invoke(app, ["batch", "list", "--root", str(root)])
    assert listed.exit_code == 0 and "b1" in listed.output and "serving" in listed.output
    shown = runner.invoke(app, ["batch", "show", batches.serving_batch(root), "--root", str(root)])
    assert shown.exit_code == 0 and json.loads(shown.output)["state"] == "serving"
    unknown = runner.invoke(app, ["batch", "promote", "nope", "--root", str(root)])
    assert unknown.exit_code == 1 and "no finished batch 'nope'" in unknown.output


def test_refresh_reembeds_with_the_serving_batch_and_publishes_under_its_id(lifecycle, small_world):
    from userrep.backfill import load_encoder
    from userrep.batch.refresh import refresh
    from userrep.featurize import build_user_features
    from userrep.model import embed

    root, ds, config = lifecycle
    serving = batches.serving_batch(root)
    result = refresh(small_world, "2026-06-15", root, config.feast)
    # streamed partition by partition (userrep.partitions), equal to the loaded dataset's features
    space, model = load_encoder(root / serving)
    expected = build_user_features(ds, pd.Timestamp("2026-06-15", tz="UTC"), space)
    assert result["batch_id"] == serving and result["as_of"].startswith("2026-06-15")
    ids, vectors, batch_id = read_embeddings(result["path"])
    assert batch_id == serving and len(ids) == result["users"]
    assert list(ids) == list(expected.user_ids)
    assert np.allclose(vectors, embed(model, expected.matrix), atol=1e-5)
    assert not list((root / serving / "refresh").glob("*.parts"))  # the partitions are removed
    _, backfilled, _ = read_embeddings(root / serving / "embeddings.parquet")
    assert not np.allclose(vectors, backfilled)  # other day, other features, same encoder
    got, found = online_embeddings(open_store(config.feast, apply=False), ids[:10], serving)
    assert found.all() and np.allclose(got, vectors[:10])


def test_online_core_without_a_store_reads_backfill_applies_events_and_follows_promotion(lifecycle, tmp_path):
    from userrep.eventlog import open_log
    from userrep.online import OnlineService, UnknownUser

    root, ds, _ = lifecycle
    service = OnlineService(root, store=None, events_log=tmp_path / "events.sqlite")
    serving = service.batch.batch_id
    ids, vectors, _ = read_embeddings(root / serving / "embeddings.parquet")
    got = service.embedding(str(ids[5]))
    assert got["batch_id"] == serving and np.allclose(got["embedding"], vectors[5])
    reply = service.post_events([{"user_id": str(ids[5]), "item_id": "t0000001", "ts": "2026-07-02T00:00:00+00:00"}])
    assert not np.allclose(reply["users"][0]["embedding"], vectors[5])
    assert len(list(open_log(tmp_path / "events.sqlite").read())) == 1
    with pytest.raises(UnknownUser):
        service.embedding("nobody")
    with pytest.raises(ValueError, match="item_id"):
        service.post_events([{"user_id": str(ids[5]), "item_id": "nope", "ts": "2026-07-02T00:00:00+00:00"}])
    assert len(list(open_log(tmp_path / "events.sqlite").read())) == 1  # refused writes are not logged
    other = "b1" if serving == "b2" else "b2"
    pointer = batches.read_pointer(root)
    if other in pointer["history"]:
        batches.rollback(root)
    else:
        run_gate(root / other, root / serving, ds, report=False)
        batches.promote(root, other)
    assert service.reload() and service.batch.batch_id == other
    replayed = service.embedding(str(ids[5]))  # the logged event replayed into the new batch
    assert replayed["batch_id"] == other and replayed["as_of"] != service.batch.as_of.isoformat()


RACE = """
import json, sys, time
from userrep.batch import registry
write = registry._write_pointer
def slow_write(root, pointer):  # widen the window between the checks and the switch
    time.sleep(1.0)
    write(root, pointer)
registry._write_pointer = slow_write
root, batch_id, redis = sys.argv[1], sys.argv[2], sys.argv[3] or None
try:
    print(json.dumps({"promoted": registry.promote(root, batch_id, redis)["serving"]}))
except registry.BatchError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


@pytest.mark.parametrize("lock", ["file", "redis"])
def test_two_promotions_at_once_have_exactly_one_winner(lifecycle, tmp_path, lock, request):
    """Two candidates, both gated against b1, promoted at the same moment by two processes: the
    pointer lock lets one switch; the other then finds its gate compared against a batch that no
    longer serves and is refused. The pointer names the winner with b1 as its one previous batch."""
    root, _, _ = lifecycle
    race_root = tmp_path / "batches"
    race_root.mkdir()
    shutil.copytree(root / "b1", race_root / "b1")
    for name in ("c1", "c2"):  # b2's files under two ids, each with a passed gate against b1
        shutil.copytree(root / "b2", race_root / name, ignore=shutil.ignore_patterns("gate.json"))
        manifest = json.loads((race_root / name / "manifest.json").read_text())
        (race_root / name / "manifest.json").write_text(json.dumps({**manifest, "batch_id": name}))
        (race_root / name / "gate.json").write_text(json.dumps({"passed": True, "serving": "b1", "reasons": []}))
    (race_root / "SERVING.json").write_text(json.dumps({"serving": "b1", "history": [], "updated_at": None}))
    redis = request.getfixturevalue("redis_server") if lock == "redis" else ""
    racers = [
        subprocess.Popen([sys.executable, "-c", RACE, str(race_root), name, redis], stdout=subprocess.PIPE, text=True)
        for name in ("c1", "c2")
    ]
    results = [json.loads(racer.communicate(timeout=120)[0]) for racer in racers]
    winners = [r["promoted"] for r in results if "promoted" in r]
    refused = [r["refused"] for r in results if "refused" in r]
    assert len(winners) == 1 and len(refused) == 1, results
    assert "gate it again" in refused[0] and winners[0] in refused[0]
    pointer = batches.read_pointer(race_root)
    assert pointer["serving"] == winners[0] and pointer["history"] == ["b1"]


def test_a_pointer_lock_held_elsewhere_is_a_clear_refusal(lifecycle, tmp_path):
    from filelock import FileLock

    from userrep.batch.layout import POINTER_LOCK

    root = tmp_path / "batches"
    root.mkdir()
    with FileLock(root / POINTER_LOCK), pytest.raises(batches.BatchError, match="another promotion or rollback"):
        with batches.pointer_lock(root, wait_s=0.2):
            pass
    with pytest.raises(batches.BatchError, match="Redis 127.0.0.1:1 unreachable"):
        with batches.pointer_lock(root, "127.0.0.1:1"):
            pass


def test_prune_removes_old_batches_and_their_rows_never_serving_or_previous(two_batches, tmp_path):
    """b3 serving, b1 the rollback target, b2 older history: ``batch prune --keep 0`` removes b2
    only, with its offline and online rows and its feature service; b1 and b3 keep theirs, and a
    rollback still finds b1."""
    from feature_repo.feature_services import batch_service_name

    runner = CliRunner()

    work = tmp_path / "work"
    config = copy_work(two_batches, work)
    root = work / "batches"
    shutil.copytree(root / "b2", root / "b3")
    manifest = json.loads((root / "b3" / "manifest.json").read_text())
    later = {"batch_id": "b3", "created_at": "2999-01-01T00:00:00+00:00"}
    (root / "b3" / "manifest.json").write_text(json.dumps({**manifest, **later}))
    (root / "SERVING.json").write_text(json.dumps({"serving": "b3", "history": ["b2", "b1"], "updated_at": None}))
    assert batches.prune(root, keep=3)["removed"] == []
    store = open_store(config, apply=False)
    ids = {b: read_embeddings(root / b / "embeddings.parquet")[0][:20] for b in ("b1", "b2")}
    assert all(online_embeddings(store, ids[b], b)[1].all() for b in ("b1", "b2"))

    done = runner.invoke(
        app, ["batch", "prune", "--keep", "0", "--root", str(root), "--feast-home", str(work / "feast")]
    )
    assert done.exit_code == 0, done.output
    assert "removed 1 batch(es) b2" in done.output
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["b1", "b3"]
    assert batches.read_pointer(root)["history"] == ["b1"]
    store = open_store(config, apply=False)
    assert not online_embeddings(store, ids["b2"], "b2")[1].any()
    assert online_embeddings(store, ids["b1"], "b1")[1].all()
    offline = pq.read_table(work / "feast" / "data" / "user_embedding.parquet").column("batch_id").to_pylist()
    assert "b2" not in offline and "b1" in offline
    services = {s.name for s in store.list_feature_services()}
    assert batch_service_name("b2") not in services and batch_service_name("b1") in services
    assert batches.rollback(root)["serving"] == "b1"
    # a prune that died mid-delete: its renamed directory is never listed, and the next prune removes it
    shutil.copytree(root / "b3", root / ".removing-b2")
    assert [b["batch_id"] for b in batches.list_batches(root)] == ["b1", "b3"]
    assert batches.prune(root, keep=5)["removed"] == [] and not (root / ".removing-b2").exists()
    bad = runner.invoke(app, ["batch", "prune", "--keep", "-1", "--root", str(root)])
    assert bad.exit_code == 2 and "keep" in bad.output

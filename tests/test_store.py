"""Feast: materialization, point-in-time training sets (with the dropped-row guard), online reads per batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from userrep.backfill import embeddings_table
from userrep.batchrows import publish_embeddings
from userrep.data import load_dataset
from userrep.features import FeatureSpace
from userrep.featurize import build_user_features
from userrep.onlinestore import OnlineWriter, embedding_rows, online_embeddings
from userrep.store import (
    StoreConfig,
    historical_features,
    materialize,
    open_store,
    training_set,
)

pytestmark = pytest.mark.slow  # Feast import + apply take seconds


@pytest.fixture(scope="module")
def feast_world(small_world, tmp_path_factory):
    config = StoreConfig(home=tmp_path_factory.mktemp("feast"))
    store = open_store(config)
    ds = load_dataset(small_world)
    early = materialize(ds, "2026-03-01", config, store=store)
    late = materialize(ds, "2026-06-01", config, store=store)
    return config, store, ds, early, late


def test_training_set_is_the_point_in_time_snapshot(feast_world):
    _, store, ds, early, late = feast_world
    activity = []
    for snapshot in (early, late):
        space = FeatureSpace.load(snapshot.space_dir)
        direct = build_user_features(ds, snapshot.as_of, space)
        got = training_set(store, snapshot, space, direct.user_ids)
        assert list(got.user_ids) == list(direct.user_ids)
        assert np.array_equal(got.matrix, direct.matrix)  # through Feast and back, bit for bit
        activity.append(got.matrix[:, got.schema.slices()["activity_all"]][:, 0])
    assert (activity[1] >= activity[0]).all() and (activity[1] > activity[0]).mean() > 0.5  # later = more plays


def test_rows_feast_cannot_join_come_back_in_order_with_nulls(feast_world):
    _, store, _, early, late = feast_world
    user = str(early.user_ids[0])
    planted = pd.DataFrame(
        {
            "user_id": [user, user, "nobody", str(late.user_ids[1])],
            "event_timestamp": pd.to_datetime(["2026-03-02", "2025-01-01", "2026-03-02", "2026-06-02"], utc=True),
        }
    )
    frame, _ = historical_features(store, planted, store.get_feature_service("training_features"))
    assert list(frame["user_id"]) == list(planted["user_id"])  # every row, in the caller's order
    spaces = list(frame["user_history__space_id"])
    assert spaces[0] == early.space_id and spaces[3] == late.space_id
    assert pd.isna(spaces[1]) and pd.isna(spaces[2])  # before any snapshot / unknown: empty, not dropped


def test_the_dask_file_store_drops_such_rows_and_the_guard_restores_them(feast_world):
    config, _, _, early, _ = feast_world
    store = open_store(StoreConfig(home=config.home, offline="file"))
    user = str(early.user_ids[0])
    planted = pd.DataFrame(
        {"user_id": [user, user], "event_timestamp": pd.to_datetime(["2026-03-02", "2025-01-01"], utc=True)}
    )
    raw = store.get_historical_features(
        entity_df=planted, features=store.get_feature_service("training_features"), full_feature_names=True
    ).to_df()
    frame, dropped = historical_features(store, planted, store.get_feature_service("training_features"))
    assert len(raw) == 1 and dropped == 1  # Feast silently lost the early row
    assert frame["user_history__space_id"].iloc[0] == early.space_id and pd.isna(
        frame["user_history__space_id"].iloc[1]
    )


def test_training_set_refuses_users_without_a_snapshot_row(feast_world):
    _, store, _, early, _ = feast_world
    space = FeatureSpace.load(early.space_dir)
    with pytest.raises(ValueError, match=r"user_id: no feature row .* 1 of 2 users \(e\.g\. ghost\)"):
        training_set(store, early, space, [str(early.user_ids[0]), "ghost"])


def test_online_reads_never_mix_batches(feast_world):
    config, store, _, early, _ = feast_world
    users = [str(u) for u in early.user_ids[:50]]
    rng = np.random.default_rng(0)
    vectors = {b: rng.normal(size=(len(users), 8)).astype(np.float32) for b in ("b-one", "b-two")}
    for batch_id, matrix in vectors.items():
        publish_embeddings(store, config, embeddings_table(users, matrix, batch_id), batch_id, "2026-03-01")
    for batch_id, matrix in vectors.items():
        got, found = online_embeddings(store, users + ["nobody"], batch_id)
        assert found[:-1].all() and not found[-1]
        assert np.array_equal(got[:-1], matrix)  # this batch's vectors, none of the other's
    got, found = online_embeddings(store, users, "b-three")
    assert not found.any()
    assert store.get_feature_service("batch_b_one").tags["batch_id"] == "b-one"


def test_the_online_writer_stores_what_feast_reads_back(feast_world):
    from userrep.onlinestore import list_column

    _, store, _, early, _ = feast_world
    users = [str(u) for u in early.user_ids[50:60]]
    matrix = np.random.default_rng(1).normal(size=(len(users), 8)).astype(np.float32)
    clocks = list(pd.date_range("2026-03-02", periods=len(users), freq="D", tz="UTC"))  # one time per user
    OnlineWriter(store)("user_embedding", embedding_rows(users, list_column(matrix), "b-writer", clocks))
    got, found, times = online_embeddings(store, users + ["nobody"], "b-writer", with_times=True)
    assert found[:-1].all() and not found[-1] and np.array_equal(got[:-1], matrix)
    assert times[:-1] == clocks and pd.isna(times[-1])


def test_bad_store_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="online: expected"):
        StoreConfig(home=tmp_path, online="memcached")
    with pytest.raises(ValueError, match="offline: expected"):
        StoreConfig(home=tmp_path, offline="bigquery")


def test_the_redis_password_comes_from_the_environment_or_a_mounted_secret(tmp_path, monkeypatch):
    from userrep.store import store_config

    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("REDIS_PASSWORD_FILE", raising=False)
    assert store_config(tmp_path, "redis", "h:1").redis == "h:1"
    (tmp_path / "password").write_text("s3cret\n")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "password"))
    assert store_config(tmp_path, "redis", "h:1").redis == "h:1,password=s3cret"
    monkeypatch.setenv("REDIS_PASSWORD", "from-env")
    assert store_config(tmp_path, "redis", "h:1").redis == "h:1,password=from-env"
    assert store_config(tmp_path, "sqlite", "h:1").redis == "h:1"  # never added for SQLite


def test_materialize_loads_the_snapshots_rows_online_in_chunks(feast_world, monkeypatch):
    import userrep.onlinestore
    import userrep.store

    _, store, ds, _, late = feast_world
    space = FeatureSpace.load(late.space_dir)
    direct = build_user_features(ds, late.as_of, space)
    slices = direct.schema.slices()
    users = [str(u) for u in direct.user_ids[::97]]
    rows = pd.Index(direct.user_ids).get_indexer(users)
    got = store.get_online_features(
        features=["user_history:history", "user_history:space_id", "user_profile:onboarding"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    history = np.hstack([direct.matrix[:, slices[g]] for g in direct.schema.history_groups()])[rows]
    assert got["space_id"] == [late.space_id] * len(users)  # the later snapshot, written last
    assert np.array_equal(np.array(got["history"], np.float32), history)
    assert np.array_equal(np.array(got["onboarding"], np.float32), direct.matrix[rows][:, slices["onboarding"]])
    # chunked writes: a chunk smaller than the snapshot gives the same rows
    monkeypatch.setattr(userrep.onlinestore, "ONLINE_CHUNK", 7)
    userrep.onlinestore.write_online(
        store, "user_history", userrep.store.offline_frames(direct, "chunked", late.as_of)[0]
    )
    again = store.get_online_features(
        features=["user_history:history", "user_history:space_id"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    assert again["space_id"] == ["chunked"] * len(users) and np.array_equal(
        np.array(again["history"], np.float32), history
    )


def test_the_training_set_joined_in_chunks_is_the_whole_join(feast_world, monkeypatch):
    import userrep.store

    _, store, ds, early, _ = feast_world
    space = FeatureSpace.load(early.space_dir)
    users = early.user_ids[::3]
    whole = training_set(store, early, space, users)
    monkeypatch.setattr(userrep.store, "TRAINING_CHUNK", 97)
    chunked = training_set(store, early, space, users)
    assert len(users) > 3 * 97 and list(chunked.user_ids) == list(users)
    assert np.array_equal(chunked.matrix, whole.matrix)
    assert np.array_equal(whole.matrix, build_user_features(ds, early.as_of, space, user_ids=users).matrix)


def test_history_rows_keep_recent_aligned_where_it_is_the_plays_matrix_itself():
    """Without a recency decay ``recent`` is ``plays``: converting a float64 csr shares its index
    arrays, and sorting them in place once scrambled ``recent``'s values across artists."""
    import scipy.sparse as sp

    from userrep.onlinestore import history_table

    plays = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    table = history_table(["a", "b"], ["x", "y", "z"], plays, plays, "b1", pd.Timestamp("2026-01-01", tz="UTC"))
    rows = table.to_pandas().set_index("user_id")
    assert list(rows.loc["a", "artists"]) == ["x", "z"] and list(rows.loc["a", "recent"]) == [2.0, 1.0]
    assert list(rows.loc["a", "plays"]) == list(rows.loc["a", "recent"])

"""Encoders and point-in-time user features: no leakage, named groups, batch == incremental."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_dataset
from userrep.data import load_dataset
from userrep.encoders import CollaborativeEncoder, ContentEncoder, ItemVectors, events_before
from userrep.features import FeatureConfig, FeatureSpace, fit_feature_space
from userrep.featurize import build_user_features
from userrep.state import FeatureState, apply_events, register_user, state_features, state_from_dataset

AS_OF = "2026-05-01T13:30:00Z"  # mid-day on purpose: windows include the part of as_of's day


@pytest.fixture(scope="module")
def world(small_world):
    return load_dataset(small_world)


@pytest.fixture(scope="module")
def space(world):
    return fit_feature_space(world, AS_OF)


@pytest.fixture(scope="module")
def features(world, space):
    return build_user_features(world, AS_OF, space)


def _with_event(ds, user_id: str, item_id: str, ts: pd.Timestamp):
    """The same dataset plus one heavy event."""
    planted = pa.table(
        {
            "user_id": [user_id],
            "item_id": [item_id],
            "ts": pa.array([ts], pa.timestamp("us", tz="UTC")),
            "weight": [500.0],
        }
    )
    return type(ds)(ds.path, pa.concat_tables([ds.events, planted]), ds.items, ds.users, ds.pairs)


def test_planted_future_event_changes_nothing(world, space, features):
    user = features.user_ids[0]
    item = world.items.column("item_id")[-1].as_py()
    leaky = _with_event(world, user, item, pd.Timestamp(AS_OF))  # at as_of: not before it
    assert np.array_equal(build_user_features(leaky, AS_OF, space).matrix, features.matrix)
    assert np.array_equal(CollaborativeEncoder().fit(leaky, AS_OF).vectors, space.encoder("collab").vectors)
    # The same event one microsecond earlier does change that user's features.
    earlier = _with_event(world, user, item, pd.Timestamp(AS_OF) - pd.Timedelta(microseconds=1))
    assert not np.array_equal(build_user_features(earlier, AS_OF, space, user_ids=[user]).matrix, features.matrix[:1])


def test_groups_are_named_and_sized(world, space, features):
    names = [name for name, _ in features.schema.groups]
    for w in ("7d", "30d", "180d", "all"):
        assert {f"collab_{w}", f"content_{w}", f"genres_{w}", f"activity_{w}"} <= set(names)
    assert names[-3:] == ["artists_all", "onboarding", "demographics"]
    # The most played artists, capped by the config (this world plays fewer than 256 of them).
    items = pd.Index(world.items.column("item_id").to_numpy(zero_copy_only=False))
    artists = world.items.column("artist_id").to_numpy(zero_copy_only=False)
    before = events_before(world, AS_OF).column("item_id").to_numpy(zero_copy_only=False)
    played = np.unique(artists[items.get_indexer(before)])
    assert (
        dict(features.schema.groups)["artists_all"]
        == len(space.top_artists)
        == min(FeatureConfig().top_artists, len(played))
    )
    assert features.matrix.shape == (1_500, features.schema.n_features)
    assert dict(features.schema.groups)["collab_7d"] == space.encoder("collab").dim
    assert np.isfinite(features.matrix).all()


def test_dropping_groups_by_kind_window_or_name(features):
    no_collab = features.without(["collab"])
    assert not any(n.startswith("collab") for n, _ in no_collab.schema.groups)
    no_week = features.without(["7d", "demographics"])
    assert all(not n.endswith("_7d") and n != "demographics" for n, _ in no_week.schema.groups)
    assert no_week.matrix.shape[1] == no_week.schema.n_features
    sl = features.schema.slices()["onboarding"]
    kept = no_week.matrix[:, no_week.schema.slices()["onboarding"]]
    assert np.array_equal(kept, features.matrix[:, sl])
    with pytest.raises(ValueError, match="unknown feature group"):
        features.without(["audio"])


def test_windows_nest_and_activity_is_sane(features):
    sl = features.schema.slices()
    m = features.matrix
    plays = {w: m[:, sl[f"activity_{w}"]][:, 0] for w in ("7d", "30d", "180d", "all")}
    assert (plays["7d"] <= plays["30d"] + 1e-6).all() and (plays["30d"] <= plays["180d"] + 1e-6).all()
    assert (plays["180d"] <= plays["all"] + 1e-6).all()
    has = m[:, sl["activity_180d"]][:, 3]
    assert set(np.unique(has)) <= {0.0, 1.0}
    # A user with no history in a window has an all-zero mean vector there.
    empty = m[:, sl["activity_7d"]][:, 3] == 0
    assert empty.any() and np.all(m[empty][:, sl["collab_7d"]] == 0)
    shares = m[:, sl["genres_180d"]].sum(axis=1)
    assert np.allclose(shares[has == 1], 1.0, atol=1e-4)  # every world item has genres
    top_artist_share = m[:, sl["artists_all"]].sum(axis=1)
    assert (top_artist_share <= 1 + 1e-5).all() and top_artist_share.max() > 0.5


def test_cold_user_has_only_static_features(world, space, features):
    users = world.users.to_pandas().set_index("user_id")
    cold = [
        u
        for u in features.user_ids
        if users.loc[u, "signup_ts"] > pd.Timestamp(AS_OF) and isinstance(users.loc[u, "onboarding_genres"], str)
    ]
    assert cold, "the world always has users who join after as_of"
    row = features.matrix[list(features.user_ids).index(cold[0])]
    sl = features.schema.slices()
    assert np.all(row[: sl["onboarding"].start] == 0)
    assert row[sl["onboarding"]][-1] == 1.0  # has_onboarding
    assert row[sl["demographics"]].sum() == 2.0  # one-hot country + age bucket


def test_incremental_state_equals_batch(world, space, features):
    """Applying each pre-as_of event one by one to an empty state reproduces the batch vectors."""
    users = world.users.to_pandas().set_index("user_id")
    chosen = list(features.user_ids[:25])
    events = world.events.to_pandas()
    events = events[(events["ts"] < pd.Timestamp(AS_OF)) & events["user_id"].isin(chosen)].sample(
        frac=1, random_state=0
    )
    state = FeatureState(space)
    for user_id in chosen:
        row = users.loc[user_id]
        register_user(
            state,
            user_id,
            str(row["onboarding_artists"] or "").split("|") if row["onboarding_artists"] else (),
            str(row["onboarding_genres"]).split("|") if row["onboarding_genres"] else (),
            {"country": row["country"], "age_bucket": row["age_bucket"]},
        )
    for k in range(len(events)):  # one event at a time, in shuffled order
        apply_events(state, events.iloc[k : k + 1])
    online = state_features(state, chosen, AS_OF).matrix
    np.testing.assert_allclose(online, features.matrix[: len(chosen)], rtol=1e-5, atol=1e-6)
    bulk = state_features(state_from_dataset(space, world, AS_OF), features.user_ids, AS_OF).matrix
    np.testing.assert_allclose(bulk, features.matrix, rtol=1e-5, atol=1e-6)


def test_state_streamed_from_the_directory_equals_the_state_from_the_loaded_dataset(
    world, space, features, monkeypatch
):
    from userrep import data as data_module

    monkeypatch.setattr(data_module, "EVENT_BATCH_ROWS", 1_000)  # serving start-up adds batch by batch
    assert world.events.num_rows > 10_000
    streamed = state_from_dataset(space, world.path, AS_OF)
    assert set(streamed.users) == set(state_from_dataset(space, world, AS_OF).users)
    np.testing.assert_allclose(
        state_features(streamed, features.user_ids, AS_OF).matrix, features.matrix, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("item_id", "nope", "item_id: unknown item"),
        ("weight", -1.0, "weight: must be a finite number >= 0"),
        ("weight", float("nan"), "weight: must be a finite number >= 0"),
        ("ts", "yesterday", "ts: unparseable"),
    ],
)
def test_state_rejects_bad_events_by_field_without_changing(space, column, value, message):
    state = FeatureState(space)
    event = {"user_id": "x", "item_id": space.item_ids[0], "ts": AS_OF, "weight": 1.0, column: value}
    with pytest.raises(ValueError, match=message):
        apply_events(state, pd.DataFrame([event]))
    assert state.users == {}


def test_state_prunes_buckets_beyond_longest_window_only_without_all_history(world, space):
    events = [
        pd.DataFrame({"user_id": ["x"], "item_id": [space.item_ids[0]], "ts": [ts]})
        for ts in ("2025-01-01T00:00:00Z", "2026-04-30T00:00:00Z")
    ]
    windowed = FeatureState(fit_feature_space(world, AS_OF, FeatureConfig(windows=(7, 30, 180))))
    everything = FeatureState(space)  # default windows include "all"
    for frame in events:
        apply_events(windowed, frame)
        apply_events(everything, frame)
    assert len(windowed.users["x"].day) == 1
    assert len(everything.users["x"].day) == 2


def test_space_save_load_round_trip(tmp_path, space, world, features):
    space.save(tmp_path / "space")
    from userrep.features import FeatureSpace

    loaded = FeatureSpace.load(tmp_path / "space")
    assert loaded.schema == space.schema and loaded.genres == space.genres
    assert np.array_equal(build_user_features(world, AS_OF, loaded).matrix, features.matrix)


def test_item_vectors_round_trip_and_artist_means(tmp_path, space, world):
    path = tmp_path / "collab.parquet"
    space.encoder("collab").save(path)
    loaded = ItemVectors.load(path)
    assert loaded.name == "collab" and np.array_equal(loaded.vectors, space.encoder("collab").vectors)
    artists, vectors = space.encoder("collab").artist_vectors(world.items)
    items = world.items.to_pandas()
    first = artists[0]
    rows = space.encoder("collab").lookup(items.loc[items["artist_id"] == first, "item_id"])
    np.testing.assert_allclose(vectors[0], space.encoder("collab").vectors[rows].mean(axis=0), rtol=1e-5)


def test_collaborative_vectors_group_items_by_genre(world, space):
    items = world.items.to_pandas()
    genre = items["genres"].str.split("|").str[0].to_numpy()
    x = space.encoder("collab").vectors / np.maximum(
        np.linalg.norm(space.encoder("collab").vectors, axis=1, keepdims=True), 1e-9
    )
    sample = np.arange(0, len(x), 7)
    sims = x[sample] @ x.T
    sims[np.arange(len(sample)), sample] = -np.inf
    agreement = (genre[sims.argmax(axis=1)] == genre[sample]).mean()
    assert agreement > 0.4  # measured ~0.6 on this world; chance ~0.08


def test_content_encoder_works_with_genres_only(tmp_path, tiny_tables):
    tiny_tables["items"] = tiny_tables["items"].drop(columns=["content_energy"])
    ds = load_dataset(write_dataset(tmp_path, **tiny_tables))
    vectors = ContentEncoder(dim=4).fit(ds).vectors
    assert vectors.shape == (3, 4) and np.abs(vectors).sum() > 0
    # t1 (rock|indie) is closer to t2 (rock) than to t3 (jazz).
    d = lambda a, b: np.linalg.norm(vectors[a] - vectors[b])  # noqa: E731
    assert d(0, 1) < d(0, 2)
    space = fit_feature_space(ds, "2026-02-01", FeatureConfig(collab_dim=2, content_dim=4))
    feats = build_user_features(ds, "2026-02-01", space)
    assert list(feats.user_ids) == ["u1", "u2", "u3", "u4"]


@pytest.mark.parametrize("partitions", [1, 7])
def test_partitioned_snapshot_equals_the_in_memory_encoders_and_features(tmp_path, world, space, features, partitions):
    from userrep.partitions import partitioned_snapshot, user_partition

    # the dataset directory streamed into partitions (never held) vs fit + build on the loaded dataset
    got_space, got = partitioned_snapshot(
        world.path, AS_OF, FeatureConfig(), tmp_path / "space", tmp_path / "work", partitions=partitions
    )
    assert np.array_equal(
        got_space.encoder("collab").vectors, space.encoder("collab").vectors
    )  # the same user x item matrix
    assert np.array_equal(got_space.top_artists, space.top_artists)
    assert np.array_equal(
        FeatureSpace.load(tmp_path / "space").encoder("collab").vectors, space.encoder("collab").vectors
    )
    assert list(got.user_ids) == list(features.user_ids)
    assert np.array_equal(got.matrix, features.matrix)  # bit for bit, not within a tolerance
    # every event of a user lies in that user's one partition, and only events before as_of
    events = [pq.read_table(p) for p in sorted((tmp_path / "work" / "events").glob("part-*.parquet"))]
    assert len(events) == partitions
    for p, table in enumerate(events):
        assert (user_partition(table.column("user_id"), partitions) == p).all()
    assert sum(t.num_rows for t in events) == events_before(world, AS_OF).num_rows


def test_user_partition_is_stable_across_processes():
    import subprocess
    import sys

    from userrep.partitions import user_partition

    ids = [f"user-{i}" for i in range(50)]
    here = user_partition(ids, 8).tolist()
    code = f"from userrep.partitions import user_partition; print(user_partition({ids!r}, 8).tolist())"
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert there.strip() == str(here) and len(set(here)) > 4

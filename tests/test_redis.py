"""The Redis profile against a real redis-server started by the test on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest

from userrep.backfill import embeddings_table
from userrep.batchrows import publish_embeddings, unpublish_batch
from userrep.data import load_dataset
from userrep.features import FeatureSpace
from userrep.onlinestore import online_embeddings
from userrep.store import StoreConfig, materialize, open_store

pytestmark = pytest.mark.slow


def test_redis_profile_materializes_and_serves_batches(redis_server, small_world, tmp_path):
    import redis

    config = StoreConfig(home=tmp_path / "feast", online="redis", redis=redis_server)
    store = open_store(config)
    snapshot = materialize(load_dataset(small_world), "2026-04-01", config, store=store)
    host, port = redis_server.split(":")
    assert redis.Redis(host=host, port=int(port)).dbsize() >= len(snapshot.user_ids)  # rows really in Redis
    online = store.get_online_features(
        features=["user_history:history", "user_history:space_id"], entity_rows=[{"user_id": str(snapshot.user_ids[0])}]
    ).to_dict()
    space = FeatureSpace.load(snapshot.space_dir)
    n_history = sum(size for name, size in space.schema.groups if name in space.schema.history_groups())
    assert online["space_id"] == [snapshot.space_id] and len(online["history"][0]) == n_history
    users = [str(u) for u in snapshot.user_ids[:30]]
    a, b = (np.random.default_rng(i).normal(size=(30, 4)).astype(np.float32) for i in (1, 2))
    publish_embeddings(store, config, embeddings_table(users, a, "ra"), "ra", "2026-04-01")
    publish_embeddings(store, config, embeddings_table(users, b, "rb"), "rb", "2026-04-01")
    got_a, found_a = online_embeddings(store, users, "ra")
    got_b, found_b = online_embeddings(store, users, "rb")
    assert found_a.all() and found_b.all()
    assert np.array_equal(got_a, a) and np.array_equal(got_b, b)
    # a batch's rows go (prune, erasure), the other batch's stay
    unpublish_batch(store, config, "ra", users[:10])
    assert not online_embeddings(store, users[:10], "ra")[1].any()
    assert online_embeddings(store, users[10:], "ra")[1].all() and online_embeddings(store, users, "rb")[1].all()

"""Ray Train and Ray Data smoke tests on tiny data: the distributed paths give what the local ones give."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from userrep.backfill import backfill_embeddings, read_embeddings
from userrep.data import load_dataset
from userrep.features import build_user_features, fit_feature_space
from userrep.model import AEConfig, UserAutoencoder, embed
from userrep.raylocal import ray_session
from userrep.train import fit_autoencoder

pytestmark = pytest.mark.slow
AS_OF = "2026-06-30"


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(num_cpus=2) as ray:  # private local Ray, shut down by this fixture only
        yield ray


@pytest.fixture(scope="module")
def tiny_features(small_world):
    ds = load_dataset(small_world)
    features = build_user_features(ds, AS_OF, fit_feature_space(ds, AS_OF))
    return type(features)(features.user_ids[:400], features.matrix[:400], features.schema)


def test_ray_train_two_workers(ray_cluster, tiny_features, tmp_path):
    result = fit_autoencoder(tiny_features, AEConfig(epochs=3, batch_size=64), workers=2,
                             checkpoint_dir=tmp_path / "checkpoints")
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert result.losses[-1] < result.losses[0]
    assert len(list((tmp_path / "checkpoints").glob("epoch_*.pt"))) == 3
    assert embed(result.model, tiny_features.matrix).shape == (400, 64)


def test_ray_data_backfill_equals_in_process(ray_cluster, tiny_features, tmp_path):
    model = fit_autoencoder(tiny_features, AEConfig(epochs=1)).model
    model.save(tmp_path / "model.pt")
    local = backfill_embeddings(tmp_path / "model.pt", tiny_features, "b-test", tmp_path / "local.parquet")
    distributed = backfill_embeddings(tmp_path / "model.pt", tiny_features, "b-test", tmp_path / "ray.parquet",
                                      workers=2, batch_size=128)
    assert local == distributed == 400
    ids_local, emb_local, batch_local = read_embeddings(tmp_path / "local.parquet")
    ids_ray, emb_ray, batch_ray = read_embeddings(tmp_path / "ray.parquet")
    assert batch_local == batch_ray == "b-test"
    order = np.argsort(ids_ray)
    assert list(ids_ray[order]) == sorted(ids_local)
    np.testing.assert_allclose(emb_ray[order], emb_local[np.argsort(ids_local)], rtol=1e-5, atol=1e-6)
    assert pq.read_schema(tmp_path / "ray.parquet").field("embedding").type.value_type.bit_width == 32
    assert UserAutoencoder.load(tmp_path / "model.pt").config.latent == 64

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


def test_one_ray_worker_fits_the_model_the_in_process_loop_fits(ray_cluster, tiny_features, tmp_path):
    config = AEConfig(epochs=2, batch_size=64)
    local = fit_autoencoder(tiny_features, config)
    distributed = fit_autoencoder(tiny_features, config, workers=1, checkpoint_dir=tmp_path / "checkpoints")
    np.testing.assert_allclose(distributed.losses, local.losses, rtol=1e-4)  # the same batches, the same noise
    np.testing.assert_allclose(embed(distributed.model, tiny_features.matrix), embed(local.model, tiny_features.matrix),
                               rtol=1e-3, atol=1e-4)
    assert not (tmp_path / "checkpoints" / "matrix.npy").exists()  # the workers' input is removed after the fit


def test_a_killed_ray_train_worker_resumes_from_the_last_checkpoint(ray_cluster, tiny_features, tmp_path):
    import os
    import signal
    import threading
    import time

    import psutil

    checkpoints, epochs = tmp_path / "checkpoints", 400
    outcome = {}

    def fit() -> None:
        try:
            outcome["result"] = fit_autoencoder(tiny_features, AEConfig(epochs=epochs, batch_size=64), workers=2,
                                                checkpoint_dir=checkpoints)
        except Exception as exc:  # noqa: BLE001 (asserted below)
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 300
    while not (checkpoints / "epoch_0005.pt").exists():
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    # Only this test's own Ray processes are candidates: descendants of this process.
    workers = [p for p in psutil.Process(os.getpid()).children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_after = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt"))
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert len(result.losses) == epochs and all(np.isfinite(result.losses))
    assert len(result.starts) == 2 and result.starts[0] == 0  # started once, restarted once
    assert 5 <= killed_after <= result.starts[1] < epochs  # from a checkpoint written before the kill, not from 0


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

"""Ray Train and Ray Data smoke tests on tiny data: the distributed paths give what the local ones give."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from userrep.backfill import backfill_embeddings, read_embeddings
from userrep.data import load_dataset
from userrep.features import FeatureConfig, fit_feature_space
from userrep.featurize import build_user_features
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


def test_ray_train_two_workers_with_local_sgd(ray_cluster, tiny_features, tmp_path):
    """Two workers averaging their parameters every 3 steps (two workers with DDP: the kill-resume
    and two-node tests below)."""
    config = AEConfig(epochs=3, batch_size=64, average_every=3)
    result = fit_autoencoder(tiny_features, config, workers=2, checkpoint_dir=tmp_path / "checkpoints")
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert result.losses[-1] < result.losses[0]
    assert len(list((tmp_path / "checkpoints").glob("epoch_*.pt"))) == 3
    assert embed(result.model, tiny_features.matrix).shape == (400, 64)
    # about the model one process trains (average_every does not apply in-process)
    local = fit_autoencoder(tiny_features, config)
    assert result.losses[-1] == pytest.approx(local.losses[-1], rel=0.05)


def test_one_ray_worker_fits_the_model_the_in_process_loop_fits(ray_cluster, tiny_features, tmp_path):
    config = AEConfig(epochs=2, batch_size=64)
    local = fit_autoencoder(tiny_features, config)
    distributed = fit_autoencoder(tiny_features, config, workers=1, checkpoint_dir=tmp_path / "checkpoints")
    np.testing.assert_allclose(distributed.losses, local.losses, rtol=1e-4)  # the same batches, the same noise
    np.testing.assert_allclose(
        embed(distributed.model, tiny_features.matrix), embed(local.model, tiny_features.matrix), rtol=1e-3, atol=1e-4
    )
    assert not (tmp_path / "checkpoints" / "matrix.npy").exists()  # the workers' input is removed after the fit


def test_a_killed_ray_train_worker_resumes_from_the_last_checkpoint(ray_cluster, tiny_features, tmp_path):
    import os
    import signal
    import threading
    import time

    import psutil

    # the kill lands 5 epochs in, well before the end (an epoch of 400 users takes well under a second)
    checkpoints, epochs = tmp_path / "checkpoints", 16
    outcome = {}

    def fit() -> None:
        try:
            outcome["result"] = fit_autoencoder(
                tiny_features, AEConfig(epochs=epochs, batch_size=64), workers=2, checkpoint_dir=checkpoints
            )
        except Exception as exc:  # noqa: BLE001 (asserted below)
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 300
    while not (checkpoints / "epoch_0005.pt").exists():
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    # Only this test's own Ray processes are candidates: descendants of this process.
    workers = [
        p for p in psutil.Process(os.getpid()).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_after = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("epoch_*.pt"))
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert len(result.losses) == epochs and all(np.isfinite(result.losses))
    assert len(result.starts) == 2 and result.starts[0] == 0  # started once, restarted once
    assert 5 <= killed_after <= result.starts[1] < epochs  # from a checkpoint written before the kill, not from 0


TWO_NODE_DRIVER = """
import sys, numpy as np
from userrep.data import load_dataset
from userrep.features import FeatureConfig, fit_feature_space
from userrep.featurize import build_user_features
from userrep.model import AEConfig, embed
from userrep.raylocal import ray_session
from userrep.train import fit_autoencoder
world, address, out, as_of = sys.argv[1:5]
ds = load_dataset(world)
features = build_user_features(ds, as_of, fit_feature_space(ds, as_of))
features = type(features)(features.user_ids[:400], features.matrix[:400], features.schema)
with ray_session(address=address) as ray:
    import time
    deadline = time.monotonic() + 120
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        assert time.monotonic() < deadline, "the second node never joined"
        time.sleep(0.5)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    fit = fit_autoencoder(features, AEConfig(epochs=3, batch_size=64), workers=2, checkpoint_dir=out + "/checkpoints")
np.savez(out + "/fit.npz", losses=np.array(fit.losses), embeddings=embed(fit.model, features.matrix),
         nodes=len(nodes), cpus=ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 2)
"""


def test_the_fit_runs_on_a_two_node_ray_cluster_like_in_process(small_world, tiny_features, tmp_path):
    """A head and a second node as separate `ray start` processes (1 CPU each, so the two
    workers land one per node); the driver connects by address, as on a cluster."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from serving.smoke import free_port

    ray_bin = str(Path(sys.executable).parent / "ray")
    port, env = free_port(), {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    temp = tempfile.mkdtemp(prefix="ur-ray-")  # short: Ray's unix socket paths must stay under 108 bytes
    started = [
        subprocess.Popen(
            [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *common],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "head.log", "w"),
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS answers before a node or a driver joins it
            assert started[0].poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head never came up"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        started.append(
            subprocess.Popen(
                [ray_bin, "start", f"--address=127.0.0.1:{port}", *common],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "node.log", "w"),
            )
        )
        driver = subprocess.run(
            [sys.executable, "-c", TWO_NODE_DRIVER, str(small_world), f"127.0.0.1:{port}", str(tmp_path), AS_OF],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert driver.returncode == 0, driver.stderr[-3000:]
    finally:  # the processes this test started, by process group (a SIGTERM drains for 30 s)
        for proc in started:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)
    got = np.load(tmp_path / "fit.npz")
    assert int(got["nodes"]) == 2
    local = fit_autoencoder(tiny_features, AEConfig(epochs=3, batch_size=64))
    # the same rows in every step (one permutation dealt over the ranks); only the corruption
    # noise is drawn per rank, so the two fits agree closely but not bit for bit
    np.testing.assert_allclose(got["losses"], local.losses, rtol=0.05)
    mine = embed(local.model, tiny_features.matrix)
    cosine = (
        (got["embeddings"] * mine).sum(1) / np.linalg.norm(got["embeddings"], axis=1) / np.linalg.norm(mine, axis=1)
    )
    assert np.median(cosine) > 0.9, np.percentile(cosine, [5, 50, 95])


def test_ray_data_backfill_equals_in_process(ray_cluster, tiny_features, tmp_path):
    model = fit_autoencoder(tiny_features, AEConfig(epochs=1)).model
    model.save(tmp_path / "model.pt")
    local = backfill_embeddings(tmp_path / "model.pt", tiny_features, "b-test", tmp_path / "local.parquet")
    distributed = backfill_embeddings(
        tmp_path / "model.pt", tiny_features, "b-test", tmp_path / "ray.parquet", workers=2, batch_size=128
    )
    assert local == distributed == 400
    ids_local, emb_local, batch_local = read_embeddings(tmp_path / "local.parquet")
    ids_ray, emb_ray, batch_ray = read_embeddings(tmp_path / "ray.parquet")
    assert batch_local == batch_ray == "b-test"
    order = np.argsort(ids_ray)
    assert list(ids_ray[order]) == sorted(ids_local)
    np.testing.assert_allclose(emb_ray[order], emb_local[np.argsort(ids_local)], rtol=1e-5, atol=1e-6)
    assert pq.read_schema(tmp_path / "ray.parquet").field("embedding").type.value_type.bit_width == 32
    assert UserAutoencoder.load(tmp_path / "model.pt").config.latent == 64


def test_features_from_ray_data_partition_tasks_equal_the_in_memory_features_on_the_default_world(
    ray_cluster, tmp_path
):
    from userrep.batch.build import default_as_of
    from userrep.partitions import partition_count, partitioned_snapshot
    from userrep.world import WorldConfig, generate_world

    generate_world(WorldConfig(), tmp_path / "world", progress=False)  # the demo's world
    ds = load_dataset(tmp_path / "world")
    as_of = default_as_of(ds)
    space = fit_feature_space(ds, as_of)
    expected = build_user_features(ds, as_of, space)
    partitions = partition_count(ds.events.num_rows) + 1  # more partitions than workers
    got_space, got = partitioned_snapshot(
        tmp_path / "world",
        as_of,
        FeatureConfig(),
        tmp_path / "space",
        tmp_path / "work",
        partitions=partitions,
        workers=2,
    )
    assert np.array_equal(got_space.encoder("collab").vectors, space.encoder("collab").vectors)
    assert partitions >= 3 and len(expected.user_ids) == WorldConfig().users
    assert list(got.user_ids) == list(expected.user_ids)
    assert np.array_equal(got.matrix, expected.matrix)

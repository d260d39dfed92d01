"""Start (and stop) Ray for a job: an existing cluster when one is named, else a private local one.

A local instance gets its own short temp dir (unix socket paths must stay < 108 bytes) and is
stopped with ``ray.shutdown()``, which ends only the processes this driver started — never
``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

# Set before Ray is imported anywhere in the process: no telemetry, no auth token files in ~/.ray.
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_session(num_cpus: int | None = None, address: str | None = None, progress: bool = False):
    """Yield with Ray initialized; shut down afterwards only what this call started."""
    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        yield ray
        return
    temp_dir = None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        temp_dir = tempfile.mkdtemp(prefix="ur-ray-")
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    if not progress:  # the driver's per-dataset INFO lines drown the job's own output
        logging.getLogger("ray").setLevel(logging.WARNING)
    DataContext.get_current().enable_progress_bars = progress
    DataContext.get_current().execution_options.preserve_order = True  # reproducible output files
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def cpus_per_worker(workers: int) -> float:
    """Half the cluster's CPUs go to training workers, the rest stay free for Ray Data.

    With the default 1 CPU per worker, 2 workers on a 2-CPU box starve Ray Data forever
    (Ray Data reports the operator as backpressured:tasks(ResourceBudget) and never runs it).
    """
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.1, min(1.0, total / (2 * workers)))


def train_cpus_per_worker(workers: int) -> float:
    """CPUs per Ray Train worker of the autoencoder fit: the whole cluster split evenly (the fit
    reads memory-mapped shards, so no Ray Data runs beside it); whole CPUs from one up, since Ray
    sets each worker's torch threads to its CPU count."""
    import ray

    share = ray.cluster_resources().get("CPU", 1.0) / workers
    return float(int(share)) if share >= 1 else max(0.1, share)

"""How many CPU threads one process's numeric libraries (torch, BLAS, OpenMP) may use.

Each library starts one thread per core it sees. Two such processes side by side on the same
cores (the pipeline's downstream steps run in parallel; on a cluster a pod's CPU limit is below
the node's core count) spin against each other: two 20k-user task models trained side by side
on 2 cores took 202 s and 220 s with 2 threads each, 33 s and 45 s with 1 (bench/downstream_threads.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """At most ``threads`` threads for torch and the BLAS/OpenMP pools inside (None: no limit)."""
    if not threads:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)

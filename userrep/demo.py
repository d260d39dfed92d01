"""The demo's lifecycle on the embedded default, without any printing (``userrep demo`` prints it).

WORK/world     the synthetic world (regenerated only when its settings change)
WORK/batches   batch 1 (as of ``later_days`` before the data's end) and batch 2 (the end), each
               through the training pipeline; a batch already through it is not rerun
WORK/feast, WORK/kfp, WORK/logs   the Feast home, kfp.local's run artifacts, the pipeline logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from userrep.batch.layout import BatchDir, manifest_path, read_manifest
from userrep.batch.spec import BatchSpec


@dataclass(frozen=True)
class DemoSettings:
    # 10k users: `make demo` in about 6-7 min on 2 cores (README); the docs' measurements use --users 20000
    users: int = 10_000
    seed: int = 0
    workers: int = BatchSpec.workers
    epochs: int = BatchSpec.epochs
    later_days: int = 30  # batch 2 sees this many more days of data than batch 1


@dataclass(frozen=True)
class DemoBatch:
    label: str
    as_of: pd.Timestamp
    batch_id: str
    spec: BatchSpec  # what the training pipeline gets
    done: str | None  # its state when it already ran through the pipeline (serving, previous, rejected)


def ensure_world(work: Path, settings: DemoSettings) -> dict | None:
    """Generate the world unless the one in WORK/world has these settings; its counts, or None."""
    from userrep.world import WorldConfig, generate_world, world_is_current

    config = WorldConfig(users=settings.users, seed=settings.seed)
    return None if world_is_current(config, work / "world") else generate_world(config, work / "world")


def plan_batches(work: Path, settings: DemoSettings) -> list[DemoBatch]:
    """The two batches with the ids the pipeline will give them (deterministic), and whether each
    already went through it."""
    from userrep.batch.build import dataset_as_of
    from userrep.batch.registry import state

    world, root = work / "world", work / "batches"
    end = dataset_as_of(world)
    planned = []
    for label, as_of in (("batch 1", end - pd.Timedelta(days=settings.later_days)), ("batch 2 on later data", end)):
        spec = BatchSpec(
            data=str(world),
            batch_root=str(root),
            as_of=as_of.isoformat(),
            feast_home=str(work / "feast"),
            epochs=settings.epochs,
            workers=settings.workers,
            seed=settings.seed,
        )
        _, batch_id, _ = spec.batch_dir_and_id()
        done = state(root, batch_id) if manifest_path(root / batch_id).exists() else None
        done = done if done in ("serving", "previous", "rejected") else None
        planned.append(DemoBatch(label, as_of, batch_id, spec, done))
    return planned


def smoke_inputs(work: Path) -> tuple[list[str], list[str], str]:
    """What the serving smoke sends: a newcomer's two onboarding artists (the most popular
    candidates), five tracks of a mid-popularity artist they did not pick, and the serving batch's
    as_of. Raises ValueError when no batch is serving (the gate rejected batch 1)."""
    import pyarrow.compute as pc

    from userrep.batch.heads import load_head
    from userrep.batch.registry import batch_dir, serving_batch
    from userrep.data import artist_column, load_dataset

    root = work / "batches"
    serving_id = serving_batch(root)
    if serving_id is None:
        raise ValueError(f"batch_root: no batch is serving under {root}")
    serving = batch_dir(root, serving_id)
    _, meta = load_head(BatchDir(serving).head("future_listening"))
    artists = meta["artists"]
    items = load_dataset(work / "world").items
    listened = artists[min(50, len(artists) - 1)]
    tracks = items.filter(pc.equal(items.column(artist_column(items)), listened)).column("item_id").to_pylist()[:5]
    return artists[:2], tracks, read_manifest(serving)["as_of"]

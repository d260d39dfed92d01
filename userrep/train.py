"""Fit the autoencoder: one training loop for one process or N Ray Train workers.

    userrep train --data work/world --out runs/b1               # plain torch, in-process
    userrep train --data work/world --out runs/b1 --workers 2   # Ray Train TorchTrainer, local Ray
    RAY_ADDRESS=... userrep train ... --workers 8               # the same on a Ray cluster

``train_loop_per_worker`` is the loop in every mode: under Ray it wraps the model in DDP and reads
its rows of the feature matrix memory-mapped from the checkpoint directory; in-process it
batches the array itself. Each epoch's row order is one permutation shared by all ranks, so one
Ray worker sees exactly the batches of the in-process loop. Rank 0 writes a checkpoint after
every epoch (write-then-rename); the loop always starts from the newest checkpoint in its
directory, which is how ``--resume`` and Ray's worker restarts continue. On a cluster the
checkpoint directory must be shared storage.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from userrep.features import FeatureSchema, UserFeatures
from userrep.model import AEConfig, UserAutoencoder, standardization


@dataclass(frozen=True)
class FitResult:
    model: UserAutoencoder
    losses: tuple[float, ...]  # mean training loss per epoch
    resumed_from_epoch: int
    starts: tuple[int, ...] = (0,)  # the epoch each (re)start of the loop began at (a restarted Ray worker adds one)


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    if not directory or not Path(directory).is_dir():
        return None
    found = sorted(Path(directory).glob("epoch_*.pt"))
    return found[-1] if found else None


def _save_checkpoint(
    directory: Path, epoch: int, model: UserAutoencoder, optimizer, losses: list[float], starts: list[int]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"epoch_{epoch:04d}.pt"
    tmp = final.with_suffix(".tmp")
    torch.save(
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "losses": losses,
            "starts": starts,
        },
        tmp,
    )
    os.replace(tmp, final)  # a reader never sees a half-written checkpoint


def _build_model(config: dict) -> UserAutoencoder:
    schema = FeatureSchema(tuple(tuple(g) for g in config["schema"]))
    return UserAutoencoder(schema, np.asarray(config["mean"]), np.asarray(config["std"]), AEConfig(**config["ae"]))


def _epoch_rows(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows for one epoch: one permutation shared by every rank (same seed), dealt
    round-robin and cut to ``n // world`` rows each, so every rank takes the same number of steps
    (DDP all-reduces at each one) and each epoch leaves out a different ``n % world`` rows."""
    # seeded apart from the corruption-noise generator (seed * 1_000_003 + epoch * 101 + rank), so
    # the row order and rank 0's noise are not drawn from the same stream
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 999_983 + epoch * 7_919 + 17))
    return order[rank::world][: n // world]


def _batches(matrix: np.ndarray, rows: torch.Tensor, batch_size: int, previous: np.ndarray | None = None):
    """(raw rows, their previous embeddings or None) batches of ``matrix`` (an array, or a
    memory-mapped .npy: only the rows taken are read)."""
    for start in range(0, len(rows), batch_size):
        taken = rows[start : start + batch_size].numpy()
        yield (
            torch.from_numpy(np.ascontiguousarray(matrix[taken])),
            None if previous is None else torch.from_numpy(np.ascontiguousarray(previous[taken])),
        )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (the trained model comes back through the checkpoints)."""
    _train(config)


def _average(parameters) -> None:
    """Average the parameters across the default process group (local SGD)."""
    average_parameters(parameters, None)  # type: ignore[arg-type]  # None: the default group; torch's hint omits it


def _train(config: dict) -> tuple[UserAutoencoder, list[float], list[int]]:
    """The training loop, identical for the in-process path and each Ray Train worker."""
    under_ray = config.get("matrix") is None
    rank, world, local_sgd = 0, 1, False
    torch.manual_seed(config["ae"]["seed"])  # initial weights (DDP then broadcasts rank 0's anyway)
    core = _build_model(config)
    anchor = None  # a continued fit: the starting encoder, frozen, its embeddings held (``AEConfig.stability_weight``)
    if config.get("init_state") is not None:
        core.load_state_dict(config["init_state"])
        if core.config.stability_weight:
            anchor = copy.deepcopy(core.encoder).eval().requires_grad_(False)
    model: torch.nn.Module = core  # DDP's wrapper when distributed
    ae: AEConfig = core.config
    optimizer = torch.optim.AdamW(core.parameters(), lr=ae.lr, weight_decay=ae.weight_decay)
    checkpoint_dir = Path(config["checkpoint_dir"]) if config.get("checkpoint_dir") else None
    start_epoch, losses, starts = 0, [], []
    found = latest_checkpoint(checkpoint_dir)
    if found:
        blob = torch.load(found, map_location="cpu", weights_only=False)
        core.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        start_epoch, losses, starts = blob["epoch"], list(blob["losses"]), list(blob.get("starts", []))
    starts.append(start_epoch)  # the epochs this fit (re)started at: a worker restart shows here
    if under_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        local_sgd = world > 1 and ae.average_every > 1
        if local_sgd:  # parameters averaged every k steps instead of gradients every step
            _average(core.parameters())  # every rank starts from the same weights
        else:
            # DDP: gradients averaged across workers. The model's buffers (standardization, group
            # index) are constants, synced once at wrap time: DDP's default re-broadcast before
            # every forward was a second collective a step (0.49x -> 0.7x of in-process, docs/model.md).
            model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"forward_sync_buffers": False})
        matrix = np.load(config["matrix_path"], mmap_mode="r")  # shared storage, as the checkpoints
        previous = np.load(config["previous_path"], mmap_mode="r") if config.get("previous_path") else None
    else:
        matrix, previous = config["matrix"], config.get("previous")
    progress = config.get("progress") if rank == 0 else None
    for epoch in range(start_epoch, ae.epochs):
        generator = torch.Generator().manual_seed(ae.seed * 1_000_003 + epoch * 101 + rank)  # corruption noise
        # each rank takes batch_size / world rows a step: the global batch, and so the number of
        # optimizer steps an epoch, is the in-process loop's whatever the worker count
        batches = _batches(
            matrix, _epoch_rows(len(matrix), ae.seed, epoch, rank, world), max(1, ae.batch_size // world), previous
        )
        model.train()
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, rows), all-reduced across workers
        for step, (raw, held) in enumerate(batches, start=1):
            loss = core.loss(
                raw, generator, forward=model, anchor=anchor, previous=held
            )  # through DDP when distributed
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(raw), len(raw)], dtype=torch.float64)
            if local_sgd and step % ae.average_every == 0:
                _average(core.parameters())
        if local_sgd:  # the checkpoint holds the workers' common model
            _average(core.parameters())
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total[0]) / max(float(total[1]), 1.0))
        if rank == 0 and checkpoint_dir:
            _save_checkpoint(checkpoint_dir, epoch + 1, core, optimizer, losses, starts)
        # No ray.train.report per epoch: in Ray Train 2.60 it is a barrier across the workers
        # that took 1.1 s a call here, longer than an epoch (docs/model.md, fit throughput).
        if progress:
            progress(epoch + 1, ae.epochs, losses[-1])
    return core.eval(), losses, starts


def fit_autoencoder(
    features: UserFeatures,
    ae: AEConfig = AEConfig(),
    workers: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress=None,
    init: UserAutoencoder | None = None,
    previous: np.ndarray | None = None,
) -> FitResult:
    """Train on ``features``. ``workers=0``: plain torch here; ``workers>=1``: Ray Train workers.

    ``init``: a model to start from (its weights and standardization; ``userrep.continuity``
    builds it from the anchor batch), which with ``ae.stability_weight`` also holds the embeddings
    near its own; ``previous``: (users, latent) each row's embedding in the anchor batch (NaN: none).
    Without ``resume`` an existing checkpoint directory is cleared first.
    """
    # Absolute: Ray Train workers run in their own working directory.
    checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else None
    if checkpoint_dir and not resume:
        for stale in Path(checkpoint_dir).glob("epoch_*.pt"):
            stale.unlink()
    if workers and not checkpoint_dir:
        raise ValueError("checkpoint_dir is required with workers >= 1 (the model comes back through it)")
    resumed = latest_checkpoint(checkpoint_dir)
    resumed_epoch = int(resumed.stem.split("_")[1]) if resumed else 0
    matrix = np.ascontiguousarray(features.matrix, dtype=np.float32)
    mean, std = (init.mean.numpy(), init.std.numpy()) if init is not None else standardization(matrix)
    config = {
        "schema": [list(g) for g in features.schema.groups],
        "mean": mean.tolist(),
        "std": std.tolist(),
        "ae": asdict(ae),
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        "init_state": None if init is None else init.state_dict(),
    }
    if previous is not None:
        previous = np.ascontiguousarray(previous, dtype=np.float32)
    if workers == 0:
        model, losses, starts = _train({**config, "matrix": matrix, "previous": previous, "progress": progress})
        return FitResult(model, tuple(losses), resumed_epoch, tuple(starts))
    assert checkpoint_dir is not None  # checked above: workers need one
    _fit_with_ray(matrix, previous, config, workers, checkpoint_dir)
    final = latest_checkpoint(checkpoint_dir)
    if final is None or int(final.stem.split("_")[1]) != ae.epochs:
        raise RuntimeError(f"Ray training finished without the epoch {ae.epochs} checkpoint in {checkpoint_dir}")
    blob = torch.load(final, weights_only=False)
    model = _build_model(config)
    model.load_state_dict(blob["model"])
    return FitResult(model.eval(), tuple(blob["losses"]), resumed_epoch, tuple(blob["starts"]))


def _fit_with_ray(
    matrix: np.ndarray, previous: np.ndarray | None, config: dict, workers: int, checkpoint_dir: Path
) -> None:
    """Ray Train workers read the matrix memory-mapped from ``checkpoint_dir`` (shared storage on
    a cluster): a Ray Data dataset started a streaming execution every epoch, about 0.25 s of
    each (docs/model.md). A worker that dies is restarted once and resumes from the newest
    checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from userrep.raylocal import train_cpus_per_worker

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    matrix_path, previous_path = checkpoint_dir / "matrix.npy", checkpoint_dir / "previous.npy"
    for path, array in ((matrix_path, matrix), (previous_path, previous)):
        if array is not None:
            with open(path.with_suffix(".tmp"), "wb") as out:
                np.save(out, array)
            os.replace(path.with_suffix(".tmp"), path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **config,
            "matrix_path": str(matrix_path),
            "previous_path": str(previous_path) if previous is not None else None,
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": train_cpus_per_worker(workers)}),
        run_config=RunConfig(
            name="autoencoder",
            storage_path=str(checkpoint_dir.parent / "ray_results"),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    try:
        trainer.fit()
    finally:
        matrix_path.unlink(missing_ok=True)
        previous_path.unlink(missing_ok=True)

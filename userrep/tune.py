"""Model selection per dataset, without test labels: Ray Tune with ASHA over a small space.

    userrep tune --data DIR --out DIR/tuned      # writes tuned.json
    userrep evaluate --data DIR --out OUT --tune # tunes first, then evaluates with the choice
    userrep train --data DIR --out BATCH --tuned DIR/tuned/tuned.json

Validation: the evaluation's split is made first and only its *history* is used; that history is
split again the same way (``auto``), so every score comes from events before the evaluation's
cutoff and no label-window event of any user is read. Each trial fits the autoencoder on the
inner history, then a future-listening head on the inner head-training users, and reports nDCG@10
on the inner validation users after 5, 10 and 20 epochs; ASHA stops the weaker half at each rung.
The score is the embedding-only head's: the representation is what is being chosen.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from userrep.data import load_dataset

log = logging.getLogger(__name__)

# The space: what moved validation scores in docs/evaluation.md, a few values each.
SPACE = {
    "latent": (32, 64, 128),
    "share_weight": (8.0, 32.0, 128.0),
    "group_drop_rate": (0.05, 0.1, 0.2),
    "history_drop_rate": (0.1, 0.25, 0.4),
    "hidden": (128, 256, 512),  # the head's
    "weight_decay": (1e-5, 1e-4, 1e-3),  # the head's
}
RUNGS = (5, 10, 20)  # autoencoder epochs at which a trial reports (ASHA's rungs)


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 12
    budget_s: float = 180.0  # no trial starts after this; running ones finish: ~5 min in all on 20k users
    cpus: int = 2
    seed: int = 0


def tuned_configs(tuned: dict):
    """(AEConfig, HeadConfig) overrides from a tuned.json record."""
    from userrep.model import AEConfig
    from userrep.tasks._mlp import HeadConfig

    best = tuned["best"]
    ae = AEConfig(
        latent=best["latent"],
        share_weight=best["share_weight"],
        group_drop_rate=best["group_drop_rate"],
        history_drop_rate=best["history_drop_rate"],
        epochs=best["epochs"],
    )
    return ae, HeadConfig(hidden=best["hidden"], weight_decay=best["weight_decay"])


def tuned_settings(path: str | Path, seed: int):
    """(AEConfig, HeadConfig, choice) of a batch built with the tuned.json at ``path``; the choice
    (the file and the best trial) goes into the batch manifest."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tuned: {path}: no such file (write it with `userrep tune` or the pipeline's tune step)")
    record = json.loads(path.read_text())
    ae, head = tuned_configs(record)
    return replace(ae, seed=seed), replace(head, seed=seed), {"from": str(path), **record["best"]}


def _defaults() -> dict:
    """The untuned settings, as a point of ``SPACE``."""
    from userrep.model import AEConfig
    from userrep.tasks._mlp import HeadConfig

    ae, head = AEConfig(), HeadConfig()
    return {
        "latent": ae.latent,
        "share_weight": ae.share_weight,
        "group_drop_rate": ae.group_drop_rate,
        "history_drop_rate": ae.history_drop_rate,
        "hidden": head.hidden,
        "weight_decay": head.weight_decay,
    }


def _trial(params: dict, data: dict) -> None:
    """One Tune trial: fit the autoencoder rung by rung (resuming its checkpoint), report validation nDCG@10."""
    import tempfile

    import torch
    from ray import tune

    from userrep.metrics import ndcg_at_k
    from userrep.model import AEConfig, embed
    from userrep.tasks import future_listening
    from userrep.tasks._mlp import HeadConfig
    from userrep.train import fit_autoencoder

    torch.set_num_threads(1)  # one CPU per trial: trials run side by side
    features, labels, train, valid = data["features"], data["labels"], data["train"], data["valid"]
    ae = AEConfig(
        latent=params["latent"],
        share_weight=params["share_weight"],
        seed=data["seed"],
        group_drop_rate=params["group_drop_rate"],
        history_drop_rate=params["history_drop_rate"],
    )
    head = HeadConfig(hidden=params["hidden"], weight_decay=params["weight_decay"], seed=data["seed"])
    with tempfile.TemporaryDirectory() as checkpoints:
        for epochs in RUNGS:
            model = fit_autoencoder(features, replace(ae, epochs=epochs), checkpoint_dir=checkpoints, resume=True).model
            x = embed(model, features.matrix)
            fitted = future_listening.fit_head(x[train], labels[train], head)
            score = ndcg_at_k(future_listening.scores(fitted, x[valid]), labels[valid], 10)
            tune.report({"ndcg@10": float(score), "epochs": epochs})


def tune_dataset(
    data: str | Path,
    out: str | Path,
    config: TuneConfig = TuneConfig(),
    split: str = "auto",
    cutoff: str | None = None,
    as_of=None,
) -> dict:
    """Search ``SPACE`` with ASHA on the inner validation split; write and return ``OUT/tuned.json``.

    ``as_of`` (for a batch as of that time): the events before it are the history, split once;
    there is no outer evaluation split to keep out (a batch has no test users).
    """
    import pandas as pd
    import pyarrow.compute as pc
    from ray import tune
    from ray.tune import Callback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from userrep.evaluate import EvalConfig, prepare
    from userrep.features import to_utc
    from userrep.raylocal import ray_session
    from userrep.split import history_before, make_split

    started = time.monotonic()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine draws boxes even at verbose=0
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    history = history_before(ds, as_of) if as_of is not None else make_split(ds, cutoff, config.seed, kind=split).train
    # history only, split again; no users held out as new (the search scores warm users)
    ctx, _ = prepare(history, EvalConfig(split=split, seed=config.seed, new_users=0))
    if len(ctx.train_rows) < 10 or len(ctx.test_rows) < 5:
        raise ValueError(
            f"data: too few warm users in the validation split ({len(ctx.train_rows) + len(ctx.test_rows)})"
        )
    log.info(
        f"validation split of the history: {ctx.split.note}; {len(ctx.train_rows):,} head-training / "
        f"{len(ctx.test_rows):,} validation users"
    )
    payload = {
        "features": ctx.features,
        "labels": ctx.labels,
        "train": ctx.train_rows,
        "valid": ctx.test_rows,
        "seed": config.seed,
    }
    space = {name: tune.choice(list(values)) for name, values in SPACE.items()}

    class Progress(Callback):
        """One line per rung a trial reaches, instead of Tune's tables. Plain print: Tune pickles
        its callbacks with the experiment state, so this holds no reference to a console."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(
                f"  trial {trial.trial_id}: {result['epochs']:>2} epochs, validation nDCG@10 {result['ndcg@10']:.4f}",
                flush=True,
            )

    # Trials the budget never started have no results; Tune warns about each at length.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    with ray_session(num_cpus=config.cpus):
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, data=payload), {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="ndcg@10",
                mode="max",
                num_samples=config.trials,
                time_budget_s=config.budget_s,
                scheduler=ASHAScheduler(max_t=len(RUNGS), grace_period=1, reduction_factor=2),
                # The defaults are the first trial: the choice is measured against them, not assumed better.
                search_alg=BasicVariantGenerator(points_to_evaluate=[_defaults()], random_state=config.seed),
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(out / "ray_results"), verbose=0, callbacks=[Progress()]
            ),
        )
        results = tuner.fit()
    trials = []
    for result in results:  # type: ignore[attr-defined]  # a ResultGrid iterates through __getitem__
        if result.metrics and "ndcg@10" in result.metrics:
            trials.append(
                {
                    **{k: result.config[k] for k in SPACE},
                    "ndcg@10": result.metrics["ndcg@10"],
                    "epochs": int(result.metrics["epochs"]),
                }
            )
    if not trials:
        raise RuntimeError(f"tune: no trial reported a score (see {out / 'ray_results'})")
    trials.sort(key=lambda t: -t["ndcg@10"])
    record = {
        "best": trials[0],
        "trials": trials,
        "validation": {
            "split": ctx.split.note,
            "history_before": None if as_of is None else to_utc(as_of).isoformat(),
            "newest_event": pd.Timestamp(pc.max(ctx.split.future.column("ts")).as_py()).isoformat(),
            "head_training_users": int(len(ctx.train_rows)),
            "validation_users": int(len(ctx.test_rows)),
        },
        "config": asdict(config),
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "tuned.json").write_text(json.dumps(record, indent=2))
    log.info(
        f"{len(trials)} of {config.trials} trials ran within the {config.budget_s:g} s budget; best: {trials[0]} "
        f"({record['seconds']} s)"
    )
    return record

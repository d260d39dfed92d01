"""The cost claim: N downstream tasks on one shared embedding against each team building its own
(``bench/transfer_cost.py`` runs it on worlds of several sizes and charts it).

For N = 1, 3 and 6 tasks (``TASKS`` in that order: future listening; the paper's three; the
registered four plus two drawn from a world's truth, where the data has one):

* **shared**: one feature pipeline, one autoencoder and one backfill (``fit_stage`` +
  ``backfill_stage``), one task data (``task_data``), then each task's head on the 64-d embedding
  (``train_task``);
* **per-team**: each team runs its own feature pipeline (the same encoders and point-in-time
  features, ``partitioned_snapshot``, written to its own store), its own labels and history (the
  task data's work), and its own model on the raw feature vector: the same head family for every
  task (``train_task`` on the raw features; a FAISS index of the standardized features for similar
  users).

The truth tasks (the dominant genre, a heavy listener) are classified on every user at T in
both arms by the same two learners, the MLP head and scikit-learn's
``HistGradientBoostingClassifier``, the better on validation users kept: the quality gap is the
representation's, not the learner's.

Measured per arm and N: CPU-seconds (``time.process_time``, every thread of this process) to
(re)build everything; bytes on disk of models and of stored features; online bytes per user
(what a request reads: the float32 vector each team serves from, plus the candidate-artist
history rows of every deployed ``+history`` head, measured as ``onlinestore.history_table``'s
arrow bytes); request p50/p99 of each task's route handler in-process (the scorer the BentoML
route calls, ``scorer.answer``; HTTP adds the same to both arms); and each task's quality on test
users that no choice saw (carved from the task data's training users), with the shared/per-team
ratio and its paired 95% bootstrap interval.

A team's feature pipeline is one piece of code run by each team: it is measured once and counted
N times, as is the task data's work for each team whose task needs labels.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from userrep.backfill import read_embeddings
from userrep.batch.build import BuildConfig, backfill_stage, dataset_as_of, fit_stage, save_features
from userrep.batch.downstream import DownstreamConfig, serving_history, task_data, train_task
from userrep.batch.layout import BatchDir, read_manifest
from userrep.featurize import build_user_features
from userrep.model import AEConfig
from userrep.onlinestore import history_table
from userrep.partitions import partitioned_snapshot
from userrep.source import EventSource
from userrep.tasks import registry
from userrep.tasks._mlp import HeadConfig, fit_mlp, predict
from userrep.tasks.history import WITH_HISTORY
from userrep.tasks.similar_users import build_index
from userrep.uncertainty import interval, resample_weights, weighted_means

REGISTERED = ("future_listening", "artist_preference", "similar_users", "genre_affinity")
TRUTH = ("dominant_genre", "heavy_listener")  # drawn from the world's truth.parquet
TASKS = (*REGISTERED, *TRUTH)
COUNTS = (1, 3, 6)
TEST_SHARE = 0.2  # of the task data's training users: scored, never trained or chosen on
LATENCY_REQUESTS = 300


@contextmanager
def cpu(into: dict, name: str):
    began = time.process_time()
    yield
    into[name] = round(time.process_time() - began, 2)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def percentiles(call, inputs) -> dict:
    took = []
    for item in inputs:
        began = time.perf_counter()
        call(item)
        took.append((time.perf_counter() - began) * 1000)
    return {"p50_ms": round(float(np.percentile(took, 50)), 3), "p99_ms": round(float(np.percentile(took, 99)), 3)}


def ratio(shared: np.ndarray, team: np.ndarray, seed: int) -> dict:
    """Mean per-unit quality of each arm on the same units and shared/per-team with its paired interval."""
    both = np.isfinite(shared) & np.isfinite(team)
    shared, team = shared[both], team[both]
    weights = resample_weights(len(shared), seed)
    samples = weighted_means(shared, weights) / weighted_means(team, weights)
    return {
        "shared": round(float(shared.mean()), 4),
        "per_team": round(float(team.mean()), 4),
        "ratio": round(float(shared.mean() / team.mean()), 4),
        "ratio_ci": [round(v, 4) for v in interval(samples)],
        "units": int(both.sum()),
    }


def truth_labels(data: Path, users: np.ndarray) -> dict[str, np.ndarray]:
    """Per user: the dominant genre's index, and whether the session rate is above the median
    (none where the data is not a world)."""
    if not (data / "truth.parquet").exists():
        return {}
    truth = pd.read_parquet(data / "truth.parquet").set_index("user_id").reindex(pd.Index(users))
    genres = pd.Index(sorted(truth["dominant_genre"].unique()))
    rate = truth["session_rate"].to_numpy()
    return {
        "dominant_genre": genres.get_indexer(truth["dominant_genre"]),
        "heavy_listener": (rate > np.median(rate)).astype(np.int64),
    }


def fit_classifier(
    x: np.ndarray, y: np.ndarray, rows: dict, config: HeadConfig
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The MLP head (one-hot BCE) and a gradient-boosted learner, the better on validation
    accuracy (both arms choose alike: the gap is the representation's, not the learner's).
    Returns (predict(x) -> classes, record)."""
    classes = int(y.max()) + 1
    onehot = np.eye(classes, dtype=np.float32)[y]
    fit, valid = rows["fit"], rows["valid"]

    def accuracy(found) -> float:
        return float((found(x[valid]) == y[valid]).mean())

    def mlp_of(head):
        return lambda m: predict(head, m).argmax(axis=1)

    mlp = mlp_of(fit_mlp(x[fit], onehot[fit], config, validate=lambda h: accuracy(mlp_of(h))))
    from sklearn.ensemble import HistGradientBoostingClassifier

    # Early stopping on 10% of the fit rows, as a practitioner would run it (also at most ~100 trees per class to walk per request).
    gbm = HistGradientBoostingClassifier(early_stopping=True, random_state=0).fit(x[fit], y[fit])
    found = {"mlp": mlp, "gbm": gbm.predict}
    scores = {name: round(accuracy(f), 4) for name, f in found.items()}
    best = max(scores, key=lambda name: scores[name])
    return found[best], {"design": best, "validation": scores}


def history_bytes(batch: Path, source: EventSource, data) -> float:
    """Online bytes per user of a +history head's candidate-artist history rows."""
    ids, plays, recent = serving_history(batch, source, data)
    table = history_table(ids, data.artists, plays, recent, data.batch_id, pd.Timestamp(0, tz="UTC"))
    return table.nbytes / max(len(ids), 1)


def compare(
    data: Path,
    work: Path,
    config: DownstreamConfig = DownstreamConfig(),
    ae: AEConfig = AEConfig(),
    requests: int = LATENCY_REQUESTS,
) -> dict:
    """Both arms on the dataset ``data`` built under ``work`` (the shared autoencoder's settings
    ``ae``, the task heads' ``config``): each arm's CPU-seconds by piece, bytes, latency (over
    ``requests`` users) and per-task quality, and the totals for each N (``by_n``)."""
    source, seed = EventSource(data), config.seed
    as_of = dataset_as_of(data)
    shared, team = work / "shared", work / "team"
    for folder in (shared, team, work / "warm"):
        shutil.rmtree(folder, ignore_errors=True)
    # The first feature pipeline in a process pays its imports and JIT warm-up: one unmeasured.
    partitioned_snapshot(data, as_of, BuildConfig().features, work / "warm" / "encoders", work / "warm" / "p")
    shutil.rmtree(work / "warm")
    cost: dict[str, dict] = {"shared": {}, "team": {}}

    # -- shared: one pipeline and one task data; a head per task on the embedding
    with cpu(cost["shared"], "pipeline"):
        fit_stage(data, shared, as_of, BuildConfig(ae=ae, downstream=config), batch_id="shared")
        backfill_stage(shared)
    with cpu(cost["shared"], "task_data"):
        td = task_data(shared, source, config)
    order = np.random.default_rng(seed).permutation(td.train)
    n_test = int(round(TEST_SHARE * len(order)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    fitted = replace(td, train=train)
    for task in REGISTERED:
        with cpu(cost["shared"], task):
            cost["shared"][f"{task}_design"] = train_task(shared, task, source, config, data=fitted).get("design")

    # -- per team: its own feature pipeline and store, the task data's work, a model on raw features
    (team / "p").mkdir(parents=True)
    with cpu(cost["team"], "pipeline"):
        space, features = partitioned_snapshot(data, as_of, BuildConfig().features, BatchDir(team).encoders, team / "p")
        save_features(features, BatchDir(team).features)
    shutil.rmtree(team / "p")
    for record in ("manifest", "build_record"):  # the team's batch says what the shared one does
        shutil.copy(getattr(BatchDir(shared), record), getattr(BatchDir(team), record))
    cost["team"]["task_data"] = cost["shared"]["task_data"]  # the same work: labels, history, features at T - L
    start = pd.Timestamp(read_manifest(shared)["as_of"]) - pd.Timedelta(days=td.label_days)
    at_start = build_user_features(source.of_users(td.user_ids), start, space, user_ids=td.user_ids)
    raw_x = at_start.matrix.astype(np.float32)
    mean, std = raw_x[train].mean(axis=0), np.maximum(raw_x[train].std(axis=0), 1e-6)
    raw_standard = ((raw_x - mean) / std).astype(np.float32)  # what the team's index is searched with
    team_fitted = replace(fitted, x=raw_x, cold_x=at_start.cold_like().astype(np.float32))
    for task in REGISTERED:
        with cpu(cost["team"], task):
            if task == "similar_users":  # the team's index: every user's standardized features
                team_index = build_index(((features.matrix - mean) / std).astype(np.float32))
                BatchDir(team).downstream.mkdir(exist_ok=True)
                faiss.write_index(team_index, str(BatchDir(team).neighbour_index))
            else:
                cost["team"][f"{task}_design"] = train_task(team, task, source, config, data=team_fitted).get("design")

    # -- the truth tasks: every user at T (a sample of at most max_users), embedding or raw features
    ids, emb, _ = read_embeddings(BatchDir(shared).embeddings)
    raw_t = features.matrix[pd.Index(features.user_ids).get_indexer(pd.Index(ids))].astype(np.float32)
    labels = truth_labels(data, ids)
    users = np.random.default_rng(seed).permutation(len(ids))[: config.max_users]
    cut = [int(len(users) * share) for share in (0.6, 0.8)]
    rows = {"fit": users[: cut[0]], "valid": users[cut[0] : cut[1]], "test": np.sort(users[cut[1] :])}
    truth_models: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}
    for task, y in labels.items():
        for arm, x in (("shared", emb), ("team", raw_t)):
            with cpu(cost[arm], task):
                model, cost[arm][f"{task}_design"] = fit_classifier(x, y, rows, config.head)
            truth_models[task, arm] = model

    # -- quality on the test users: the same units for both arms
    window = registry.Window(shared, replace(td, train=train, valid=test), source, start, seed)
    quality = {}
    for task in REGISTERED:
        xs = [td.x, raw_standard if task == "similar_users" else raw_x]
        shared_units, team_units = registry.get(task).paired([shared, team], xs, window)
        quality[task] = ratio(shared_units, team_units, seed)
    for task, y in labels.items():
        on = rows["test"]
        shared_units, team_units = (
            (truth_models[task, arm](x[on]) == y[on]).astype(float) for arm, x in (("shared", emb), ("team", raw_t))
        )
        quality[task] = ratio(shared_units, team_units, seed)

    # -- bytes: on disk (features, encoders, models) and online per user
    files = {arm: BatchDir(folder) for arm, folder in (("shared", shared), ("team", team))}
    models = {arm: {t: size(f.head(t)) for t in REGISTERED if t != "similar_users"} for arm, f in files.items()}
    models["shared"]["similar_users"] = size(files["shared"].neighbour_index) + size(files["shared"].neighbour_ids)
    models["team"]["similar_users"] = size(files["team"].neighbour_index)
    disk = {
        "shared_base": sum(size(p) for p in (files["shared"].encoders, files["shared"].features))
        + size(files["shared"].model)
        + size(files["shared"].embeddings),
        "team_base": size(files["team"].encoders) + size(files["team"].features),
        "shared_models": models["shared"],
        "team_models": models["team"],
    }
    online = {
        "embedding": emb.shape[1] * 4,
        "raw_features": raw_t.shape[1] * 4,
        "history_row": round(history_bytes(shared, source, td), 1),
    }

    # -- request latency of each route's handler, for users of the task data
    picks = np.random.default_rng(seed).choice(len(td.user_ids), min(requests, len(td.user_ids)), False)
    latency: dict[str, dict] = {}
    past = (np.zeros_like(td.plays[:1]), np.zeros_like(td.recent[:1]))
    arms = (
        ("shared", shared, td.x, td.x, build_index(emb), emb),
        ("team", team, raw_x, raw_standard, team_index, raw_t),
    )
    for arm, batch, x, queries, index, at_t in arms:
        latency[arm] = {}
        for task in ("future_listening", "artist_preference", "genre_affinity"):
            spec = registry.get(task)
            scorer = spec.scorer(BatchDir(batch))
            assert scorer is not None and spec.request is not None  # each has a head and a route
            request = spec.request(artists=list(td.artists[:20])) if task == "artist_preference" else spec.request()
            latency[arm][task] = percentiles(
                lambda row, s=scorer, x=x, r=request: s.answer(x[row : row + 1], past, r), picks
            )
        latency[arm]["similar_users"] = percentiles(
            lambda row, q=queries, i=index: i.search(q[row : row + 1], 51), picks
        )
        for task in labels:
            model = truth_models[task, arm]
            latency[arm][task] = percentiles(lambda row, f=model, m=at_t: f(m[row : row + 1]), picks)

    tasks = [t for t in TASKS if t in REGISTERED or t in labels]
    return {
        "users": int(len(ids)),
        "n_features": int(raw_t.shape[1]),
        "label_days": td.label_days,
        "test_users": int(len(test)),
        "cpu_s": cost,
        "disk_bytes": disk,
        "online_bytes": online,
        "latency": latency,
        "quality": quality,
        "by_n": {str(n): by_n(tasks[:n], cost, disk, online, latency, quality) for n in COUNTS if n <= len(tasks)},
    }


def by_n(tasks: list[str], cost: dict, disk: dict, online: dict, latency: dict, quality: dict) -> dict:
    """Both arms' totals for ``tasks`` (the first N), and shared / per-team: the shared pipeline
    and task data once; per team, its pipeline each, the task data's work for each labelled task."""
    n = len(tasks)
    labelled = [t for t in tasks if t in REGISTERED and t != "similar_users"]
    shared_cpu = cost["shared"]["pipeline"] + cost["shared"]["task_data"] * bool(labelled)
    shared_cpu += sum(cost["shared"][t] for t in tasks)
    team_cpu = n * cost["team"]["pipeline"] + len(labelled) * cost["team"]["task_data"]
    team_cpu += sum(cost["team"][t] for t in tasks)
    with_history = lambda arm: [t for t in tasks if cost[arm].get(f"{t}_design") == WITH_HISTORY]  # noqa: E731
    shared_online = online["embedding"] + online["history_row"] * bool(with_history("shared"))
    team_online = n * online["raw_features"] + online["history_row"] * len(with_history("team"))
    shared_disk = disk["shared_base"] + sum(disk["shared_models"].get(t, 0) for t in tasks)
    team_disk = n * disk["team_base"] + sum(disk["team_models"].get(t, 0) for t in tasks)
    request = {arm: round(sum(latency[arm][t]["p50_ms"] for t in tasks), 3) for arm in ("shared", "team")}
    return {
        "tasks": list(tasks),
        "cpu_s": {"shared": round(shared_cpu, 1), "team": round(team_cpu, 1), "ratio": round(shared_cpu / team_cpu, 3)},
        "online_bytes_per_user": {
            "shared": round(shared_online),
            "team": round(team_online),
            "ratio": round(shared_online / team_online, 3),
        },
        "disk_bytes": {
            "shared": shared_disk,
            "team": team_disk,
            "ratio": round(shared_disk / team_disk, 3),
        },
        "p50_ms_all_routes": {**request, "ratio": round(request["shared"] / request["team"], 3)},
        "worst_quality_ratio": min(quality[t]["ratio"] for t in tasks),
    }

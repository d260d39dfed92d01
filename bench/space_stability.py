"""One space across batches, measured: two batches a month apart and a same-data retrain with
another seed, each built from scratch (a new space every batch) and continuing the first batch's
space (``userrep.continuity``), side by side in one run.

    python bench/space_stability.py                                    # the demo's world (10k users)
    python bench/space_stability.py --data data/lastfm --as-of 2011-05-01

For every pair (first batch = serving, second = candidate): the same-user cosine of the stored
embeddings (no alignment), the within-space kNN@10 overlap of embeddings next to that of the
batches' own feature vectors, and the share of their like-for-like quality the serving batch's
heads keep on the candidate's embeddings (as served; after Procrustes for a new space, which is
what a consumer would have to do). Then the continued month-later batch against the new-space one,
both batches' heads on the same users and labels: what continuity costs in quality. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from userrep.batch.build import BuildConfig, build_batch, dataset_as_of
from userrep.batch.downstream import DownstreamConfig
from userrep.batch.drift import aligned_pair, space_stability
from userrep.batch.policy import GatePolicy
from userrep.batch.quality import on_candidate_window
from userrep.features import FeatureConfig, to_utc
from userrep.model import AEConfig
from userrep.source import EventSource


def config(seed: int) -> BuildConfig:
    return BuildConfig(
        features=FeatureConfig(seed=seed), ae=AEConfig(seed=seed), downstream=DownstreamConfig(seed=seed)
    )


def compare(candidate: Path, serving: Path, source: EventSource, continues: bool) -> dict:
    policy = GatePolicy()
    space = space_stability(candidate, serving, policy)
    align = None if continues else aligned_pair(candidate, serving, source, policy).align
    kept, _, _ = on_candidate_window(candidate, serving, source, DownstreamConfig(), align, continues)
    return {**{k: v for k, v in space.items() if k != "per_user"}, "heads_kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: a 10k-user world, seed 0)")
    parser.add_argument("--as-of", default=None, help="the later batch's as_of (default: the data's end)")
    parser.add_argument("--days", type=int, default=30, help="days between the two batches")
    parser.add_argument("--work", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="space-stability-"))
    data = args.data
    if data is None:
        from userrep.world import WorldConfig, generate_world

        data = work / "world"
        if not (data / "world.json").exists():
            generate_world(WorldConfig(users=10_000, seed=0), data, progress=False)
    later = to_utc(args.as_of) if args.as_of else dataset_as_of(data)
    earlier = later - pd.Timedelta(days=args.days)
    source = EventSource(data)
    timings, builds = (
        {},
        {
            "first": (earlier, 0, None),
            "month_new_space": (later, 0, None),
            "month_continued": (later, 0, "first"),
            "seed1_new_space": (earlier, 1, None),
            "seed1_continued": (earlier, 1, "first"),
        },
    )
    for name, (as_of, seed, anchor) in builds.items():
        started = time.perf_counter()
        out = work / name
        if not (out / "downstream" / "similar_users.json").exists():
            build_batch(data, out, as_of, config(seed), batch_id=name, anchor=work / anchor if anchor else None)
        timings[name] = round(time.perf_counter() - started, 1)
    result = {"data": str(data), "as_of": [earlier.isoformat(), later.isoformat()], "build_s": timings}
    for name in builds:
        if name != "first":
            result[name] = compare(work / name, work / "first", source, continues=name.endswith("continued"))
    # what continuity costs: the continued month-later batch vs the new-space one, same users and labels
    _, quality, _ = on_candidate_window(
        work / "month_continued", work / "month_new_space", source, DownstreamConfig(), None, continues=True
    )
    result["quality_continued_vs_new_space"] = {
        task: {k: q.get(k) for k in ("candidate", "serving", "difference", "se", "n")} for task, q in quality.items()
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

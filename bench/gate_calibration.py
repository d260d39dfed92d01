"""Calibrate the gate's limits: clean retrains and planted shifts on two datasets (prints JSON; not a test).

For each dataset it builds two batches a month apart (the clean retrain: the later one is the
candidate, the earlier one serves) and scores, with several sampling seeds, the clean retrain and
each planted shift of it (``userrep.batch.calibration``: a feature column scaled 10x, shuffled
embeddings, half the population removed, +0.25 std on an eighth of the embedding dimensions).
It prints every score, whether today's ``GatePolicy`` passes every clean retrain and blocks every
planted shift, and the margins on each side.

    python bench/gate_calibration.py [--users 10000] [--lastfm DIR] [--seeds 5] [--write]

Datasets: the synthetic world (``--users``; batches as of 2026-05-31 and 2026-06-30) and Last.fm
HetRec 2K (``--lastfm``, default ``$USERREP_SHARED_DATA/hetrec2011-lastfm-2k``; batches as of
2011-04-01 and 2011-05-01, the last months before the snapshot date that dates most of its plays).
``--write`` stores the scores in ``userrep/batch/gate_calibration.json``, which the rollout report
draws (where a candidate's embedding drift lies among the calibration's).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    from userrep.batch.build import BuildConfig, build_batch
    from userrep.batch.calibration import PLANTED, holds, margins, scores
    from userrep.batch.policy import GatePolicy
    from userrep.batch.rollout import CALIBRATION
    from userrep.importers import import_lastfm_hetrec
    from userrep.source import EventSource
    from userrep.world import WorldConfig, generate_world

    shared = Path(os.environ.get("USERREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--lastfm", type=Path, default=shared / "hetrec2011-lastfm-2k")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    policy = GatePolicy()
    config = BuildConfig(downstream=None)  # the checks calibrated here read embeddings and features only
    out: dict = {
        "policy": {
            k: getattr(policy, k)
            for k in ("max_drift_share", "max_column_drift", "max_embedding_drift", "min_knn_overlap")
        }
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = work / "world"
        generate_world(WorldConfig(users=args.users, seed=0), world, progress=False)
        lastfm = work / "lastfm"
        import_lastfm_hetrec(args.lastfm, lastfm)
        datasets = {
            f"world {args.users // 1000}k": (world, "2026-05-31", "2026-06-30"),
            "lastfm-hetrec-2k": (lastfm, "2011-04-01", "2011-05-01"),
        }
        for name, (data, serving_as_of, candidate_as_of) in datasets.items():
            started = time.perf_counter()
            root = work / name.replace(" ", "-")
            build_batch(data, root / "serving", serving_as_of, config, batch_id="serving")
            build_batch(data, root / "candidate", candidate_as_of, config, batch_id="candidate")
            built = time.perf_counter() - started
            source = EventSource(data)
            runs = [
                scores(root / "candidate", root / "serving", source, replace(policy, seed=seed))
                for seed in range(args.seeds)
            ]
            results += runs
            out[name] = {
                "as_of": {"serving": serving_as_of, "candidate": candidate_as_of},
                "runs": runs,
                "holds": [holds(run, policy) for run in runs],
                "seconds": {"build": round(built, 1), "score": round(time.perf_counter() - started - built, 1)},
            }
    out["margins"] = margins(results, policy)
    out["all_hold"] = all(
        all(h.values())
        for name in out
        if isinstance(out[name], dict) and "holds" in out[name]
        for h in out[name]["holds"]
    )
    print(json.dumps(out, indent=2))
    if args.write:
        drawn = {
            check: {
                "clean": [r["clean"][check] for r in results],
                "shifted": [r["planted"][s] for r in results for s, c in PLANTED.items() if c == check],
            }
            for check in ("embedding_drift", "stability_knn")
        }
        CALIBRATION.write_text(json.dumps({**drawn, "margins": out["margins"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()

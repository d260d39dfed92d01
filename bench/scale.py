"""The training pipeline's stages as the world grows: time and peak memory per stage, cost per user.

    python bench/scale.py                                   # 10k and 100k users
    python bench/scale.py --users 1000000                   # the 1M claim (about 55 min on 2 cores, 6.2 GiB)

Per size, a synthetic world is generated, then each stage of one batch runs in its own fresh
process, as the pipeline's steps do, so its peak RSS is its own: load (the plan step: the
dataset validated as it streams, its default as_of), materialize (encoders, partitioned
features, Feast offline and online), fit (the training set from Feast,
then the autoencoder, in-process: the fastest fit measured on one box, bench/fit_throughput.py),
backfill (embeddings, published online), downstream (the task models) and gate (the batch
against itself: the gate's cost, not a decision). A stage that fails or runs out of the time
limit is reported with its error and the sizes after it are still run.

Writes ``reports/scale.json`` and ``reports/scale.html`` (time and peak memory per stage against
users) and prints the JSON: per size and stage seconds, peak MiB and milliseconds per user; per
size the total and its cost per user relative to the smallest size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("world", "load", "materialize", "fit", "backfill", "downstream", "gate")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
stage, users, work, epochs = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
world, batch = work / "world", work / "batches" / "b1"
started = time.perf_counter()
extra = {}
if stage == "world":
    from userrep.world import WorldConfig, generate_world
    extra["events"] = generate_world(WorldConfig(users=users, seed=0), world, progress=False)["events"]
else:
    from userrep.batch.build import dataset_as_of, fit_stage, backfill_stage, downstream_stage
    from userrep.batch.spec import BatchSpec
    spec = BatchSpec(data=str(world), batch_root=str(work / "batches"), feast_home=str(work / "feast"),
                   epochs=epochs, workers=0, batch_id="b1")
    config = spec.build_config()
    state = json.loads((work / "state.json").read_text()) if (work / "state.json").exists() else {}
    if stage == "load":
        from userrep.partitions import event_rows
        state["as_of"] = dataset_as_of(world).isoformat()  # the plan step: validated, streamed
        extra["events"] = event_rows(world)
    elif stage == "materialize":
        from userrep.store import materialize
        state["snapshot"] = materialize(world, state["as_of"], config.feast, config.features).space_id
    elif stage == "fit":
        record = fit_stage(world, batch, state["as_of"], config, "b1", state["snapshot"])
        extra["fit_s_per_epoch"] = round(record["timings_s"]["fit"] / epochs, 2)
        extra["training_set_s"] = record["timings_s"]["features"]
        extra["final_loss"] = record["training"]["losses"][-1]
    elif stage == "backfill":
        extra["users"] = backfill_stage(batch)["users"]
    elif stage == "downstream":
        done = downstream_stage(batch)
        extra["tasks"] = {t: r.get("metrics", r.get("skipped")) for t, r in done.items()}
    elif stage == "gate":
        from userrep.batch.gate import run_gate
        from userrep.source import EventSource
        run_gate(batch, batch, EventSource(world))
    (work / "state.json").write_text(json.dumps(state))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "peak_mib": round(peak), **extra}))
"""


def run_stage(stage: str, users: int, work: Path, epochs: int, timeout_s: float) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, stage, str(users), str(work), str(epochs)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout_s:.0f} s limit"}
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {
            "error": f"exit {done.returncode}: {lines[-1] if lines else ''}",
            "wall_s": round(time.perf_counter() - started, 1),
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, subplot_titles=("seconds per stage", "peak MiB per stage"))
    for stage in STAGES:
        done = [r for r in rows if "seconds" in r["stages"].get(stage, {})]
        users = [r["users"] for r in done]
        figure.add_trace(
            go.Scatter(x=users, y=[r["stages"][stage]["seconds"] for r in done], name=stage, legendgroup=stage),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=users,
                y=[r["stages"][stage]["peak_mib"] for r in done],
                name=stage,
                legendgroup=stage,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    figure.update_xaxes(type="log", title="users")
    figure.update_yaxes(type="log")
    figure.write_html(path, include_plotlyjs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--epochs", type=int, default=20, help="autoencoder epochs (the pipeline's default)")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per stage")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="run only these (the earlier ones must have run in --work)",
    )
    args = parser.parse_args()
    rows = []
    for users in sorted(args.users):
        with tempfile.TemporaryDirectory(prefix="ur-scale-") as tmp:
            work = (args.work / str(users)) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            stages = {}
            for stage in args.stages:
                stages[stage] = result = run_stage(stage, users, work, args.epochs, args.timeout_s)
                if "seconds" in result:
                    result["ms_per_user"] = round(1000 * result["seconds"] / users, 3)
                print(f"{users} users, {stage}: {result}", file=sys.stderr, flush=True)
                if "error" in result:
                    break
        done = [s for s in stages.values() if "seconds" in s]
        rows.append(
            {
                "users": users,
                "events": stages.get("world", {}).get("events"),
                "stages": stages,
                "complete": len(done) == len(STAGES),
                "pipeline_s": round(sum(s["seconds"] for k, s in stages.items() if k != "world" and "seconds" in s), 1),
                "pipeline_peak_mib": max(
                    (s["peak_mib"] for k, s in stages.items() if k != "world" and "peak_mib" in s), default=None
                ),
            }
        )
    base = rows[0]
    for row in rows:
        row["ms_per_user"] = round(1000 * row["pipeline_s"] / row["users"], 3)
        row["cost_per_user_vs_smallest"] = round(row["ms_per_user"] / base["ms_per_user"], 2)
    for previous, row in zip(rows, rows[1:]):
        row["cost_per_user_vs_previous"] = round(row["ms_per_user"] / previous["ms_per_user"], 2)
    result = {"bench": "scale", "epochs": args.epochs, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "scale.html")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

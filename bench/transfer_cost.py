"""The cost claim as a bench: ``userrep.transfer.compare`` on worlds of several sizes; JSON on
stdout, ``--html`` a chart of cost against N.

Two arms serve N = 1, 3 and 6 downstream tasks: **shared** (one feature pipeline, autoencoder and
backfill, then small heads on the 64-d embedding) and **per-team** (each task's team runs its own
feature pipeline and fits its own model on the raw feature vector). See ``userrep/transfer.py``
for what is measured and how.

    python bench/transfer_cost.py --users 10000,100000 --html transfer_cost.html
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from userrep.batch.downstream import DownstreamConfig
from userrep.transfer import COUNTS, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="10000", help="world sizes, comma-separated (e.g. 10000,100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--html", type=Path, default=None, help="write a chart of cost against N here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables and a mermaid chart here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="transfer-cost-"))
    from userrep.world import WorldConfig, generate_world

    results = {}
    for users in (int(u) for u in args.users.split(",")):
        data = work / f"world-{users}"
        if not (data / "world.json").exists():
            generate_world(WorldConfig(users=users, seed=args.seed), data, progress=False)
        results[str(users)] = compare(data, work / f"run-{users}", DownstreamConfig(seed=args.seed))
    print(json.dumps(results, indent=2))
    if args.html:
        chart(results, args.html)
    if args.markdown:
        args.markdown.write_text(markdown(results))


def chart(results: dict, path: Path) -> None:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("CPU-seconds to rebuild", "online bytes per user"))
    for users, result in results.items():
        for col, key in ((1, "cpu_s"), (2, "online_bytes_per_user")):
            for arm, dash in (("shared", "solid"), ("team", "dash")):
                fig.add_scatter(
                    x=list(COUNTS),
                    y=[result["by_n"][str(n)][key][arm] for n in COUNTS],
                    name=f"{arm}, {users} users",
                    line={"dash": dash},
                    showlegend=col == 1,
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="downstream tasks (N)")
    fig.update_layout(title="one shared embedding against per-team models")
    fig.write_html(path, include_plotlyjs=True)


def markdown(results: dict) -> str:
    """Per world size: cost and quality against N, each task's quality ratio, and a mermaid chart
    of CPU-seconds against N (GitHub renders it in the README)."""
    out = []
    for users, r in results.items():
        out += [
            f"**{int(users):,} users** ({r['n_features']} raw features, {r['test_users']} test users):",
            "",
            "| N | CPU-s, shared / per-team | online bytes per user | stored MB | p50 ms, all routes | worst quality ratio |",
            "|---|---|---|---|---|---|",
        ]
        for n, v in r["by_n"].items():
            shown = {
                "cpu_s": (1, 1),
                "online_bytes_per_user": (1, 0),
                "disk_bytes": (1e-6, 1),
                "p50_ms_all_routes": (1, 1),
            }
            cells = [
                f"{v[key]['shared'] * scale:,.{digits}f} / {v[key]['team'] * scale:,.{digits}f} ({v[key]['ratio']:.2f}x)"
                for key, (scale, digits) in shown.items()
            ]
            out.append(f"| {n} | " + " | ".join(cells) + f" | {v['worst_quality_ratio']:.3f} |")
        out += ["", "| task | shared | per-team | ratio (95% interval) |", "|---|---|---|---|"]
        for task, q in r["quality"].items():
            low, high = q["ratio_ci"]
            out.append(
                f"| {task} | {q['shared']:.3f} | {q['per_team']:.3f} | {q['ratio']:.3f} ({low:.3f}-{high:.3f}) |"
            )
        ns = list(r["by_n"])
        series = {arm: [r["by_n"][n]["cpu_s"][arm] for n in ns] for arm in ("shared", "team")}
        out += [
            "",
            "```mermaid",
            "xychart-beta",
            f'    title "CPU-seconds to rebuild N tasks, {int(users):,} users (bars: per-team, line: shared)"',
            f'    x-axis "tasks (N)" [{", ".join(ns)}]',
            f'    y-axis "CPU-seconds" 0 --> {max(series["team"]) * 1.1:.0f}',
            f"    bar [{', '.join(str(v) for v in series['team'])}]",
            f"    line [{', '.join(str(v) for v in series['shared'])}]",
            "```",
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    main()

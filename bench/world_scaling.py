"""World generation and validation: time and peak memory as the world grows, side by side.

    python bench/world_scaling.py                       # 5k, 20k, 100k users
    python bench/world_scaling.py --users 20000 1000000  # the 1M claim

Each size runs in a fresh subprocess so its peak RSS is its own. Prints one JSON object:
per size seconds, events/s and peak MiB, plus ratios against the smallest size — linear time and
flat memory mean the generator streams.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from userrep.world import WorldConfig, generate_world
from userrep.data import load_dataset
users, out, validate = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
counts = generate_world(WorldConfig(users=users), out, progress=False)
gen_s = time.perf_counter() - t0
gen_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
val_s = None
if validate:
    t0 = time.perf_counter()
    load_dataset(out)
    val_s = time.perf_counter() - t0
print(json.dumps({"users": users, "events": counts["events"], "generate_s": round(gen_s, 2),
                  "generate_peak_mib": round(gen_mib), "validate_s": val_s and round(val_s, 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[5_000, 20_000, 100_000])
    parser.add_argument(
        "--validate-max",
        type=int,
        default=200_000,
        help="validate (load everything in memory) only up to this many users",
    )
    args = parser.parse_args()
    rows = []
    for users in sorted(args.users):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(users), tmp, str(int(users <= args.validate_max))],
                capture_output=True,
                text=True,
                check=True,
            )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["events_per_s"] = round(row["events"] / row["generate_s"])
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["time_ratio_vs_smallest"] = round(row["generate_s"] / base["generate_s"], 2)
        row["size_ratio_vs_smallest"] = round(row["users"] / base["users"], 2)
        row["memory_ratio_vs_smallest"] = round(row["generate_peak_mib"] / base["generate_peak_mib"], 2)
    print(json.dumps({"bench": "world_scaling", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""A pipeline step's start-up: the imports each kfp.local / Kubeflow step pays in a fresh interpreter,
side by side in one run (JSON). Each case runs in a new process; cases take turns for
``--repeats`` rounds and each reports its median (one run on a shared 2-core box varies by ~20%).

    python bench/startup.py [--repeats 3]

Cases: ``import feast`` as is; feast through `userrep.store.import_feast` (typeguard's
``@typechecked`` off during the import); and what the light and heavy steps import.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {
    "import feast": "import feast",
    "userrep.store.import_feast()": "from userrep.store import import_feast; import_feast()",
    "plan step (userrep.batch.spec + build)": "import userrep.batch.spec, userrep.batch.build",
    "promote step (userrep.batch.registry)": "import userrep.batch.registry",
    "gate step (userrep.batch.gate + evidently)": "import userrep.batch.gate, evidently",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: round(statistics.median(values), 2) for name, values in seconds.items()}
    plain = medians["import feast"]
    print(
        json.dumps(
            {
                "repeats": args.repeats,
                "median_s": medians,
                "feast_import_share_of_plain": round(medians["userrep.store.import_feast()"] / plain, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

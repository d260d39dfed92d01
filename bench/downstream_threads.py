"""Two downstream task models trained side by side, as the pipeline's parallel steps run them:
every library's default threads vs one thread each (`userrep.threads.limited_threads`), in one
run (JSON). Each side is a fresh process on its own copy of the batch.

Needs a batch in WORK (run `userrep demo --work WORK --users 20000` first: its serving batch).

    python bench/downstream_threads.py [--work work]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE = """
import json, sys, time
from pathlib import Path
from userrep.batch.build import config_from_dict
from userrep.batch.downstream import DownstreamConfig, task_data, train_task
from userrep.batch.layout import BatchDir
from userrep.source import EventSource
from userrep.threads import limited_threads

task, threads, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
record = json.loads(BatchDir(out).build_record.read_text())
config = config_from_dict(record["config"])
source = EventSource(record["data"]["path"])
with limited_threads(threads or None):
    started = time.perf_counter()
    data = task_data(out, source, config.downstream or DownstreamConfig())
    prepared = time.perf_counter()
    train_task(out, task, source, config.downstream or DownstreamConfig(), data)
print(json.dumps({"task": task, "task_data_s": round(prepared - started, 1),
                  "train_s": round(time.perf_counter() - prepared, 1)}))
"""
TASKS = ("future_listening", "artist_preference")


def side_by_side(batch: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copies = [shutil.copytree(batch, Path(tmp) / task) for task in TASKS]
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", ONE, task, str(threads), str(copy)], stdout=subprocess.PIPE, text=True
            )
            for task, copy in zip(TASKS, copies)
        ]
        steps = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
        return {
            "threads": threads or "library default",
            "wall_s": round(time.perf_counter() - started, 1),
            "steps": steps,
        }


def main() -> None:
    from userrep.batch.registry import batch_dir, serving_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("work"))
    args = parser.parse_args()
    root = args.work / "batches"
    serving = serving_batch(root)
    if serving is None:
        raise SystemExit(f"no batch is serving under {root}: run `make demo` first")
    runs = [side_by_side(batch_dir(root, serving), threads) for threads in (0, 1)]
    print(
        json.dumps(
            {"batch": serving, "runs": runs, "speedup": round(runs[0]["wall_s"] / runs[1]["wall_s"], 2)}, indent=2
        )
    )


if __name__ == "__main__":
    main()

"""A batch's downstream models on disk: each task's head (weights + what it needs to score) and
its registration record, written last; which tasks are done, skipped or missing."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from userrep.fsio import sha256, write_json_atomic
from userrep.layout import TASKS, BatchDir
from userrep.tasks._mlp import HeadConfig, MLPHead


def register_task(out: Path, task: str, record: dict) -> dict:
    """Write a task's record (its files' hashes, metrics) last: a task without it is not done."""
    record = {**record, "trained_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json_atomic(out / f"{task}.json", record)
    return record


def skipped_tasks(batch_dir: str | Path) -> dict[str, str]:
    """Tasks registered as skipped (too little data), with the reason."""
    out = BatchDir(batch_dir).downstream
    records = {task: out / f"{task}.json" for task in TASKS}
    return {
        task: reason
        for task, path in records.items()
        if path.exists() and (reason := json.loads(path.read_text()).get("skipped"))
    }


def save_head(path: Path, head: MLPHead, meta: dict) -> Path:
    torch.save(
        {
            "meta": meta,
            "n_in": head.n_in,
            "n_out": head.out.out_features,
            "n_side": head.n_side,
            "config": asdict(head.config),
            "state": head.state_dict(),
        },
        path,
    )
    return path


def load_head(path: str | Path) -> tuple[MLPHead, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    n_in = blob["n_in"]
    head = MLPHead(
        n_in, blob["n_out"], np.zeros(n_in), np.ones(n_in), HeadConfig(**blob["config"]), n_side=blob.get("n_side", 0)
    )
    head.load_state_dict(_renamed(blob["state"]))
    return head.eval(), blob["meta"]


def _renamed(state: dict) -> dict:
    """Heads saved before the side features had one ``net`` Sequential (0: hidden, 3: output)."""
    names = {"net.0.": "hidden.0.", "net.3.": "out."}
    return {
        next((new + k[len(old) :] for old, new in names.items() if k.startswith(old)), k): v for k, v in state.items()
    }


def missing_tasks(batch_dir: str | Path) -> list[str]:
    """Tasks without a registration record, or whose files are gone or changed since."""
    out = BatchDir(batch_dir).downstream
    missing = []
    for task in TASKS:
        record_path = out / f"{task}.json"
        if not record_path.exists():
            missing.append(task)
            continue
        record = json.loads(record_path.read_text())
        if any(not (out / name).exists() or sha256(out / name) != digest for name, digest in record["files"].items()):
            missing.append(task)
    return missing

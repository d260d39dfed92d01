"""A batch's downstream models on disk: each task's head (weights + what it needs to score) and
its registration record, written last; which tasks are done, skipped or missing."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from userrep.tasks._mlp import HeadConfig, MLPHead


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

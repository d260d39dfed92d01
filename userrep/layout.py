"""The names a batch root and a batch directory are made of, spelled here only.

    ROOT/SERVING.json         the pointer: serving batch id, history (userrep.batches)
    ROOT/<batch id>/manifest.json   written last: a directory without it is not a finished batch
    ROOT/<batch id>/downstream/<task>.pt   one head per downstream task (TASKS)

Imports nothing from userrep, so every module (batches, build, downstream, gate, serving) can
use it without a cycle.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
POINTER = "SERVING.json"
TASKS = ("future_listening", "artist_preference", "similar_users")  # the downstream models of every batch


def manifest_path(batch_dir: str | Path) -> Path:
    return Path(batch_dir) / MANIFEST


def read_manifest(batch_dir: str | Path) -> dict:
    return json.loads(manifest_path(batch_dir).read_text())


def pointer_path(root: str | Path) -> Path:
    return Path(root) / POINTER

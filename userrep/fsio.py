"""Small helpers every stage shares: content hashes, the dataset fingerprint, a batch's integrity
against its manifest, write-to-temp-then-rename (a reader sees the old file or the new one, never
half of one), and the default cut-off of a dataset (the midnight after its last event)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from userrep.batch.layout import read_manifest
from userrep.data import TABLES, table_path
from userrep.eventlog import part_files


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(directory: str | Path) -> dict[str, str]:
    """sha256 of each contract table file (what the batch was trained on)."""
    out = {}
    for name in TABLES:
        path = table_path(Path(directory), name)
        if path is not None:
            out[path.name] = sha256(path)
    for path in part_files(directory):  # online events compacted into the dataset
        out[str(path.relative_to(directory))] = sha256(path)
    return out


def write_json_atomic(path: str | Path, value: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_plain))
    tmp.replace(path)


def _plain(value):
    """numpy scalars as numbers; anything else (Paths in configs, timestamps) as its string."""
    return value.item() if isinstance(value, (np.floating, np.integer, np.bool_)) else str(value)


def midnight_after(last) -> pd.Timestamp:
    """The first midnight (UTC) strictly after ``last``: a cut-off before which every event up to
    ``last`` counts as history (an event at midnight itself gives the next midnight)."""
    return (pd.Timestamp(last) + pd.Timedelta(microseconds=1)).ceil("D")


def integrity_problems(batch_dir: str | Path) -> list[str]:
    """The files of a batch whose sha256 no longer matches its manifest (or that are gone)."""
    batch_dir = Path(batch_dir)
    return [
        name
        for name, digest in read_manifest(batch_dir).get("files", {}).items()
        if not (batch_dir / name).exists() or sha256(batch_dir / name) != digest
    ]

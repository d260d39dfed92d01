"""Encoder and feature fit times as the catalog grows (the 50k+ items on 2 cores claim).

    python bench/encoders.py                  # worlds of 20k and 100k users (~20k and ~100k items)

Prints JSON: per world the items, events, and seconds for the collaborative encoder, the content
encoder and the user features, with ratios against the smallest world.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from userrep.data import load_dataset
from userrep.encoders import CollaborativeEncoder, ContentEncoder
from userrep.features import fit_feature_space
from userrep.featurize import build_user_features
from userrep.world import WorldConfig, generate_world


def measure(users: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(WorldConfig(users=users), tmp, progress=False)
        ds = load_dataset(tmp)
        as_of = "2026-06-01"
        row = {"users": users, "items": ds.items.num_rows, "events": ds.events.num_rows}
        for name, fit in (
            ("collab_s", lambda: CollaborativeEncoder().fit(ds, as_of)),
            ("content_s", lambda: ContentEncoder().fit(ds, as_of)),
        ):
            started = time.perf_counter()
            fit()
            row[name] = round(time.perf_counter() - started, 2)
        space = fit_feature_space(ds, as_of)
        started = time.perf_counter()
        features = build_user_features(ds, as_of, space)
        row["features_s"] = round(time.perf_counter() - started, 2)
        row["n_features"] = features.matrix.shape[1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[20_000, 100_000])
    rows = [measure(u) for u in sorted(parser.parse_args().users)]
    for row in rows:
        for key in ("items", "events", "collab_s", "features_s"):
            row[f"{key}_ratio"] = round(row[key] / max(rows[0][key], 1e-9), 2)
    print(json.dumps({"bench": "encoders", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

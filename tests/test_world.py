"""The synthetic world: valid, reproducible, streamed, and carrying the structure it promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import chi2_contingency
from typer.testing import CliRunner

from userrep.cli import app
from userrep.data import load_dataset, summarize
from userrep.world import GENRES, WorldConfig, generate_world, world_is_current


@pytest.fixture(scope="module")
def world(small_world):
    read = lambda name: pd.read_parquet(small_world / f"{name}.parquet")  # noqa: E731
    tables = {name: read(name) for name in ("events", "items", "users", "pairs", "truth")}
    tables["plays"] = tables["events"].merge(tables["items"][["item_id", "artist_id", "genres"]], on="item_id")
    tables["plays"]["genre"] = tables["plays"]["genres"].str.split("|").str[0]
    return tables


def test_world_is_a_valid_dataset(small_world):
    summary = summarize(load_dataset(small_world))
    assert summary["users_table"] == 1_500
    assert summary["coverage"]["items.content_*"] == 8
    assert 60 <= summary["events_per_user_median"] <= 200
    assert 0.7 <= summary["coverage"]["users.onboarding_genres"] <= 0.9


def test_same_seed_same_world_other_seed_other_world(tmp_path, small_world):
    config = WorldConfig(users=1_500, seed=7, chunk_users=500)
    generate_world(config, tmp_path / "again", progress=False)
    for name in ("events", "items", "users", "pairs", "truth"):
        assert pq.read_table(tmp_path / "again" / f"{name}.parquet").equals(
            pq.read_table(small_world / f"{name}.parquet")
        )
    generate_world(WorldConfig(users=1_500, seed=8, chunk_users=500), tmp_path / "other", progress=False)
    assert not pq.read_table(tmp_path / "other" / "events.parquet").equals(
        pq.read_table(small_world / "events.parquet")
    )
    assert world_is_current(config, tmp_path / "again")
    assert not world_is_current(WorldConfig(users=1_500, seed=8, chunk_users=500), tmp_path / "again")


def test_users_are_streamed_in_chunks(small_world, world):
    # One row group per chunk of 500 users: a chunk is written before the next is made.
    assert pq.ParquetFile(small_world / "events.parquet").num_row_groups == 3
    assert world["users"]["user_id"].is_unique and len(world["users"]) == 1_500
    events = world["events"]
    assert events.groupby("user_id")["ts"].apply(lambda s: s.is_monotonic_increasing).all()


def test_artist_popularity_is_heavy_tailed(world):
    plays = world["plays"].groupby("artist_id")["weight"].sum().sort_values(ascending=False)
    n_artists = world["items"]["artist_id"].nunique()
    top_decile_share = plays.iloc[: n_artists // 10].sum() / plays.sum()
    assert top_decile_share > 0.35  # uniform popularity would give ~0.10


def test_content_vectors_correlate_with_genre(world):
    items = world["items"].assign(genre=world["items"]["genres"].str.split("|").str[0])
    x = items[[c for c in items if c.startswith("content_")]].to_numpy()
    x = (x - x.mean(0)) / x.std(0)
    fit = np.arange(len(items)) % 2 == 0
    genres = sorted(items["genre"].unique())
    centroids = np.stack([x[fit & (items["genre"] == g).to_numpy()].mean(0) for g in genres])
    predicted = np.array(genres)[np.argmin(((x[~fit, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (predicted == items["genre"].to_numpy()[~fit]).mean()
    majority = items["genre"].value_counts(normalize=True).iloc[0]
    assert accuracy > majority + 0.3


def test_listening_follows_hidden_taste(world):
    truth = world["truth"].set_index("user_id")
    played = world["plays"].groupby("user_id")["genre"].agg(lambda g: g.value_counts().index[0])
    agreement = (played == truth["dominant_genre"].reindex(played.index)).mean()
    assert agreement > 0.4  # chance would be ~1/20


def test_taste_drifts_from_first_to_second_mixture(world):
    truth = world["truth"].set_index("user_id")
    drifting = truth.index[truth["drift"] > 0.5]
    plays = world["plays"][world["plays"]["user_id"].isin(drifting)]
    t0 = truth[[f"taste0_{g}" for g in GENRES]].to_numpy()
    t1 = truth[[f"taste1_{g}" for g in GENRES]].to_numpy()
    row = {u: i for i, u in enumerate(truth.index)}

    def mean_cosines(frame):
        shares = frame.pivot_table(index="user_id", columns="genre", values="weight", aggfunc="sum", fill_value=0)
        shares = shares.reindex(columns=list(GENRES), fill_value=0).to_numpy()
        idx = [row[u] for u in sorted(frame["user_id"].unique())]
        cos = lambda a, b: ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean()  # noqa: E731
        return cos(shares, t0[idx]), cos(shares, t1[idx])

    early = plays[plays["ts"] < pd.Timestamp("2026-02-15", tz="UTC")]
    late = plays[plays["ts"] >= pd.Timestamp("2026-05-01", tz="UTC")]
    early_t0, early_t1 = mean_cosines(early)
    late_t0, late_t1 = mean_cosines(late)
    assert early_t0 > early_t1 + 0.2
    assert late_t1 > early_t1 + 0.15 and late_t0 < early_t0 - 0.1


def test_some_users_are_cold_at_any_cutoff(world):
    first_event = world["events"].groupby("user_id")["ts"].min()
    signup = world["users"].set_index("user_id")["signup_ts"]
    for day in (30, 90, 150):
        cutoff = pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(days=day)
        cold = signup.index[signup < cutoff].difference(first_event.index[first_event < cutoff])
        joined_later = (first_event >= cutoff) & (signup.reindex(first_event.index) >= cutoff)
        assert len(cold) > 10 and joined_later.sum() > 10


def test_onboarding_picks_reflect_taste(world):
    truth = world["truth"].set_index("user_id")
    users = world["users"].set_index("user_id")
    onboarded = users["onboarding_genres"].dropna()
    hits = [dom in picks.split("|") for picks, dom in zip(onboarded, truth["dominant_genre"].reindex(onboarded.index))]
    assert np.mean(hits) > 0.5  # picks are 1-3 of 20 genres
    assert users["onboarding_artists"].notna().equals(users["onboarding_genres"].notna())


def test_pairs_share_dominant_taste(world):
    dominant = world["truth"].set_index("user_id")["dominant_genre"]
    pairs = world["pairs"]
    same = (dominant.reindex(pairs["user_a"]).to_numpy() == dominant.reindex(pairs["user_b"]).to_numpy()).mean()
    baseline = (dominant.value_counts(normalize=True) ** 2).sum()
    assert same > 0.8 > baseline + 0.5
    assert (pairs["user_a"] < pairs["user_b"]).all()  # each unordered pair once


def test_demographics_are_weakly_informative(world):
    users = world["users"].merge(world["truth"][["user_id", "dominant_genre"]], on="user_id")
    table = pd.crosstab(users["age_bucket"], users["dominant_genre"])
    chi2, p_value, *_ = chi2_contingency(table)
    cramers_v = np.sqrt(chi2 / table.to_numpy().sum() / (min(table.shape) - 1))
    assert p_value < 1e-3  # informative...
    assert cramers_v < 0.35  # ...but weakly


@pytest.mark.slow
def test_default_world_generates_and_validates_via_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "world"
    result = runner.invoke(app, ["world", "generate", "--users", "20000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "validate", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert '"users_table": 20000' in result.output

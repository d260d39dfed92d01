"""A synthetic music world that satisfies the dataset contract, with its hidden truth.

The generative story (every step vectorized with numpy; users streamed to parquet in chunks
so 1M users run in bounded memory):

1. Genres have a popularity and a centroid in an 8-d "audio" space. Artists get a primary
   (and sometimes a secondary) genre and a power-law popularity; tracks carry content vectors
   = genre centroid + artist offset + noise, so content correlates with genre.
2. Users get demographics first; their taste mixture over genres is drawn from a Dirichlet
   whose prior is tilted (weakly) by age bucket and country. Each user also has a second
   mixture and a drift rate: taste at time t moves linearly from the first to the second.
3. Users sign up throughout the window (some before it), so at any cutoff some are cold.
   Onboarding picks (genres, artists) are drawn from the starting taste.
4. Listening sessions arrive as a Poisson process after sign-up; each play comes either from
   the user's favourite artists (which drift with taste) or explores by genre and popularity.
5. Pairs join users who share a dominant genre (plus a little noise), like friendships.

``truth.parquet`` holds, per user, both mixtures, the drift rate and the dominant genre, so
tests can check that learned representations recover taste.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from userrep.contract import TS_TYPE

GENRES = tuple(
    "pop rock hip-hop electronic indie metal jazz classical r&b country folk latin reggae blues punk soul ambient "
    "k-pop house techno".split()
)
CONTENT = ("energy", "valence", "danceability", "acousticness", "instrumentalness", "speechiness", "tempo", "loudness")
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "SE", "JP", "MX")
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
_FAVORITES = 8  # favourite artists per user and taste phase
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the synthetic world; defaults give ~100-200 events per user."""

    users: int = 20_000
    seed: int = 0
    start: str = "2026-01-01"
    days: int = 180
    artists: int = 0  # 0: scale with users (users // 8, clipped to [200, 100_000])
    tracks_per_artist: float = 8.0
    session_rate: float = 0.12  # median sessions per day per user (log-normal across users)
    tracks_per_session: float = 5.0
    favorite_share: float = 0.6  # plays from favourite artists vs. genre exploration
    new_user_share: float = 0.35  # users who sign up during the window
    onboarding_share: float = 0.8  # users who made onboarding picks
    pairs_per_user: float = 1.5
    pair_noise: float = 0.1  # share of pairs between users of different dominant genres
    demographic_tilt: float = 0.3  # strength of the age/country prior on taste (weak by design)
    chunk_users: int = 5_000

    def __post_init__(self) -> None:
        for name in ("users", "days", "chunk_users", "tracks_per_artist", "session_rate", "tracks_per_session"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("favorite_share", "new_user_share", "onboarding_share", "pair_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)!r}")
        if self.artists < 0 or self.pairs_per_user < 0 or self.demographic_tilt < 0:
            raise ValueError("artists, pairs_per_user and demographic_tilt must be >= 0")
        try:
            pd.Timestamp(self.start, tz="UTC")
        except (ValueError, TypeError):
            raise ValueError(f"start must be an ISO-8601 date, got {self.start!r}") from None

    @property
    def n_artists(self) -> int:
        return self.artists or int(np.clip(self.users // 8, 200, 100_000))


@dataclass(frozen=True)
class Catalog:
    artist_genre: np.ndarray  # (A,) primary genre
    artist_genre2: np.ndarray  # (A,) secondary genre or -1
    artist_pop: np.ndarray  # (A,) popularity weight
    track_offset: np.ndarray  # (A,) first track index of each artist
    track_count: np.ndarray  # (A,)
    genre_pop: np.ndarray  # (G,)
    genre_artists: list  # per genre: artist indices sorted, with cumulative popularity
    genre_cum: list


def generate_world(config: WorldConfig, out: str | Path, progress: bool = True) -> dict:
    """Write events/items/users/pairs (+ truth.parquet, world.json) under ``out``.

    Returns a small dict of counts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # incomplete until the end
    root = np.random.SeedSequence(config.seed)
    catalog_seq, users_seq, pairs_seq = root.spawn(3)
    rng = np.random.default_rng(catalog_seq)
    genre_centroids = rng.normal(0.0, 1.0, size=(len(GENRES), len(CONTENT)))
    catalog = _make_catalog(config, rng)
    pq.write_table(_items_table(catalog, genre_centroids, rng), out / "items.parquet")
    age_bias = rng.normal(0.0, 1.0, size=(len(AGE_BUCKETS), len(GENRES)))
    country_bias = rng.normal(0.0, 1.0, size=(len(COUNTRIES), len(GENRES)))

    n_chunks = -(-config.users // config.chunk_users)
    dominant = np.empty(config.users, dtype=np.int16)
    writers: dict[str, pq.ParquetWriter] = {}
    n_events = 0
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"world: {config.users:,} users", total=n_chunks + 1)
        for chunk, seq in enumerate(users_seq.spawn(n_chunks)):
            lo = chunk * config.chunk_users
            hi = min(config.users, lo + config.chunk_users)
            tables = _user_chunk(config, catalog, np.random.default_rng(seq), lo, hi, age_bias, country_bias)
            dominant[lo:hi] = tables.pop("dominant")
            n_events += tables["events"].num_rows
            for name, table in tables.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"{name}.parquet", table.schema)
                writers[name].write_table(table)
            bar.advance(task)
        for writer in writers.values():
            writer.close()
        pairs = _pairs(config, dominant, np.random.default_rng(pairs_seq))
        pq.write_table(pairs, out / "pairs.parquet")
        bar.advance(task)
    counts = {
        "users": config.users,
        "artists": config.n_artists,
        "items": int(catalog.track_count.sum()),
        "events": n_events,
        "pairs": pairs.num_rows,
    }
    # Written last: its presence marks a complete world (see world_is_current).
    (out / "world.json").write_text(json.dumps({"config": asdict(config), "counts": counts}, indent=2))
    return counts


def true_taste(data_dir: Path, user_ids: np.ndarray, at: pd.Timestamp) -> np.ndarray | None:
    """Each user's hidden taste over ``GENRES`` at ``at`` (rows follow ``user_ids``; NaN: unknown),
    moved from the first mixture to the second as generated; None without a complete world."""
    if not (data_dir / "world.json").exists() or not (data_dir / "truth.parquet").exists():
        return None
    config = json.loads((data_dir / "world.json").read_text())["config"]
    truth = pd.read_parquet(data_dir / "truth.parquet").set_index("user_id").reindex(pd.Index(user_ids))
    start = pd.Timestamp(config["start"], tz="UTC")
    lam = truth["drift"].to_numpy() * np.clip((at - start).total_seconds() / (config["days"] * _SECONDS_PER_DAY), 0, 1)
    first, second = (truth[[f"{k}_{g}" for g in GENRES]].to_numpy() for k in ("taste0", "taste1"))
    return (1 - lam)[:, None] * first + lam[:, None] * second


def world_is_current(config: WorldConfig, out: str | Path) -> bool:
    """True when ``out`` holds a complete world generated with exactly this config."""
    marker = Path(out) / "world.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("config") == asdict(config)
    except (json.JSONDecodeError, AttributeError):
        return False


def _make_catalog(config: WorldConfig, rng: np.random.Generator) -> Catalog:
    n_genres, n_artists = len(GENRES), config.n_artists
    genre_pop = 1.0 / np.arange(1, n_genres + 1) ** 0.7
    genre_pop = rng.permutation(genre_pop / genre_pop.sum())
    artist_genre = rng.choice(n_genres, size=n_artists, p=genre_pop)
    second = rng.choice(n_genres, size=n_artists, p=genre_pop)
    artist_genre2 = np.where((rng.random(n_artists) < 0.3) & (second != artist_genre), second, -1)
    # Power-law popularity: Zipf over a random ranking of artists.
    artist_pop = 1.0 / (rng.permutation(n_artists) + 1.0) ** 1.0
    track_count = rng.geometric(1.0 / config.tracks_per_artist, size=n_artists)
    track_offset = np.concatenate([[0], np.cumsum(track_count)[:-1]])
    genre_artists, genre_cum = [], []
    for g in range(n_genres):
        members = np.flatnonzero((artist_genre == g) | (artist_genre2 == g))
        if members.size == 0:  # tiny worlds: every genre still has someone to play
            members = np.array([int(np.argmax(artist_pop))])
        cum = np.cumsum(artist_pop[members])
        genre_artists.append(members)
        genre_cum.append(cum / cum[-1])
    return Catalog(
        artist_genre, artist_genre2, artist_pop, track_offset, track_count, genre_pop, genre_artists, genre_cum
    )


def _items_table(catalog: Catalog, centroids: np.ndarray, rng: np.random.Generator) -> pa.Table:
    n_tracks = int(catalog.track_count.sum())
    track_artist = np.repeat(np.arange(len(catalog.track_count)), catalog.track_count)
    artist_offset = rng.normal(0.0, 0.5, size=(len(catalog.track_count), len(CONTENT)))
    z = centroids[catalog.artist_genre[track_artist]] + artist_offset[track_artist]
    z = z + rng.normal(0.0, 0.5, size=(n_tracks, len(CONTENT)))
    content = {f"content_{name}": 1.0 / (1.0 + np.exp(-z[:, i])) for i, name in enumerate(CONTENT)}
    content["content_tempo"] = 120.0 + 25.0 * z[:, CONTENT.index("tempo")]
    content["content_loudness"] = -9.0 + 3.0 * z[:, CONTENT.index("loudness")]
    names = np.array(GENRES, dtype=object)
    primary = names[catalog.artist_genre]
    has_second = catalog.artist_genre2 >= 0
    artist_genres = np.where(has_second, primary + "|" + names[np.maximum(catalog.artist_genre2, 0)], primary)
    return pa.table(
        {
            "item_id": _ids("t", np.arange(n_tracks), 7),
            "artist_id": _ids("a", track_artist, 6),
            "genres": pa.array(artist_genres[track_artist], pa.string()),
            **{k: pa.array(v.astype(np.float32)) for k, v in content.items()},
        }
    )


def _ids(prefix: str, index: np.ndarray, width: int) -> pa.Array:
    """Zero-padded string ids (``t0000042``), dictionary-encoded to keep memory flat."""
    uniq, inverse = np.unique(index, return_inverse=True)
    dictionary = pa.array([f"{prefix}{i:0{width}d}" for i in uniq], pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)), dictionary).cast(pa.string())


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Row-wise Dirichlet draws for a matrix of concentrations (numpy only takes one vector)."""
    draws = rng.gamma(alpha)
    draws = np.maximum(draws, 1e-12)
    return draws / draws.sum(axis=1, keepdims=True)


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (rows sum to 1)."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random((probs.shape[0], 1)) * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), probs.shape[1] - 1)


def _artists_in_genres(rng: np.random.Generator, catalog: Catalog, genres: np.ndarray) -> np.ndarray:
    """One popularity-weighted artist per genre draw."""
    out = np.empty(genres.shape, dtype=np.int64)
    flat_g, flat_out = genres.ravel(), out.ravel()
    for g in np.unique(flat_g):
        rows = np.flatnonzero(flat_g == g)
        pick = np.searchsorted(catalog.genre_cum[g], rng.random(rows.size), side="right")
        flat_out[rows] = catalog.genre_artists[g][np.minimum(pick, len(catalog.genre_artists[g]) - 1)]
    return flat_out.reshape(genres.shape)


def _user_chunk(
    config: WorldConfig,
    catalog: Catalog,
    rng: np.random.Generator,
    lo: int,
    hi: int,
    age_bias: np.ndarray,
    country_bias: np.ndarray,
) -> dict[str, pa.Table]:
    n, n_genres = hi - lo, len(GENRES)
    start = pd.Timestamp(config.start, tz="UTC")
    start_s, span_s = start.timestamp(), config.days * _SECONDS_PER_DAY

    # Demographics first, then taste drawn with a prior tilted by them.
    country = rng.choice(len(COUNTRIES), size=n, p=_normalized(1.0 / np.arange(1, len(COUNTRIES) + 1)))
    age = rng.choice(len(AGE_BUCKETS), size=n, p=[0.25, 0.32, 0.2, 0.13, 0.1])
    tilt = np.exp(config.demographic_tilt * (age_bias[age] + 0.5 * country_bias[country]))
    prior = 0.15 * n_genres * catalog.genre_pop[None, :] * tilt
    prior = prior * (0.15 * n_genres / prior.sum(axis=1, keepdims=True))  # sparse mixtures
    taste0 = _dirichlet(rng, prior)
    taste1 = _dirichlet(rng, prior)
    drift = rng.beta(0.7, 2.5, size=n)
    dominant = np.argmax(taste0, axis=1)

    # Sign-up: older users before the window, the rest uniformly during it.
    is_new = rng.random(n) < config.new_user_share
    signup = np.where(is_new, start_s + rng.random(n) * span_s, start_s - rng.random(n) * 2 * 365 * _SECONDS_PER_DAY)
    active_from = np.maximum(signup, start_s)
    rate = config.session_rate * np.exp(rng.normal(0.0, 1.0, size=n))

    # Favourite artists per taste phase, Zipf-weighted positions.
    fav = np.stack([_artists_in_genres(rng, catalog, _sample_many(rng, t, _FAVORITES)) for t in (taste0, taste1)])
    fav_weights = _normalized(1.0 / np.arange(1, _FAVORITES + 1))

    # Sessions, then plays.
    n_sessions = rng.poisson(rate * (start_s + span_s - active_from) / _SECONDS_PER_DAY)
    s_user = np.repeat(np.arange(n), n_sessions)
    s_time = active_from[s_user] + rng.random(s_user.size) * (start_s + span_s - active_from[s_user])
    s_len = rng.geometric(1.0 / config.tracks_per_session, size=s_user.size)
    p_session = np.repeat(np.arange(s_user.size), s_len)
    p_user = s_user[p_session]
    position = np.arange(p_session.size) - np.repeat(np.cumsum(s_len) - s_len, s_len)
    p_time = np.minimum(s_time[p_session] + position * 210.0, start_s + span_s - 1.0)  # ~3.5 min per track
    lam = drift[p_user] * (p_time - start_s) / span_s  # how far taste has moved at play time
    from_fav = rng.random(p_user.size) < config.favorite_share
    artist = np.empty(p_user.size, dtype=np.int64)
    f_idx = np.flatnonzero(from_fav)
    phase = (rng.random(f_idx.size) < lam[f_idx]).astype(np.int64)
    slot = rng.choice(_FAVORITES, size=f_idx.size, p=fav_weights)
    artist[f_idx] = fav[phase, p_user[f_idx], slot]
    e_idx = np.flatnonzero(~from_fav)
    mix = (1 - lam[e_idx, None]) * taste0[p_user[e_idx]] + lam[e_idx, None] * taste1[p_user[e_idx]]
    artist[e_idx] = _artists_in_genres(rng, catalog, _sample_rows(rng, mix))
    # Within an artist, early tracks are the hits (power law over track position).
    track = catalog.track_offset[artist] + np.floor(
        catalog.track_count[artist] * rng.random(artist.size) ** 2.5
    ).astype(np.int64)

    # One event per (session, track); repeats inside a session become its weight.
    key = p_session.astype(np.int64) * (int(catalog.track_count.sum()) + 1) + track
    uniq, first, weight = np.unique(key, return_index=True, return_counts=True)
    order = np.lexsort((p_time[first], p_user[first]))
    first, weight = first[order], weight[order]
    events = pa.table(
        {
            "user_id": _ids("u", lo + p_user[first], 7),
            "item_id": _ids("t", track[first], 7),
            "ts": pa.array((p_time[first] * 1e6).astype(np.int64), pa.int64()).cast(TS_TYPE),
            "weight": pa.array(weight.astype(np.float64)),
        }
    )

    onboarded = rng.random(n) < config.onboarding_share
    users = pa.table(
        {
            "user_id": _ids("u", np.arange(lo, hi), 7),
            "signup_ts": pa.array((signup * 1e6).astype(np.int64), pa.int64()).cast(TS_TYPE),
            "onboarding_artists": _onboarding_artists(config, catalog, rng, taste0, onboarded),
            "onboarding_genres": _onboarding_genres(rng, taste0, onboarded),
            "country": pa.array(np.array(COUNTRIES)[country]),
            "age_bucket": pa.array(np.array(AGE_BUCKETS)[age]),
        }
    )
    truth = {
        "user_id": users.column("user_id"),
        "dominant_genre": pa.array(np.array(GENRES)[dominant]),
        "drift": pa.array(drift),
        "session_rate": pa.array(rate),
        "is_new": pa.array(is_new),
    }
    truth.update({f"taste0_{g}": pa.array(taste0[:, i]) for i, g in enumerate(GENRES)})
    truth.update({f"taste1_{g}": pa.array(taste1[:, i]) for i, g in enumerate(GENRES)})
    return {"events": events, "users": users, "truth": pa.table(truth), "dominant": dominant}


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


def _sample_many(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    """k independent categorical draws per row -> (rows, k)."""
    return np.stack([_sample_rows(rng, probs) for _ in range(k)], axis=1)


def _top_k_without_replacement(rng: np.random.Generator, probs: np.ndarray, k: int) -> np.ndarray:
    """k distinct categories per row, drawn proportionally to probs (Gumbel top-k)."""
    keys = np.log(np.maximum(probs, 1e-12)) + rng.gumbel(size=probs.shape)
    return np.argsort(-keys, axis=1)[:, :k]


def _join_lists(names: np.ndarray, counts: np.ndarray, chosen: np.ndarray) -> pa.Array:
    """Row i -> '|'.join(names[chosen[i, :counts[i]]]); empty rows -> null."""
    text = ["|".join(dict.fromkeys(names[row[:c]])) if c else None for row, c in zip(chosen, counts)]
    return pa.array(text, pa.string())


def _onboarding_genres(rng, taste0: np.ndarray, onboarded: np.ndarray) -> pa.Array:
    counts = rng.integers(1, 4, size=onboarded.size) * onboarded
    chosen = _top_k_without_replacement(rng, taste0, 3)
    return _join_lists(np.array(GENRES, dtype=object), counts, chosen)


def _onboarding_artists(
    config: WorldConfig, catalog: Catalog, rng, taste0: np.ndarray, onboarded: np.ndarray
) -> pa.Array:
    counts = rng.integers(3, 6, size=onboarded.size) * onboarded
    chosen = _artists_in_genres(rng, catalog, _sample_many(rng, taste0, 5))
    names = np.array([f"a{i:06d}" for i in range(config.n_artists)], dtype=object)
    return _join_lists(names, counts, chosen)


def _pairs(config: WorldConfig, dominant: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Related users: mostly the same dominant genre; each unordered pair once."""
    n = dominant.size
    degree = rng.poisson(config.pairs_per_user / 2.0, size=n)
    a = np.repeat(np.arange(n), degree)
    b = np.empty_like(a)
    noisy = rng.random(a.size) < config.pair_noise
    b[noisy] = rng.integers(0, n, size=int(noisy.sum()))
    order = np.argsort(dominant, kind="stable")
    bounds = np.searchsorted(dominant[order], np.arange(len(GENRES) + 1))
    same = np.flatnonzero(~noisy)
    g = dominant[a[same]]
    lo, hi = bounds[g], bounds[g + 1]
    b[same] = order[lo + np.floor(rng.random(same.size) * (hi - lo)).astype(np.int64)]
    keep = a != b
    lo_id, hi_id = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    packed = np.unique(lo_id.astype(np.int64) * n + hi_id)
    return pa.table({"user_a": _ids("u", packed // n, 7), "user_b": _ids("u", packed % n, 7)})

"""Feature views.

`history` packs every history group (collab/content/genre/activity per window, artist shares)
into one Array(Float32) in the order of the snapshot's schema (snapshots/SPACE_ID/space.json).
One field per group reads 50x slower through Feast's file offline store: dask tokenizes object
columns by pickling every cell (`userrep features materialize` on 20k users: 261 s vs ~5 s).

`space_id` names the fitted encoders a row was computed with: vectors from different encoder
fits live in different bases, so readers check it rather than trusting a point-in-time join.
"""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float32, String

from feature_repo.data_sources import (
    user_artist_history_push,
    user_embedding_push,
    user_history_push,
    user_profile_source,
)
from feature_repo.entities import batch, user
from userrep.features import PROFILE_GROUPS

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(days=3650),
    source=user_history_push,
    online=True,
    schema=[Field(name="history", dtype=Array(Float32)), Field(name="space_id", dtype=String)],
    description="Listening-history features per window, point-in-time correct as of each snapshot.",
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=3650),
    source=user_profile_source,
    online=True,
    schema=[Field(name=g, dtype=Array(Float32)) for g in PROFILE_GROUPS] + [Field(name="space_id", dtype=String)],
    description="Onboarding picks (artists, genres) and demographics.",
)

user_embedding = FeatureView(
    name="user_embedding",
    entities=[user, batch],
    ttl=timedelta(days=3650),
    source=user_embedding_push,
    online=True,
    schema=[Field(name="embedding", dtype=Array(Float32)), Field(name="embedding_batch", dtype=String)],
    description="The general user embedding of one batch; `embedding_batch` repeats the key as a read check.",
)

user_artist_history = FeatureView(
    name="user_artist_history",
    entities=[user, batch],
    ttl=timedelta(days=3650),
    source=user_artist_history_push,
    online=True,
    schema=[
        Field(name="artists", dtype=Array(String)),
        Field(name="plays", dtype=Array(Float32)),
        Field(name="recent", dtype=Array(Float32)),
        Field(name="history_batch", dtype=String),
    ],
    description="The user's play weight of each candidate artist of one batch that the user played, and the same "
    "with the batch's recency decay: the task features its +history heads take next to the embedding.",
)

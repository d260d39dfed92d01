"""Offline tables (parquet, written by `userrep features materialize` / batch builds) and push sources.

Paths are relative to the Feast repo path (the work dir, e.g. work/feast), where the offline
tables live; the definitions themselves stay in this package.
"""

from feast import FileSource, PushSource

user_history_source = FileSource(
    name="user_history_source",
    path="data/user_history.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Window features (collab/content/genre/activity per window, artist shares) as of each snapshot.",
)

user_profile_source = FileSource(
    name="user_profile_source",
    path="data/user_profile.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Onboarding picks and demographics as of each snapshot.",
)

user_embedding_source = FileSource(
    name="user_embedding_source",
    path="data/user_embedding.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Backfilled embeddings of every batch, keyed by (user_id, batch_id).",
)

user_artist_history_source = FileSource(
    name="user_artist_history_source",
    path="data/user_artist_history.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Each user's plays of a batch's candidate artists (the task features of its +history heads), "
    "keyed by (user_id, batch_id).",
)

# Near-real-time writes (the event path pushes updated features and embeddings online).
user_history_push = PushSource(name="user_history_push", batch_source=user_history_source)
user_embedding_push = PushSource(name="user_embedding_push", batch_source=user_embedding_source)
user_artist_history_push = PushSource(name="user_artist_history_push", batch_source=user_artist_history_source)

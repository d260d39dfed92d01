"""Entities: a user, and a batch (embeddings are keyed by both, so batches can never mix)."""

from feast import Entity, ValueType

user = Entity(
    name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A listener (the contract's user_id)."
)

batch = Entity(
    name="batch",
    join_keys=["batch_id"],
    value_type=ValueType.STRING,
    description="A trained batch: encoders, embeddings and downstream models built together.",
)

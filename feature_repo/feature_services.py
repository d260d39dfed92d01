"""Feature services: the training set, and one service per batch (named after it) for its consumers."""

from feast import FeatureService

from feature_repo.features import user_artist_history, user_embedding, user_history, user_profile

training_features = FeatureService(
    name="training_features",
    features=[user_history, user_profile],
    description="Everything the autoencoder of a batch is trained on.",
)


def batch_service_name(batch_id: str) -> str:
    return f"batch_{batch_id.replace('-', '_')}"


def batch_service(batch_id: str) -> FeatureService:
    """What the downstream models of `batch_id` consume (applied when the batch registers)."""
    return FeatureService(
        name=batch_service_name(batch_id),
        features=[user_embedding, user_artist_history],
        tags={"batch_id": batch_id},
        description=f"Embeddings of batch {batch_id} and the history features its heads take.",
    )

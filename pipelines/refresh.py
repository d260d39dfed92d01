"""The refresh pipeline (daily, between retrains): no retrain, no new batch.

1. recompute every user's features as of the spec's `as_of` with the serving batch's encoders,
   embed them with its autoencoder, publish them online under the serving batch id
"""

from kfp import dsl

from components.batch import refresh_embeddings
from pipelines.k8s import on_cluster
from pipelines.training import CLUSTER_SPEC


@dsl.pipeline(name="userrep-refresh", description="Refresh the serving batch's embeddings with today's features.")
def refresh_pipeline(spec: dict = CLUSTER_SPEC):
    """`spec`: a `userrep.batch.spec.BatchSpec` as a dict (data, as_of, batch_root, feast_home, online, redis are read)."""
    on_cluster(
        refresh_embeddings(spec=spec),
        cpu="2",
        memory="4Gi",
        online_store=True,
        display_name="1. refresh embeddings (serving encoder)",
    )

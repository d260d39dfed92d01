"""The refresh pipeline (daily, between retrains): no retrain, no new batch.

1. recompute every user's features as of `as_of` with the serving batch's encoders, embed them
   with its autoencoder, publish them online under the serving batch id
"""

from kfp import dsl

from components.batch import refresh_embeddings
from pipelines.k8s import on_cluster


@dsl.pipeline(name="userrep-refresh", description="Refresh the serving batch's embeddings with today's features.")
def refresh_pipeline(
    data: str = "/work/world",
    as_of: str = "",
    batch_root: str = "/work/batches",
    feast_home: str = "/work/feast",
    online: str = "sqlite",
    redis: str = "127.0.0.1:6379",
):
    on_cluster(
        refresh_embeddings(
            data=data, as_of=as_of, batch_root=batch_root, feast_home=feast_home, online=online, redis=redis
        ),
        cpu="2",
        memory="4Gi",
        online_store=True,
        display_name="1. refresh embeddings (serving encoder)",
    )

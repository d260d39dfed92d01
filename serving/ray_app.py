"""Ray Serve application: the embedding API (serving/api.py) as a Serve deployment.

Any number of replicas: each holds the serving batch's artefacts (encoders, model, neighbour
index) and runs one logger and one consumer; the per-user state, the event log and its consumer
group are shared (SQLite embedded, Redis in the cluster; ``userrep.eventlog``), so any replica
serves any user. The RayService sets the replica count by autoscaling (k8s/).
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

from serving.api import Holder, create_app

api = create_app(Holder)


@serve.deployment(name="embeddings", num_replicas=1, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(api)
class EmbeddingService:
    def __init__(
        self,
        batch_root: str,
        feast_home: str | None,
        online: str = "sqlite",
        redis: str = "127.0.0.1:6379",
        events_log: str | None = None,
        watch_s: float = 1.0,
        max_future_s: float | None = None,
        live_previous: int | None = None,
    ):
        from serving.auth import Tokens
        from userrep.batch.registry import LIVE_PREVIOUS
        from userrep.logs import configure
        from userrep.online import MAX_FUTURE_S, OnlineService
        from userrep.store import store_config

        configure()  # a replica's lines (batch loaded, reload failed) reach Ray's worker log
        if Tokens.from_env().write is None:  # never an open write endpoint
            raise ValueError(
                "USERREP_WRITE_TOKEN_FILE or USERREP_WRITE_TOKEN: no write token; the API refuses to start"
            )

        store = store_config(feast_home, online, redis) if feast_home else None
        Holder.service = OnlineService(
            Path(batch_root),
            store,
            events_log,
            max_future_s=MAX_FUTURE_S if max_future_s is None else max_future_s,
            live_previous=LIVE_PREVIOUS if live_previous is None else int(live_previous),
        )
        Holder.service.watch(watch_s)  # reload when SERVING.json changes


def application(args: dict):
    """Serve's application builder (`import_path: serving.ray_app:application` + `args` in a
    RayService's serveConfigV2); keys: batch_root, feast_home, online, redis, events_log, watch_s,
    max_future_s (how far past the server's clock an event's ts may lie; default 1 h),
    live_previous (batches served before the serving one that stay live; default
    ``userrep.batch.registry.LIVE_PREVIOUS``), replicas
    (default 1; a serveConfigV2 ``deployments`` entry overrides it)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    return EmbeddingService.options(num_replicas=replicas).bind(
        args.pop("batch_root"), args.pop("feast_home", None), **args
    )

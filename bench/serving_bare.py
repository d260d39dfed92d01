"""The bare-FastAPI baseline for bench/serving_latency.py: the same routes and core calls as the
Ray Serve + BentoML pair, served by one plain uvicorn process (no proxy, no Serve, no BentoML)."""

import argparse
import os
from pathlib import Path

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    os.environ["USERREP_BATCH_ROOT"] = str((args.work / "batches").resolve())
    os.environ["USERREP_FEAST_HOME"] = str((args.work / "feast").resolve())

    from serving.api import Holder, create_app
    from serving.bento_service import TaskService
    from userrep.logs import configure
    from userrep.online import OnlineService
    from userrep.store import store_config

    configure()

    class BareHolder(Holder):
        service = OnlineService(
            args.work / "batches",
            store_config(args.work / "feast"),
            args.work / "online" / "bare-events.sqlite",
        )  # its log lines go to stderr (userrep.logs); stdout: the bench's JSON

    app = create_app(BareHolder)
    tasks = TaskService.inner()  # the BentoML class's own logic, called directly

    @app.post("/recommend/artists")
    def recommend(body: dict):
        return tasks.recommend_artists(**body)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

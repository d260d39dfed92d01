"""Shared fixtures: tiny datasets written on the fly, a small synthetic world, the real data."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Real datasets live beside the repo (../shared/data); never copied into it."""
    return Path(os.environ.get("USERREP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real datasets missing at {path} (set USERREP_SHARED_DATA)")
        pytest.skip(f"real datasets not found at {path} (set USERREP_SHARED_DATA)")
    return path


@pytest.fixture
def userrep_log():
    """The messages the core logs during a test (its ``userrep`` loggers), whatever the CLI configured."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("userrep"), Collect()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture
def closing_services(monkeypatch):
    """Every ``OnlineService`` a test starts is closed after it: a consumer thread left running
    would keep polling a log (or a Redis) that later tests removed, and log about it into them."""
    from userrep.online import OnlineService

    started = []
    init = OnlineService.__init__

    def tracked(self, *args, **kwargs):
        started.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(OnlineService, "__init__", tracked)
    yield
    for service in started:
        service.close()


def write_dataset(directory: Path, fmt: str = "csv", **tables: pd.DataFrame) -> Path:
    """Write each DataFrame as NAME.csv / NAME.parquet under directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        if fmt == "csv":
            frame.to_csv(directory / f"{name}.csv", index=False)
        else:
            frame.to_parquet(directory / f"{name}.parquet", index=False)
    return directory


@pytest.fixture
def tiny_tables() -> dict[str, pd.DataFrame]:
    """A valid four-table dataset small enough to reason about by hand."""
    return {
        "events": pd.DataFrame(
            {
                "user_id": ["u1", "u1", "u2", "u3"],
                "item_id": ["t1", "t2", "t2", "t3"],
                "ts": ["2026-01-01T10:00:00Z", "2026-01-02T11:00:00+02:00", "2026-01-03", "2026-01-04T00:00:00Z"],
                "weight": [1.0, 3.0, 2.0, 0.0],
            }
        ),
        "items": pd.DataFrame(
            {
                "item_id": ["t1", "t2", "t3"],
                "artist_id": ["a1", "a1", "a2"],
                "genres": ["rock|indie", "rock", "jazz"],
                "content_energy": [0.1, 0.5, None],
            }
        ),
        "users": pd.DataFrame(
            {
                "user_id": ["u1", "u2", "u3", "u4"],
                "signup_ts": ["2025-12-01", None, "2026-01-01", "2026-01-05"],
                "onboarding_artists": ["a1", None, "a2|a1", ""],
                "onboarding_genres": ["rock", None, "jazz", "rock|jazz"],
                "country": ["SE", "SE", "US", None],
            }
        ),
        "pairs": pd.DataFrame({"user_a": ["u1", "u2"], "user_b": ["u2", "u4"]}),
    }


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """1,500 users in three streamed chunks: big enough for statistics, ~1 s to make."""
    from userrep.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(users=1_500, seed=7, chunk_users=500), out, progress=False)
    return out


@pytest.fixture(scope="session")
def two_batches(small_world, tmp_path_factory) -> Path:
    """A work dir built once with a real Feast store: b1 (as of May 1) gated and serving, b2 (as of
    June 30, later data) built in b1's space (``userrep.continuity``), not gated. Each module takes its own copy (``copy_work``): they
    promote, roll back and write online."""
    from userrep.batch import registry as batches
    from userrep.batch.build import BuildConfig, build_batch
    from userrep.batch.gate import run_gate
    from userrep.data import load_dataset
    from userrep.model import AEConfig
    from userrep.store import StoreConfig

    work = tmp_path_factory.mktemp("two_batches")
    root = work / "batches"
    config = BuildConfig(ae=AEConfig(epochs=8), feast=StoreConfig(home=work / "feast"))
    build_batch(small_world, root / "b1", "2026-05-01", config, batch_id="b1")
    assert run_gate(root / "b1", None, load_dataset(small_world))["passed"]
    batches.promote(root, "b1")
    build_batch(small_world, root / "b2", "2026-06-30", config, batch_id="b2", anchor=root / "b1")
    return work


DEMO_ARGS = ["--users", "300", "--workers", "0", "--epochs", "2"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``userrep demo`` once on 300 users: the two batches through the training pipeline
    (kfp.local), then the serving smoke (both servers, started while batch 2 trains). Returns
    (work dir, its arguments, the CLI result). The demo test reads what it printed and reruns it;
    the pipeline test reads its batches and runs a failing pipeline on a copy (``copy_work``): a
    full pipeline run costs ~2 min here, so one serves both."""
    from typer.testing import CliRunner

    from userrep.cli import app

    work = tmp_path_factory.mktemp("demo")
    args = ["demo", "--work", str(work), *DEMO_ARGS]
    return work, args, CliRunner().invoke(app, args)


def copy_work(source: Path, target: Path):
    """A copy of a work dir whose batches use the copy's own Feast home, its definitions registered
    there; returns the copy's BuildConfig-ready StoreConfig."""
    import shutil

    from userrep.store import StoreConfig, open_store

    shutil.copytree(source, target)
    for record in (*target.glob("batches/*/build.json"), *target.glob("batches/*/manifest.json")):
        record.write_text(record.read_text().replace(str(source / "feast"), str(target / "feast")))
    store = StoreConfig(home=target / "feast")
    open_store(store, apply=True)  # the registry's file sources now point into the copy
    return store


def post_to_bento(root: Path, work: Path, route: str, body: dict) -> dict:
    """A real BentoML task server started on the batches under ``root`` (logs in ``work``): POST
    ``body`` as JSON to ``route``, stop the server, return the answer (a 200's)."""
    from serving.launch import start_bento, wait_ready
    from serving.smoke import call, free_port, stop

    port = free_port()
    proc = start_bento(root, None, port, work)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc=proc)
        status, answer = call(f"http://127.0.0.1:{port}{route}", body)
    finally:
        stop(proc)
    assert status == 200, (status, answer)
    return answer


def start_redis(port: int, workdir: Path):
    """A real redis-server on 127.0.0.1:port (ours, stop it by PID), its append-only file fsynced
    on every write: the production profile of the online store and the event stream."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not installed (apt-get install -y redis-server; .ci/run does it)")
    from userrep.redislog import REDIS_DURABLE_ARGS

    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *REDIS_DURABLE_ARGS, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from serving.smoke import free_port

    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)

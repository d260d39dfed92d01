"""Start both servers on 127.0.0.1 with the promoted batch: Ray Serve (embeddings, events) and
BentoML (task inference, a subprocess). Used by `userrep serve` / `make serve`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from userrep.batch.registry import LIVE_PREVIOUS

log = logging.getLogger(__name__)

SERVE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "BENTOML_DO_NOT_TRACK": "True"}
INGRESSES = ("haproxy", "serve")


def haproxy_env() -> dict:
    """Environment for Ray Serve's HAProxy ingress (Ray >= 2.55; the C proxy in front of the
    replicas instead of Serve's Python proxy: 3.2x -> 1.2x a bare FastAPI at 8 clients, serving
    README). Its defaults put the config, admin socket and server-state file in one shared
    /tmp/haproxy-serve and its stats and metrics on fixed ports, so two instances on a host
    collide (and a stale state file once failed a start here): each run gets its own."""
    from serving.smoke import free_port

    home = tempfile.mkdtemp(prefix="ur-haproxy-")  # short: the admin socket path must fit a sun_path
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{home}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{home}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": home,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{home}/server-state",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # a local stop (Ctrl-C) has no load balancer to drain from: 30 s by default, 2 s here
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def wait_ready(url: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def _die_with_parent() -> None:
    """Linux: the BentoML server gets SIGTERM if `userrep serve` dies without cleaning up (e.g. a
    second signal while Ray shuts down), so it is never orphaned."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_bento(
    root: Path, feast_home: Path | None, port: int, work: Path, live_previous: int = LIVE_PREVIOUS
) -> subprocess.Popen:
    env = {
        **os.environ,
        **SERVE_ENV,
        "USERREP_BATCH_ROOT": str(Path(root).resolve()),
        "USERREP_LIVE_PREVIOUS": str(live_previous),
        "BENTOML_HOME": str((work / "bentoml").resolve()),
        "BENTOML_CONFIG_OPTIONS": "api_server.logging.access.enabled=false",
    }
    if feast_home:
        env["USERREP_FEAST_HOME"] = str(Path(feast_home).resolve())
    bentoml = Path(sys.executable).parent / "bentoml"
    return subprocess.Popen(
        [str(bentoml), "serve", "serving.bento_service:TaskService", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def serve_forever(
    root: Path,
    feast_home: Path | None,
    port: int = 8000,
    bento_port: int = 3000,
    work: Path = Path("work"),
    stop: threading.Event | None = None,
    events_log: str | None = None,
    replicas: int = 1,
    ingress: str = "haproxy",
    live_previous: int = LIVE_PREVIOUS,
) -> None:
    """Block until SIGINT/SIGTERM (or ``stop``), then stop what was started, by PID. ``ingress``:
    "haproxy" (falls back to Serve's own proxy, said in the log, if it does not come up) or "serve".
    ``live_previous``: batches served before the serving one that both servers keep live."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress: {ingress!r}, expected one of {INGRESSES}")
    os.environ.update(SERVE_ENV)
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if not (os.environ.get("USERREP_WRITE_TOKEN") or os.environ.get("USERREP_WRITE_TOKEN_FILE")):
        from serving.auth import ensure_write_token

        # before Ray and BentoML start: their processes inherit it
        os.environ["USERREP_WRITE_TOKEN_FILE"] = str(ensure_write_token(work).resolve())
    log.info(f"writes need 'Authorization: Bearer <token>' (the write token: {_token_source()})")
    bento = start_bento(root, feast_home, bento_port, work, live_previous)
    app_args = {
        "batch_root": str(Path(root).resolve()),
        "feast_home": str(Path(feast_home).resolve()) if feast_home else None,
        "events_log": events_log,
        "replicas": replicas,
        "live_previous": live_previous,
    }  # None: the log's default place (userrep.eventlog)
    try:
        for attempt in INGRESSES[INGRESSES.index(ingress) :]:
            extra = haproxy_env() if attempt == "haproxy" else {}
            os.environ.update(extra)  # before Ray starts: its processes inherit it
            try:
                if _serve(app_args, port, bento, bento_port, attempt, stop):
                    return
            finally:
                for key in extra:
                    os.environ.pop(key, None)
                if extra:
                    shutil.rmtree(extra["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
            log.info("the HAProxy ingress did not come up; starting again with Serve's own proxy")
    finally:
        if bento.poll() is None:
            os.killpg(bento.pid, signal.SIGTERM)
            try:
                bento.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(bento.pid, signal.SIGKILL)


def _token_source() -> str:
    """Where the token comes from, never the token."""
    return os.environ.get("USERREP_WRITE_TOKEN_FILE") or "$USERREP_WRITE_TOKEN"


def _serve(
    app_args: dict, port: int, bento: subprocess.Popen, bento_port: int, ingress: str, stop: threading.Event
) -> bool:
    """One Ray session serving until ``stop``; False if the embedding API never got ready behind
    the HAProxy ingress (the caller retries with Serve's proxy)."""
    from ray import serve

    from serving.ray_app import application
    from userrep.raylocal import ray_session

    with ray_session(num_cpus=2):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(app_args), name="userrep", route_prefix="/", blocking=False)
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz")
        except TimeoutError:
            if ingress != "haproxy":
                raise
            serve.shutdown()
            return False
        wait_ready(f"http://127.0.0.1:{bento_port}/readyz", proc=bento)
        log.info(
            f"serving ({ingress} ingress): embeddings http://127.0.0.1:{port} (docs /docs), "
            f"tasks http://127.0.0.1:{bento_port}; Ctrl-C stops"
        )
        stop.wait()
        serve.shutdown()
    return True

"""Start both servers on 127.0.0.1 with the promoted batch: Ray Serve (embeddings, events) and
BentoML (task inference, a subprocess). Used by `userrep serve` / `make serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, p50 13 -> 4 ms in STACK-NOTES) is opt-in: here it
# crashed once at start-up ("Can't open global server state file"), so the default is Serve's proxy.
SERVE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "BENTOML_DO_NOT_TRACK": "True"}


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


def start_bento(root: Path, feast_home: Path | None, port: int, work: Path) -> subprocess.Popen:
    env = {**os.environ, **SERVE_ENV, "USERREP_BATCH_ROOT": str(Path(root).resolve()),
           "BENTOML_HOME": str((work / "bentoml").resolve()),
           "BENTOML_CONFIG_OPTIONS": "api_server.logging.access.enabled=false"}
    if feast_home:
        env["USERREP_FEAST_HOME"] = str(Path(feast_home).resolve())
    bentoml = Path(sys.executable).parent / "bentoml"
    return subprocess.Popen([str(bentoml), "serve", "serving.bento_service:TaskService", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def serve_forever(root: Path, feast_home: Path | None, port: int = 8000, bento_port: int = 3000,
                  work: Path = Path("work"), log=print, stop: threading.Event | None = None,
                  events_log: str | None = None, replicas: int = 1) -> None:
    """Block until SIGINT/SIGTERM (or ``stop``), then stop what was started, by PID."""
    os.environ.update(SERVE_ENV)
    from ray import serve

    from serving.ray_app import application
    from userrep.raylocal import ray_session

    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bento = start_bento(root, feast_home, bento_port, work)
    try:
        with ray_session(num_cpus=2):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(application({"batch_root": str(Path(root).resolve()),
                                   "feast_home": str(Path(feast_home).resolve()) if feast_home else None,
                                   "events_log": events_log or str((work / "online" / "events.sqlite").resolve()),
                                   "replicas": replicas}),
                      name="userrep", route_prefix="/", blocking=False)
            wait_ready(f"http://127.0.0.1:{port}/readyz")
            wait_ready(f"http://127.0.0.1:{bento_port}/readyz", proc=bento)
            log(f"serving: embeddings http://127.0.0.1:{port} (docs /docs), tasks http://127.0.0.1:{bento_port}; "
                f"Ctrl-C stops")
            stop.wait()
            serve.shutdown()
    finally:
        if bento.poll() is None:
            os.killpg(bento.pid, signal.SIGTERM)
            try:
                bento.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(bento.pid, signal.SIGKILL)

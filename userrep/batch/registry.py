"""Batch registry: list, show, promote, roll back. The serving batch is one pointer file.

A batch root (default ``work/batches``) holds one directory per batch and ``SERVING.json``:

    {"serving": "20260630-ab12cd34", "history": ["20260531-..."], "updated_at": "...",
     "pins": {"recs-team": "20260531-..."}}

Promotion writes the new pointer to a temporary file, fsyncs it and renames it over the old one
(atomic on POSIX): a reader sees the old batch or the new one, never a mix, and a crash before
the rename leaves the old batch serving. Everything a batch serves (encoders, model, embeddings,
downstream heads, neighbour index) lives in its directory, so the one rename moves all of it.
Rollback is the same rename with the previous id from ``history``.

**Live batches** (``live_batches``): the serving batch, the ``LIVE_PREVIOUS`` batches served
before it, and every batch a consumer pinned (``pin``: a downstream team whose model was trained
on that batch's embeddings declares it, ``userrep batch pin BATCH --consumer NAME``). The servers
answer reads in any live batch (``batch_id``) and apply near-real-time events to all of them;
``prune`` never removes a pinned batch. Pins live in the pointer file, changed under its lock.

Pointer changes take a lock and check the batch under it (``pointer_lock``): of two promotions at
once, the second sees the first's batch serving, not the one its gate compared against, and is
refused. Locally the lock is a file lock next to the pointer; on a cluster (``redis``: the online
store's Redis) a Redis lock, since file locks on a network volume do not hold across pods.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from userrep.batch.layout import MANIFEST, POINTER, POINTER_LOCK, BatchDir, manifest_path, read_manifest
from userrep.fsio import integrity_problems, sha256, write_json_atomic
from userrep.tasks import registry as task_registry


class BatchError(ValueError):
    """A refused batch operation (the message says why)."""


LIVE_PREVIOUS = 1  # previous batches kept live beside the serving one (``userrep serve --live-previous``)
REMOVING = ".removing-"  # a pruned batch's directory while it is deleted (hidden from listings)
LOCK_WAIT_S = 60.0  # how long a pointer change waits for another to finish
LOCK_LEASE_S = 300  # a Redis lock's expiry: a holder that died does not block promotions for ever


@contextmanager
def pointer_lock(root: str | Path, redis: str | None = None, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the batch root's pointer lock: a file lock (``filelock``) on ROOT/SERVING.lock, or
    with ``redis`` ("host:port[,password=...]", Feast's form) a Redis lock named after the root."""
    root = Path(root)
    if not root.is_dir():
        raise BatchError(f"batch_root: {root} is not a directory")
    if redis is None:
        from filelock import FileLock, Timeout

        try:
            with FileLock(root / POINTER_LOCK, timeout=wait_s):
                yield
        except Timeout:
            raise BatchError(
                f"{root / POINTER_LOCK}: another promotion or rollback held it for {wait_s:.0f}s"
            ) from None
        return
    import redis as redis_py

    address, _, options = redis.partition(",")
    host, _, port = address.partition(":")
    password = dict(o.split("=", 1) for o in options.split(",") if "=" in o).get("password")
    client = redis_py.Redis(host=host or "127.0.0.1", port=int(port or 6379), password=password)
    lock = client.lock(f"userrep:{POINTER_LOCK}:{root.resolve()}", timeout=LOCK_LEASE_S, blocking_timeout=wait_s)
    try:
        acquired = lock.acquire()
    except redis_py.exceptions.ConnectionError as exc:
        raise BatchError(f"{POINTER_LOCK}: Redis {address} unreachable ({exc})") from None
    if not acquired:
        raise BatchError(f"{POINTER_LOCK} (Redis {address}): another promotion or rollback held it for {wait_s:.0f}s")
    try:
        yield
    finally:
        lock.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_pointer(root: str | Path) -> dict:
    path = Path(root) / POINTER
    if not path.exists():
        return {"serving": None, "history": [], "updated_at": None}
    return json.loads(path.read_text())


def serving_batch(root: str | Path) -> str | None:
    return read_pointer(root)["serving"]


def _write_pointer(root: Path, pointer: dict) -> None:
    tmp = root / f".{POINTER}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(pointer, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / POINTER)  # the switch: atomic
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def batch_dir(root: str | Path, batch_id: str) -> Path:
    path = Path(root) / batch_id
    if not manifest_path(path).exists():
        known = ", ".join(b["batch_id"] for b in list_batches(root)) or "none"
        raise BatchError(f"batch_id: no finished batch {batch_id!r} under {root} (known: {known})")
    recorded = read_manifest(path)["batch_id"]
    if recorded != batch_id:  # the pointer names directories; they must be the batch's own id
        raise BatchError(f"batch_id: directory {path} holds batch {recorded!r}; a batch lives in ROOT/<its id>")
    return path


def state(root: str | Path, batch_id: str) -> str:
    """serving | previous (a rollback target) | failed | rejected | gated | candidate (no gate yet) |
    incomplete (models missing)."""
    path = Path(root) / batch_id
    pointer = read_pointer(root)
    if pointer["serving"] == batch_id:
        return "serving"
    if batch_id in pointer["history"]:
        return "previous"
    if BatchDir(path).failed.exists():
        return "failed"
    gate = BatchDir(path).gate
    if gate.exists():
        return "gated" if json.loads(gate.read_text())["passed"] else "rejected"
    return "incomplete" if missing_tasks(path) else "candidate"


def list_batches(root: str | Path) -> list[dict]:
    rows, pinned = [], consumers(read_pointer(root))
    for path in sorted(Path(root).glob(f"*/{MANIFEST}")):
        if path.parent.name.startswith("."):  # a batch being removed (``prune``), or other tooling's
            continue
        manifest = json.loads(path.read_text())
        rows.append(
            {
                "batch_id": manifest["batch_id"],
                "as_of": manifest["as_of"],
                "created_at": manifest["created_at"],
                "users": manifest["users"],
                "state": state(root, path.parent.name),
                "pinned_by": pinned.get(manifest["batch_id"], []),
            }
        )
    return rows


def show(root: str | Path, batch_id: str) -> dict:
    path = batch_dir(root, batch_id)
    out = {
        "batch_id": batch_id,
        "state": state(root, batch_id),
        "path": str(path),
        "manifest": read_manifest(path),
        "missing_tasks": missing_tasks(path),
        "pinned_by": consumers(read_pointer(root)).get(batch_id, []),
    }
    for key, record in (("gate", BatchDir(path).gate), ("failed", BatchDir(path).failed)):
        if record.exists():
            out[key] = json.loads(record.read_text())
    if BatchDir(path).rollout_report.exists():
        out["rollout_report"] = str(BatchDir(path).rollout_report)
    out["downstream"] = {
        p.stem: json.loads(p.read_text())["metrics"] for p in sorted(BatchDir(path).downstream.glob("*.json"))
    }
    return out


def mark_failed(root: str | Path, batch_id: str, reason: str) -> None:
    """A failed candidate can never be promoted (the pipeline's exit handler calls this)."""
    path = Path(root) / batch_id
    path.mkdir(parents=True, exist_ok=True)
    BatchDir(path).failed.write_text(json.dumps({"reason": reason, "at": _now()}, indent=2))


def promote(root: str | Path, batch_id: str, redis: str | None = None) -> dict:
    """Switch serving to ``batch_id`` if it is complete, intact and passed its gate against the
    batch serving now (checked under the pointer lock; ``redis``: see ``pointer_lock``)."""
    with pointer_lock(root, redis):
        return _promote(Path(root), batch_id)


def _promote(root: Path, batch_id: str) -> dict:
    path = batch_dir(root, batch_id)
    pointer = read_pointer(root)
    if pointer["serving"] == batch_id:
        raise BatchError(f"batch_id: {batch_id} is already serving")
    if BatchDir(path).failed.exists():
        raise BatchError(
            f"batch_id: {batch_id} is marked failed: {json.loads(BatchDir(path).failed.read_text())['reason']}"
        )
    missing = missing_tasks(path)
    if missing:
        raise BatchError(f"batch_id: {batch_id} lacks downstream model(s) {', '.join(missing)}")
    if not BatchDir(path).gate.exists():
        raise BatchError(f"batch_id: {batch_id} has no gate decision (run `userrep batch gate {batch_id}`)")
    gate = json.loads(BatchDir(path).gate.read_text())
    if not gate["passed"]:
        raise BatchError(f"batch_id: the gate rejected {batch_id}: " + "; ".join(gate["reasons"]))
    if gate["serving"] != pointer["serving"]:
        raise BatchError(
            f"batch_id: {batch_id} was gated against {gate['serving']}, but {pointer['serving']} "
            f"is serving now; gate it again"
        )
    changed = integrity_problems(path)
    if changed:
        raise BatchError(f"batch_id: files of {batch_id} changed since its manifest: {', '.join(changed)}")
    history = pointer["history"] + ([pointer["serving"]] if pointer["serving"] else [])
    new = {"serving": batch_id, "history": history, "updated_at": _now(), "pins": pins_of(pointer)}
    _write_pointer(root, new)
    return new


def rollback(root: str | Path, redis: str | None = None) -> dict:
    """Serve the previous batch again (one step), under the pointer lock."""
    with pointer_lock(root, redis):
        return _rollback(Path(root))


def _rollback(root: Path) -> dict:
    pointer = read_pointer(root)
    if not pointer["history"]:
        raise BatchError("rollback: no previous batch to return to")
    previous = pointer["history"][-1]
    batch_dir(root, previous)
    new = {
        "serving": previous,
        "history": pointer["history"][:-1],
        "updated_at": _now(),
        "rolled_back_from": pointer["serving"],
        "pins": pins_of(pointer),
    }
    _write_pointer(root, new)
    return new


# ---------------------------------------------------------------------------------------------
# live batches and consumers' pins


def pins_of(pointer: dict) -> dict[str, str]:
    """consumer -> the batch it declared it is on."""
    return dict(pointer.get("pins") or {})


def live_batches(pointer: dict, previous: int = LIVE_PREVIOUS) -> list[str]:
    """The batches the servers answer in and apply events to: the serving one first, then the
    ``previous`` served before it (newest first), then the pinned ones; none without a serving one."""
    if pointer["serving"] is None:
        return []
    recent = pointer["history"][::-1][: max(previous, 0)]
    return list(dict.fromkeys([pointer["serving"], *recent, *sorted(set(pins_of(pointer).values()))]))


def consumers(pointer: dict) -> dict[str, list[str]]:
    """batch id -> the consumers pinned to it."""
    out: dict[str, list[str]] = {}
    for consumer, batch_id in sorted(pins_of(pointer).items()):
        out.setdefault(batch_id, []).append(consumer)
    return out


CONSUMER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def pin(root: str | Path, batch_id: str, consumer: str, redis: str | None = None) -> dict:
    """Declare that ``consumer`` is on ``batch_id`` (the serving batch or one served before): the
    batch stays live and is never pruned until the consumer moves (``pin`` again) or ``unpin``s."""
    if not consumer or len(consumer) > 128 or set(consumer) - CONSUMER_CHARS:
        raise BatchError(f"consumer: expected 1-128 letters, digits, '.', '_' or '-', got {consumer!r}")
    root = Path(root)
    with pointer_lock(root, redis):
        batch_dir(root, batch_id)
        pointer = read_pointer(root)
        if batch_id != pointer["serving"] and batch_id not in pointer["history"]:
            raise BatchError(
                f"batch_id: {batch_id} has not served ({state(root, batch_id)}); a consumer pins the serving "
                f"batch ({pointer['serving']}) or one served before it"
            )
        new = {**pointer, "pins": {**pins_of(pointer), consumer: batch_id}, "updated_at": _now()}
        _write_pointer(root, new)
    return new


def unpin(root: str | Path, consumer: str, redis: str | None = None) -> dict:
    """``consumer`` is on no batch any more (its batch leaves the live set unless another holds it)."""
    root = Path(root)
    with pointer_lock(root, redis):
        pointer = read_pointer(root)
        pins = pins_of(pointer)
        if consumer not in pins:
            raise BatchError(f"consumer: {consumer!r} has no pin (pinned: {', '.join(sorted(pins)) or 'none'})")
        del pins[consumer]
        new = {**pointer, "pins": pins, "updated_at": _now()}
        _write_pointer(root, new)
    return new


def prune(root: str | Path, keep: int, on_remove=None, redis: str | None = None) -> dict:
    """Remove all but the ``keep`` newest finished batches (by ``created_at``), never the serving
    one, the one a rollback returns to or one a consumer pinned; removed ids leave the pointer's history. ``on_remove``
    (batch dir) is called before each directory goes (the online rows: ``userrep batch prune``).
    Returns the removed and kept ids."""
    if keep < 0:
        raise BatchError(f"keep: expected 0 or more, got {keep}")
    root = Path(root)
    with pointer_lock(root, redis):
        pointer = read_pointer(root)
        protected = {pointer["serving"], *pointer["history"][-1:], *pins_of(pointer).values()} - {None}
        newest = sorted(list_batches(root), key=lambda row: row["created_at"], reverse=True)
        removed = [row["batch_id"] for row in newest[keep:] if row["batch_id"] not in protected]
        for leftover in root.glob(f"{REMOVING}*"):  # a prune that died while deleting
            shutil.rmtree(leftover)
        for batch_id in removed:
            if on_remove is not None:
                on_remove(root / batch_id)
            trash = root / f"{REMOVING}{batch_id}"  # out of every listing at once, then deleted
            os.replace(root / batch_id, trash)
            shutil.rmtree(trash)
        if set(removed) & set(pointer["history"]):
            history = [b for b in pointer["history"] if b not in removed]
            _write_pointer(root, {**pointer, "history": history, "updated_at": _now()})
    return {"removed": removed, "kept": [row["batch_id"] for row in newest if row["batch_id"] not in removed]}


# ---------------------------------------------------------------------------------------------
# task records: a batch's downstream models, each registered by its record (written last)


def register_task(batch_dir: str | Path, task: str, record: dict) -> dict:
    """Write a task's record (its files' hashes, metrics) last: a task without it is not done."""
    record = {**record, "trained_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json_atomic(BatchDir(batch_dir).task_record(task), record)
    return record


def batch_tasks(batch_dir: str | Path) -> list[str]:
    """The downstream tasks a batch is built with: those registered when it was fitted (its build
    record keeps them), else every registered one."""
    record = BatchDir(batch_dir).build_record
    found = json.loads(record.read_text()).get("tasks") if record.exists() else None
    return list(found) if found is not None else list(task_registry.names())


def skipped_tasks(batch_dir: str | Path) -> dict[str, str]:
    """Tasks registered as skipped (too little data), with the reason."""
    records = {task: BatchDir(batch_dir).task_record(task) for task in batch_tasks(batch_dir)}
    return {
        task: reason
        for task, path in records.items()
        if path.exists() and (reason := json.loads(path.read_text()).get("skipped"))
    }


def missing_tasks(batch_dir: str | Path) -> list[str]:
    """The batch's tasks without a registration record, or whose files are gone or changed since."""
    out = BatchDir(batch_dir).downstream
    missing = []
    for task in batch_tasks(batch_dir):
        record_path = BatchDir(batch_dir).task_record(task)
        if not record_path.exists():
            missing.append(task)
            continue
        record = json.loads(record_path.read_text())
        if any(not (out / name).exists() or sha256(out / name) != digest for name, digest in record["files"].items()):
            missing.append(task)
    return missing


def served_tasks(batch_dir: str | Path) -> list[str]:
    """The batch's tasks with a model (registered, not skipped): what its consumers can call."""
    skipped = skipped_tasks(batch_dir)
    return [
        task
        for task in batch_tasks(batch_dir)
        if BatchDir(batch_dir).task_record(task).exists() and task not in skipped
    ]

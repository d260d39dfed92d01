"""The production event log: one Redis stream (XADD, consumer groups, per-user state keys). Run the
server with ``REDIS_DURABLE_ARGS``. The semantics every backend shares are in ``userrep.eventlog``."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from userrep.erasure import event_ids_of, id_hash, record_users, scrub, scrub_entries

DEFAULT_STREAM = "userrep:events"
# What a redis-server holding the stream must run with (every write on disk before its reply);
# the tests and benches start it so, and k8s/ configures the same.
REDIS_DURABLE_ARGS = ("--appendonly", "yes", "--appendfsync", "always")


# Atomic dedupe + append: KEYS[1] = stream; ARGV = ttl, key prefix, then (event_id or "", json) pairs.
_APPEND_EVENTS = """
local fresh, duplicates = {}, {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if id == "" or redis.call("SET", ARGV[2] .. id, "1", "NX", "EX", ARGV[1]) then
    table.insert(fresh, ARGV[i + 1])
  else
    table.insert(duplicates, (i - 1) / 2 - 1)
  end
end
local position = false
if #fresh > 0 then
  position = redis.call("XADD", KEYS[1], "*", "record", '{"kind": "events", "events": [' .. table.concat(fresh, ", ") .. "]}")
end
return {position, duplicates}
"""


class RedisStreamLog:
    """One Redis stream plus, per batch, a consumer group and one state key per user."""

    blocks = True  # ``deliver`` waits up to ``block_ms`` for a new record

    def __init__(self, url: str, event_id_ttl_s: float):
        self.event_id_ttl_s = event_id_ttl_s
        import redis

        parsed = urlparse(url)
        password = parse_qs(parsed.query).get("password", [None])[0] or os.environ.get("REDIS_PASSWORD")
        if not password and os.environ.get("REDIS_PASSWORD_FILE"):  # a mounted Kubernetes Secret
            password = Path(os.environ["REDIS_PASSWORD_FILE"]).read_text().strip()
        self.stream = parsed.path.lstrip("/") or DEFAULT_STREAM
        # Any: redis-py types every sync command as ``Awaitable | Any`` (its client may be async).
        self.client: Any = redis.Redis(host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, password=password)
        self.where = f"redis://{parsed.hostname}:{parsed.port or 6379}/{self.stream}"
        self.channel = f"{self.stream}:applied"  # pub/sub: each commit publishes its batch here (follow)
        self._append_events = self.client.register_script(_APPEND_EVENTS)

    def _key(self, *parts) -> str:
        return ":".join([self.stream, *map(str, parts)])

    # -- the log -------------------------------------------------------------------------
    def append(self, record: dict) -> str:
        return self.client.xadd(self.stream, {"record": json.dumps(record)}).decode()

    def append_events(self, events: list[dict]) -> tuple[str | None, list[int]]:
        args: list = [self.event_id_ttl_s, self._key("event_id", "")]
        for event in events:
            args += [event.get("event_id") or "", json.dumps(event)]
        position, duplicates = self._append_events(keys=[self.stream], args=args)
        return (position.decode() if position else None), [int(i) for i in duplicates]

    def read(self, after=None, upto=None, batch: int = 1000):
        start = "-" if after is None else f"({after}"
        while True:
            entries = self.client.xrange(self.stream, min=start, max=upto or "+", count=batch)
            yield from scrub_entries([(i.decode(), json.loads(f[b"record"])) for i, f in entries], self.erased)
            if len(entries) < batch:
                return
            start = f"({entries[-1][0].decode()}"

    def last(self):
        entries = self.client.xrevrange(self.stream, count=1)
        return entries[0][0].decode() if entries else None

    @staticmethod
    def key(position) -> tuple:
        if position is None:
            return (0, 0)
        ms, _, seq = str(position).partition("-")
        return int(ms), int(seq or 0)

    # -- per batch: shared state and consumer group ---------------------------------------
    def lock(self, batch: str):
        return self.client.lock(self._key("lock", batch), timeout=900, blocking_timeout=900)

    def ready(self, batch: str):
        value = self.client.get(self._key("ready", batch))
        return None if value is None else value.decode()

    def bootstrap(self, batch: str, blobs: dict[str, bytes], position) -> None:
        import redis

        self.drop(batch)
        items = list(blobs.items())
        for at in range(0, len(items), 2000):
            with self.client.pipeline(transaction=False) as pipe:
                for user, blob in items[at : at + 2000]:
                    pipe.set(self._key("state", batch, user), blob)
                pipe.execute()
        start = position or "0-0"
        try:
            self.client.xgroup_create(self.stream, f"apply:{batch}", id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            self.client.xgroup_setid(self.stream, f"apply:{batch}", start)
        self.client.set(self._key("ready", batch), start)  # last: a crash before it bootstraps again

    def load(self, batch: str, users) -> dict[str, bytes]:
        users = list(users)
        values = self.client.mget([self._key("state", batch, u) for u in users]) if users else []
        return {u: v for u, v in zip(users, values) if v is not None}

    def deliver(self, batch: str, consumer: str, count: int, idle_ms: int, block_ms: int = 50) -> list[tuple]:
        group = f"apply:{batch}"
        got = []
        for _, entries in self.client.xreadgroup(group, consumer, {self.stream: "0"}, count=count) or []:
            got += entries  # this consumer's own unfinished records (a failed commit)
        if len(got) < count:
            got += self.client.xautoclaim(self.stream, group, consumer, idle_ms, "0-0", count=count - len(got))[1]
        if not got:
            for _, entries in (
                self.client.xreadgroup(group, consumer, {self.stream: ">"}, count=count, block=block_ms) or []
            ):
                got += entries
        return scrub_entries([(i.decode(), json.loads(f[b"record"]) if f else None) for i, f in got], self.erased)

    def commit(self, batch: str, positions: list, work) -> list:
        import redis

        marks = [self._key("applied", batch, p) for p in positions]
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*marks)  # another consumer applying one of them first aborts this one
                    todo = [p for p, flag in zip(positions, pipe.mget(marks)) if flag is None]

                    def load(users):
                        keys = [self._key("state", batch, u) for u in users]
                        pipe.watch(*marks, *keys)
                        return {u: v for u, v in zip(users, pipe.mget(keys)) if v is not None}

                    blobs = work(todo, load) if todo else {}
                    pipe.multi()
                    for user, blob in blobs.items():
                        pipe.set(self._key("state", batch, user), blob)
                    for p in todo:
                        pipe.set(self._key("applied", batch, p), 1, ex=self.event_id_ttl_s)
                    pipe.xack(self.stream, f"apply:{batch}", *positions)
                    pipe.publish(self.channel, batch)  # wakes the waiters of every replica (follow)
                    pipe.execute()
                    return todo
                except redis.WatchError:
                    continue  # a user or a record changed under us: read again

    def follow(self, notify, stopped: threading.Event) -> None:
        """Call ``notify()`` when any consumer commits (its PUBLISH); returns once ``stopped`` is
        set. A lost connection (Redis restarting) is opened again; the waiters poll meanwhile."""
        import redis

        while not stopped.is_set():
            try:
                with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(self.channel)
                    while not stopped.is_set():
                        if pubsub.get_message(timeout=0.5) is not None:
                            notify()
            except redis.RedisError:  # a restart, a timeout: subscribe again
                stopped.wait(0.5)

    def applied(self, batch: str, positions) -> bool:
        positions = list(positions)
        return self.client.exists(*[self._key("applied", batch, p) for p in positions]) == len(positions)

    def _groups(self) -> list[dict]:
        """XINFO GROUPS of the batches' consumer groups (none before the stream exists)."""
        import redis

        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return []
        return [g for g in groups if g["name"].decode().startswith("apply:")]

    def batches(self) -> list[str]:
        return [g["name"].decode().removeprefix("apply:") for g in self._groups()]

    def drop(self, batch: str) -> None:
        import redis

        self.client.delete(self._key("ready", batch))
        with contextlib.suppress(redis.ResponseError):
            self.client.xgroup_destroy(self.stream, f"apply:{batch}")
        for pattern in (self._key("state", batch, "*"), self._key("applied", batch, "*")):
            keys = list(self.client.scan_iter(match=pattern, count=5000))
            for at in range(0, len(keys), 5000):
                self.client.delete(*keys[at : at + 5000])

    # -- erasure (userrep.erasure) -------------------------------------------------------
    def erase(self, hashes: dict[str, str]) -> None:
        """Record erased users (id hash -> time): every read leaves them out from now on."""
        with self.client.pipeline() as pipe:
            for digest, at in hashes.items():
                pipe.hsetnx(self._key("erased"), digest, at)
            pipe.execute()

    def erased(self, users) -> set[str]:
        """The ids of ``users`` that were erased."""
        users = [str(u) for u in users]
        if not users:
            return set()
        found = self.client.hmget(self._key("erased"), [id_hash(u) for u in users])
        return {u for u, at in zip(users, found) if at is not None}

    def forget(self, users, event_ids=()) -> dict:
        """Remove ``users``' state in every batch, their remembered event ids (in the stream and
        ``event_ids``) and the stream's records naming only them. A stream entry cannot be
        rewritten: one shared with other users' events stays until retention trims it
        (``records_left``), and every read leaves the erased users out of it."""
        users, event_ids = {str(u) for u in users}, set(event_ids)
        doomed, left, start = [], 0, "-"
        while True:  # raw entries: ``read`` would hide the users this looks for
            entries = self.client.xrange(self.stream, min=start, count=1000)
            for entry_id, fields in entries:
                record = json.loads(fields[b"record"])
                if users & set(record_users(record)):
                    event_ids.update(event_ids_of(record, users))
                    if (scrub(record, users) or {}).get("events"):
                        left += 1
                    else:
                        doomed.append(entry_id)
            if len(entries) < 1000:
                break
            start = f"({entries[-1][0].decode()}"
        for at in range(0, len(doomed), 5000):
            self.client.xdel(self.stream, *doomed[at : at + 5000])
        states = self._delete([self._key("state", batch, u) for batch in self.batches() for u in sorted(users)])
        self._delete([self._key("event_id", e) for e in sorted(event_ids)])
        return {"records_removed": len(doomed), "records_rewritten": 0, "records_left": left, "states": states}

    def _delete(self, keys: list[str]) -> int:
        return sum(self.client.delete(*keys[at : at + 5000]) for at in range(0, len(keys), 5000))

    # -- retention -----------------------------------------------------------------------
    def retained_from(self):
        value = self.client.get(self._key("trimmed"))
        return None if value is None else value.decode()

    def trim(self, through):
        bounds = [through]
        for info in self._groups():
            bound = info["last-delivered-id"].decode()
            pending = self.client.xpending(self.stream, info["name"])
            if pending["pending"]:
                ms, seq = self.key(pending["min"].decode())
                bound = min(bound, f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{(1 << 64) - 1}", key=self.key)
            bounds.append(bound)
        bound = min(bounds, key=self.key)
        doomed = [p for p, record in self.read(upto=bound) if record["kind"] == "events"]  # sign-ups stay
        for at in range(0, len(doomed), 5000):
            self.client.xdel(self.stream, *doomed[at : at + 5000])
        previous = self.retained_from()
        self.client.set(self._key("trimmed"), max(bound, previous or "0-0", key=self.key))
        return bound

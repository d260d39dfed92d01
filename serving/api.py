"""The HTTP API of the embedding service (FastAPI): routes, validation, error mapping.

Plain FastAPI over ``userrep.online.OnlineService``: Ray Serve mounts it as its ingress
(serving/ray_app.py) and the latency bench serves the same app with bare uvicorn.
Every response carries the ``batch_id`` it was computed in and an ``X-Batch-Id`` header; reads
take an optional ``batch_id`` (a live batch: the serving one, the previous ones kept live, a
pinned one; 410 for a batch that is not live, 404 for none); bad input is a 4xx naming the
field, never a traceback. Writes (``POST /events``, ``POST /users``) need the
write token, reads the read token if one is set (``serving.auth``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

MAX_BODY = 1 << 20  # bytes
MAX_EVENTS = 1000


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The client's idempotency key: an event_id accepted before is acknowledged, never applied twice.
    event_id: str | None = Field(default=None, min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    ts: datetime
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=256)
    onboarding_artists: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default=[], max_length=100)
    onboarding_genres: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default=[], max_length=100)
    attributes: dict[str, str] = Field(default={}, max_length=50)


# a read's batch: default the serving one (an id is a directory name: no path characters)
BATCH_ID = Annotated[str | None, Query(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]


class Holder:
    """Where the routes find the service (set by the Ray Serve replica or the bench)."""

    service = None


def _reply(body: dict, status: int = 200) -> JSONResponse:
    batch_id = body.get("batch_id")
    return JSONResponse(body, status_code=status, headers={"X-Batch-Id": batch_id} if batch_id else None)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "path", "query")]
    return ".".join(parts) or "body"


class BodyLimit:
    """413 for a declared body over MAX_BODY. Plain ASGI rather than ``@app.middleware("http")``:
    Starlette's BaseHTTPMiddleware runs every request through an extra task and stream pair,
    which cost a GET about 0.4 ms here (serving README, reads)."""

    def __init__(self, app, batch_id):
        self.app, self.batch_id = app, batch_id

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY:
                reply = _reply(
                    {"error": f"body: {int(length)} bytes, at most {MAX_BODY}", "batch_id": self.batch_id()}, 413
                )
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(holder: type[Holder] | Holder = Holder) -> FastAPI:
    """The API; bearer tokens from the environment (``serving.auth``): none set, nothing is asked."""
    from serving.auth import BearerAuth
    from userrep.erasure import ErasedUser
    from userrep.online import NotApplied, NotLive, UnknownUser

    api = FastAPI(
        title="userrep embeddings",
        version="0.1.0",
        description="General user embeddings of the promoted batch; near-real-time updates.",
    )

    def batch_id() -> str | None:
        return holder.service.batch.batch_id if holder.service and holder.service.batch else None

    api.add_middleware(BodyLimit, batch_id=batch_id)
    api.add_middleware(BearerAuth)  # added last, runs first: a refused request's body is never read

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return _reply({"error": text, "errors": errors[:20], "batch_id": batch_id()}, 422)

    @api.exception_handler(UnknownUser)
    async def unknown(request: Request, exc: UnknownUser):
        return _reply(
            {
                "error": f"user_id: unknown user {exc.args[0]!r}",
                "hint": "register new users with POST /users first",
                "batch_id": batch_id(),
            },
            404,
        )

    @api.exception_handler(ErasedUser)
    async def erased(request: Request, exc: ErasedUser):
        return _reply(
            {"error": f"user_id: {exc.args[0]!r} was erased; an erased id is not used again", "batch_id": batch_id()},
            410,
        )

    @api.exception_handler(NotLive)
    async def not_live(request: Request, exc: NotLive):
        return _reply({"error": str(exc), "live": exc.live, "batch_id": batch_id()}, 410 if exc.known else 404)

    @api.exception_handler(NotApplied)
    async def not_applied(request: Request, exc: NotApplied):  # durable: a retry (same event_ids) is a duplicate
        return _reply({"error": str(exc), "durable": True, "batch_id": batch_id()}, 504)

    @api.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError):
        return _reply({"error": str(exc.args[0] if exc.args else exc), "batch_id": batch_id()}, 422)

    @api.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # never a traceback in a response
        return _reply(
            {"error": f"internal error ({type(exc).__name__}); see the server log", "batch_id": batch_id()}, 500
        )

    @api.get("/healthz")
    def healthz():
        return _reply({"status": "ok", "batch_id": batch_id()})

    @api.get("/readyz")
    def readyz():
        ready = batch_id() is not None
        return _reply({"status": "ready" if ready else "loading", "batch_id": batch_id()}, 200 if ready else 503)

    # async: the read runs on the event loop. It is one sub-millisecond online-store lookup, and the
    # threadpool hop of a plain `def` cost more than the read: 8 clients, bare server, p50 / p99
    # 8.7 / 16.0 ms in the pool vs 6.1 / 8.1 ms inline (serving README, reads).
    @api.get("/users/{user_id}/embedding")
    async def get_embedding(user_id: Annotated[str, Field(max_length=256)], batch_id: BATCH_ID = None):
        return _reply(holder.service.embedding(user_id, batch_id))

    @api.get("/users/{user_id}/similar")
    def similar(user_id: str, k: Annotated[int, Query(ge=1, le=1000)] = 10, batch_id: BATCH_ID = None):
        return _reply(holder.service.similar(user_id, k, batch_id))

    events_adapter = TypeAdapter(list[Event])

    @api.post(
        "/events",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [Event.model_json_schema(), {"type": "array", "items": Event.model_json_schema()}]
                        }
                    }
                }
            }
        },
    )
    async def post_events(request: Request, wait: Annotated[bool, Query()] = False):
        """One event or a list of events. 202 once they are durable (their `event_ids`); with
        `?wait=true`, 200 once they are applied and the users' new embeddings are written online
        (returned; 504 if that takes longer than 30 s: the events are durable and will apply).
        An event whose `event_id` was accepted before is acknowledged (`duplicates`)
        and not applied again; a `ts` later than the server's clock plus its allowed skew (1 h) is
        a 422 naming it."""
        try:
            raw = json.loads(await request.body())
        except ValueError as exc:
            raise ValueError(f"body: not valid JSON ({exc})") from None
        raw = [raw] if isinstance(raw, dict) else raw
        if not isinstance(raw, list) or not raw or len(raw) > MAX_EVENTS:
            raise ValueError(f"events: send one event object or a list of 1 to {MAX_EVENTS}")
        try:
            events = events_adapter.validate_python(raw)
        except ValidationError as exc:
            errors = [
                {"field": f"events[{e['loc'][0]}]." + ".".join(map(str, e["loc"][1:])), "message": e["msg"]}
                for e in exc.errors()
            ]
            text = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
            return _reply({"error": text, "errors": errors[:20], "batch_id": batch_id()}, 422)
        rows = [
            {
                "event_id": e.event_id,
                "user_id": e.user_id,
                "item_id": e.item_id,
                "weight": e.weight,
                "ts": (e.ts if e.ts.tzinfo else e.ts.replace(tzinfo=UTC)).isoformat(),
            }
            for e in events
        ]
        reply = await run_in_threadpool(holder.service.post_events, rows, wait)
        return _reply(reply, 200 if wait else 202)

    @api.post("/users", status_code=201)
    def post_user(user: NewUser):
        body = holder.service.register_user(
            user.user_id, user.onboarding_artists, user.onboarding_genres, user.attributes
        )
        return _reply(body, 201)

    return api

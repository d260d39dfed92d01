"""Bearer tokens for both servers: a write needs the write token; a read needs the read token
when one is set (the write token reads too). Probes and the API docs stay open.

Tokens come from a file (``USERREP_WRITE_TOKEN_FILE``, ``USERREP_READ_TOKEN_FILE``: a mounted
Kubernetes Secret, as the chart does) or the environment (``USERREP_WRITE_TOKEN``,
``USERREP_READ_TOKEN``), read once when a server starts (a new token needs a restart). `userrep
serve` makes a write token in WORK/secrets/ when none is given. Comparisons are constant-time
(``hmac.compare_digest``) and no token is ever logged or put in a reply.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

WRITE_TOKEN_FILE = Path("secrets") / "write.token"  # under the work dir (`userrep serve`)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/docs", "/docs.json", "/openapi.json", "/metrics", "/"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Tokens:
    write: str | None = None
    read: str | None = None  # None: reads are open

    @classmethod
    def from_env(cls) -> Tokens:
        return cls(_token("USERREP_WRITE_TOKEN"), _token("USERREP_READ_TOKEN"))

    def refusal(self, authorization: str | None, write: bool) -> tuple[int, str] | None:
        """None if a request with this ``Authorization`` header may go on; else (status, message)."""
        wanted = [self.write] if write else [self.write, self.read] if self.read else []
        wanted = [t for t in wanted if t]
        if not wanted:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            kind = "write" if write else "read"
            return 401, f"authorization: send 'Authorization: Bearer <token>' (a {kind} token)"
        ok = False
        for token in wanted:  # every candidate compared, whichever matches: no early exit to time
            ok |= hmac.compare_digest(given.strip().encode(), token.encode())
        return None if ok else (403, "authorization: this token may not " + ("write" if write else "read"))


def _token(name: str) -> str | None:
    path = os.environ.get(f"{name}_FILE")
    if path and not Path(path).is_file():
        raise ValueError(f"{name}_FILE: {path}: no such file")
    value = Path(path).read_text().strip() if path else os.environ.get(name, "").strip()
    if (path or os.environ.get(name) is not None) and not value:
        raise ValueError(f"{name}{'_FILE' if path else ''}: the token is empty")
    return value or None


def ensure_write_token(work: Path) -> Path:
    """WORK/secrets/write.token, made (random, mode 0600) unless it exists; its path."""
    path = Path(work) / WRITE_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # two starts never make two
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32))
    return path


def client_token(work: Path) -> str:
    """The write token a client of `userrep serve --work WORK` sends (the environment's, or the
    one `userrep serve` made)."""
    return Tokens.from_env().write or (Path(work) / WRITE_TOKEN_FILE).read_text().strip()


class BearerAuth:
    """ASGI middleware for both servers (FastAPI's ``add_middleware``, BentoML's
    ``add_asgi_middleware``). ``all_reads``: every route only reads, whatever its method (BentoML's
    inference endpoints are POSTs). Plain ASGI, like serving/api.py's ``BodyLimit``."""

    def __init__(self, app, all_reads: bool = False, tokens: Tokens | None = None):
        self.app, self.all_reads, self.tokens = app, all_reads, tokens or Tokens.from_env()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        write = not self.all_reads and scope["method"] not in READ_METHODS
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        refused = self.tokens.refusal(header, write)
        if refused is None:
            return await self.app(scope, receive, send)
        status, message = refused
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="userrep"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})

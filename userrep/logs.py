"""Logging's one configuration point. The library only logs (``logging.getLogger(__name__)``);
whatever runs it (the CLI, a pipeline step, a cluster job, the servers) calls `configure` once.

Messages go to standard error as written, so a command's output on stdout (``userrep embed``'s
JSON lines) stays clean when piped; a terminal, a step's log in the KFP UI and the servers' log
files show both. Warnings and errors carry their level. Set ``USERREP_LOG_LEVEL=DEBUG`` (or WARNING) to change
how much is said.
"""

from __future__ import annotations

import logging
import os
import sys

# Our packages' loggers (``logging.getLogger(__name__)`` in each module): the ones configured here.
OURS = ("userrep", "serving", "pipelines", "components")
# Third-party loggers that say INFO lines a user does not act on, at the level where they help.
QUIET = {"ray": logging.WARNING, "faiss.loader": logging.WARNING, "feast": logging.WARNING, "urllib3": logging.WARNING}


class CurrentStream(logging.StreamHandler):
    """Writes to ``sys.stderr`` (or ``sys.stdout``) as it is when a record is emitted, not as it was
    when configured: a CLI run inside a test runner (or a redirected step) swaps it, and a handler
    that kept the old, closed stream would turn every later record into a "Logging error"."""

    def __init__(self, name: str = "stderr"):
        self.name_of_stream = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure(level: str | int | None = None) -> None:
    """Send our packages' records (`OURS`) to stderr at ``level`` (default: ``USERREP_LOG_LEVEL``
    or INFO) and quiet the noisy third-party ones. Calling it again replaces the handler."""
    level = level or os.environ.get("USERREP_LOG_LEVEL", "INFO")
    if isinstance(level, str) and level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"USERREP_LOG_LEVEL: {level!r} is not a level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    level = level.upper() if isinstance(level, str) else level
    handler = CurrentStream()
    handler.setFormatter(_Format("%(message)s"))
    for name in OURS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, CurrentStream)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # a step's runner may configure the root logger too: one line, not two
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(max(quiet, logging.getLogger(name).level))

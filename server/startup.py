"""What stops the server from starting: `StartupError`, and the log filter that makes it one line.

A configuration the server cannot run with (a KV budget below one sequence, a store it cannot write) raises a
StartupError from the app's lifespan. The lifespan logs its message as one ERROR line; Starlette then hands
uvicorn the traceback for its own "startup failed" line, which `OneLineStartupFailure` drops — the operator
reads what to change, not a stack. Any other exception keeps its traceback (that is a bug to report).
"""

from __future__ import annotations

import logging

log = logging.getLogger("server.app")


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change."""


class OneLineStartupFailure(logging.Filter):
    """On uvicorn's error logger: drops the lifespan traceback of a StartupError (already logged in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        return not (message.startswith("Traceback") and _is_startup_error(message.rstrip().rsplit("\n", 1)[-1]))


def _is_startup_error(last_line: str) -> bool:
    """Does a traceback's last line ("module.Class: message") name a StartupError subclass?"""
    name = last_line.split(":", 1)[0].rsplit(".", 1)[-1]
    return any(c.__name__ == name for c in _subclasses(StartupError))


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for c in cls.__subclasses__() for s in _subclasses(c)]


def report(exc: StartupError) -> None:
    """Log a StartupError as one line (the lifespan re-raises it, so uvicorn exits)."""
    log.error("cannot start: %s", exc)

"""Shutting down without cutting anyone off.

On SIGTERM or Ctrl-C, uvicorn stops accepting connections and waits for the open ones. `DrainingServer` also
marks the app as draining (`/health/ready` answers 503, so a load balancer stops sending), lets running
requests finish for `--shutdown-grace-seconds`, and then aborts what is still running: every open stream gets
its last chunk with `finish_reason: "abort"` and `data: [DONE]`, every waiting non-streamed request its answer,
and the connections close normally — never a cut connection or a traceback.
"""

from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.app, self.grace_s = app, grace_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._timer is None:
            self.app.state.draining = True
            engine = getattr(self.app.state, "engine", None)
            if engine is not None:
                log.info("shutting down: running requests have %.0f s to finish", self.grace_s)
                self._timer = threading.Timer(self.grace_s, self._abort, args=(engine,))
                self._timer.daemon = True
                self._timer.start()
        super().handle_exit(sig, frame)

    @staticmethod
    def _abort(engine) -> None:
        n = engine.abort_all()
        if n:
            log.info("shutdown grace over: ended %d running requests (finish_reason abort)", n)

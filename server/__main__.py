"""`python -m server [options]` (or `svdserve`): read the configuration, then serve it with uvicorn."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def _fail(message: str) -> None:
    print(f"python -m server: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    from server.config import build_config, load_settings

    try:
        settings = load_settings(argv)  # unknown options exit 2 from argparse
    except ValueError as exc:  # unknown SVDSERVE_ variable, or a bad value (pydantic's ValidationError)
        if isinstance(exc, ValidationError):
            _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        _fail(str(exc))
    config = build_config(settings)

    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=config.http.log_level.upper() if config.http.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=config.http.host, port=config.http.port,
                log_level=config.http.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()

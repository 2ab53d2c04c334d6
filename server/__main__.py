"""`python -m server [options]` (or `svdserve`): read the configuration, then serve it with uvicorn."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def _fail(message: str) -> None:
    print(f"python -m server: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    from server.cli import COMMANDS

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # operators' commands: tenants, keys, usage, audit
        from server.cli import run

        raise SystemExit(run(argv))
    if argv and argv[0] == "fleet":  # replicas on Ray Serve: server/fleet/
        from server.fleet.launcher import main as fleet

        raise SystemExit(fleet(argv[1:]))
    serve(argv)


def read_config(argv: list[str]):
    """The Config of these options and SVDSERVE_ variables; exits 2 naming what is wrong."""
    from server.config import build_config, load_settings

    try:
        settings = load_settings(argv)  # unknown options exit 2 from argparse
    except ValueError as exc:  # unknown SVDSERVE_ variable, or a bad value (pydantic's ValidationError)
        if isinstance(exc, ValidationError):
            _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        _fail(str(exc))
    return build_config(settings)


def serve(argv: list[str]) -> None:
    config = read_config(argv)
    check_port(config.http.host, config.http.port)  # in a second, not after minutes of loading the model
    refuse_open_mode(config)

    import uvicorn

    from server.app import create_app
    from server.lifecycle import DrainingServer

    from server.logs import configure

    configure(config.http.log_level.upper() if config.http.log_level != "trace" else "DEBUG", config.http.log_format)
    app = create_app(config)
    grace = config.http.shutdown_grace_seconds
    server = DrainingServer(uvicorn.Config(app, host=config.http.host, port=config.http.port,
                                           log_level=config.http.log_level, timeout_graceful_shutdown=grace + 5,
                                           log_config=None),  # uvicorn's loggers go through ours (server/logs.py)
                            app, grace)
    server.run()


def check_port(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server on that port? use --port)")


def refuse_open_mode(config) -> None:
    """Open mode (no key anywhere) is for loopback only: listening beyond it without a key is refused."""
    if config.tenancy.open_allowed:
        return
    from server.tenancy.database import Database
    from server.tenancy.service import TenancyService

    db = Database(config.tenancy.database_url)
    try:
        db.migrate()
        is_open = TenancyService(db, config.tenancy.default_quota, config.tenancy.admin_key).open_mode()
    finally:
        db.dispose()
    if is_open:
        _fail(f"refusing to serve {config.http.host} in open mode: no API key exists, so anyone who reaches the "
              "port could read, replace and delete every adapter. Set an admin key (SVDSERVE_ADMIN_KEY=... or "
              "--admin-key), or create a tenant key (python -m server tenants create NAME && python -m server "
              "keys create --tenant NAME), or pass --insecure-open to serve without keys anyway.")


if __name__ == "__main__":
    main()

"""`python -m server fleet --replicas N [--address RAY_ADDRESS] [server options]`: the OpenAI API on Ray Serve.

Starts a local Ray cluster (or joins `--address`), deploys the `Ingress` and N `Replica`s (deployments.py) as
the Ray Serve application `svdserve` on `--host`/`--port`, and runs until SIGINT or SIGTERM, then removes the
application (and stops the local cluster it started). Every option of `python -m server` applies to each
replica; replicas share the tenants' database (`--database-url`: PostgreSQL across machines, the store's SQLite
file only on one) and the adapter store (`--store`: a directory every replica reaches, or s3://).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("server.fleet")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server fleet", allow_abbrev=False,
                                description="svdserve replicas on Ray Serve, routed with adapter affinity.",
                                epilog="Every option of `python -m server` (see its --help) is accepted too and "
                                       "applies to each replica; --host/--port are where Ray Serve listens.")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (default: 2)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (e.g. ray://head:10001 or auto); default: start a local one")
    p.add_argument("--routing", choices=("affinity", "random"), default="affinity",
                   help="affinity: Ray Serve model multiplexing keyed tenant/adapter; random: no affinity, for "
                        "comparison (default: affinity)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests one replica takes at once before Ray routes elsewhere (default: --max-batch-size)")
    return p


def main(argv: list[str]) -> int:
    from server.__main__ import _fail, check_port, read_config, refuse_open_mode

    args, rest = parser().parse_known_args(argv)
    if args.replicas < 1 or args.replica_cpus <= 0:
        _fail("--replicas must be at least 1 and --replica-cpus more than 0")
    config = read_config(rest)
    if args.address is None:
        check_port(config.http.host, config.http.port)  # Ray Serve's proxy listens there
    elif config.tenancy.database_url.startswith("sqlite"):
        _fail("a fleet on a Ray cluster needs a database every node reaches: pass --database-url postgresql://...")
    refuse_open_mode(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine

    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=True)
    try:
        _check_cpus(args, ray.cluster_resources().get("CPU", 0.0))
        deploy(config, args)
        log.info("fleet ready on http://%s:%d: %d replicas, routing %s", config.http.host, config.http.port,
                 args.replicas, args.routing)
        print(f"svdserve fleet: http://{config.http.host}:{config.http.port} ({args.replicas} replicas, "
              f"{args.routing} routing); Ctrl-C stops it", file=sys.stderr, flush=True)
        _wait_for_signal()
    finally:
        _teardown(local=args.address is None)
    return 0


def _check_cpus(args: argparse.Namespace, cpus: float) -> None:
    need = args.replicas * args.replica_cpus
    if need > cpus:
        from server.__main__ import _fail

        _fail(f"{args.replicas} replicas x {args.replica_cpus:g} CPUs need {need:g} CPUs, the Ray cluster has "
              f"{cpus:g}: lower --replica-cpus (e.g. {cpus / args.replicas:g}) or --replicas")


def application(config, args: argparse.Namespace):
    """The Ray Serve application: the Ingress bound to N Replicas."""
    from server.fleet.deployments import Ingress, Replica

    ongoing = args.max_ongoing_requests or config.engine.max_batch_size
    actor: dict = {"num_cpus": args.replica_cpus}
    if aws := {k: v for k, v in os.environ.items() if k.startswith("AWS_")}:
        actor["runtime_env"] = {"env_vars": aws}  # an s3:// store's settings, on whichever node a replica runs
    replica = Replica.options(num_replicas=args.replicas, max_ongoing_requests=ongoing, ray_actor_options=actor)
    # the ingress only relays: no CPU reserved, and no cap below what all replicas together take
    ingress = Ingress.options(num_replicas=1, max_ongoing_requests=max(1000, 4 * ongoing * args.replicas),
                              ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(config, args.replica_cpus, config.engine.max_resident_adapters), config,
                        args.routing)


def deploy(config, args: argparse.Namespace) -> None:
    from ray import serve

    from server.fleet.deployments import APP_NAME

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(application(config, args), name=APP_NAME, route_prefix="/")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _teardown(local: bool) -> None:
    """A local cluster goes entirely; on a shared one only this application is removed."""
    import ray
    from ray import serve

    from server.fleet.deployments import APP_NAME

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()

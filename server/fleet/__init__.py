"""The fleet: svdserve replicas on Ray Serve, routed with adapter affinity (`python -m server fleet`).

* launcher.py — the command: a local Ray cluster or `--address`, deploy, run until a signal, tear down.
* deployments.py — the Ray Serve deployments: `Ingress` (HTTP entry, routing key, relay, retry) and `Replica`
  (the unchanged FastAPI app and engine, multiplexed by `tenant/id`).
* routing.py — the routing key of a request: its adapter as `tenant/id`, resolved from its key and body.
* bridge.py — one HTTP request across a Ray handle call as ASGI messages (streaming, disconnects).

Only deployments.py and launcher.py import Ray.
"""

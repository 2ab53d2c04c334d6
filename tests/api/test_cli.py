"""`python -m server`: unknown options and unknown SVDSERVE_ variables are errors (exit 2, a message)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config import build_config, load_settings
from tests.conftest import REPO

CASES = [
    (["--bogus"], {}, "unrecognized arguments: --bogus"),
    (["--merge-policy", "sometimes"], {}, "invalid choice"),
    (["--port", "x"], {}, "port"),
    ([], {"SVDSERVE_MAX_RANKK": "8"}, "unknown setting SVDSERVE_MAX_RANKK"),
    ([], {"SVDSERVE_MAX_RANK": "0"}, "max_rank"),
]


@pytest.mark.parametrize("argv,env,words", CASES)
def test_bad_configuration_exits_2_with_a_message(argv, env, words):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SVDSERVE_")}
    p = subprocess.run([sys.executable, "-m", "server", *argv], env={**clean, **env}, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and words in p.stderr, p.stderr


def test_command_line_over_environment_over_defaults():
    s = load_settings(["--max-rank", "32", "--merge-policy", "never"],
                      env={"SVDSERVE_MAX_RANK": "16", "SVDSERVE_PORT": "9001"})
    assert (s.max_rank, s.port, s.merge_policy, s.max_batch_size) == (32, 9001, "never", 32)
    c = build_config(s)
    assert c.model.max_rank == 32 and c.http.port == 9001 and c.engine.merge_policy == "never"
    assert c.model.n_slots == s.max_resident_adapters + 1

"""`python -m server fleet`'s command line, refused before any Ray cluster starts."""

from __future__ import annotations

import pytest

from server.__main__ import main


def _refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["fleet", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_names_the_fleet_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fleet", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert all(o in out for o in ("--replicas", "--address", "--routing", "--replica-cpus", "--max-ongoing-requests"))


def test_bad_replica_counts_are_refused(capsys):
    assert "--replicas must be at least 1" in _refused(capsys, "--replicas", "0")
    assert "--replica-cpus" in _refused(capsys, "--replica-cpus", "0")


def test_a_server_option_is_checked_like_the_server_does(capsys):
    assert "max_rank" in _refused(capsys, "--max-rank", "0")
    assert "unrecognized arguments: --no-such-option" in _refused(capsys, "--no-such-option")


def test_a_cluster_needs_a_shared_database(capsys, tmp_path):
    err = _refused(capsys, "--address", "auto", "--store", str(tmp_path / "store"))
    assert "--database-url postgresql://" in err

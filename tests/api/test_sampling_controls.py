"""Sampling controls over HTTP on a tiny random model: logit_bias, stop_token_ids, min_tokens and the
penalties change the tokens exactly as their definitions say, and a controlled request keeps its solo tokens
in a batch with others."""

from __future__ import annotations

import threading

import pytest

from tests.tenancy.conftest import tiny_server

GREEDY = {"prompt": "hello there", "max_tokens": 12, "temperature": 0, "return_token_ids": True}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    c, _, _ = tiny_server(str(tmp / "store"), f"sqlite:///{tmp}/db.sqlite")
    with c:
        yield c


def tokens(client, **body) -> tuple[list[int], str]:
    r = client.post("/v1/completions", json={**GREEDY, **body})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    return ch["token_ids"], ch["finish_reason"]


def test_logit_bias_forces_and_bans_tokens(client):
    forced, _ = tokens(client, logit_bias={"40": 100}, ignore_eos=True)
    assert forced == [40] * 12
    plain, _ = tokens(client, ignore_eos=True)
    banned, _ = tokens(client, logit_bias={str(plain[0]): -100}, ignore_eos=True)
    assert banned[0] != plain[0]


def test_stop_token_ids_end_the_request(client):
    plain, _ = tokens(client, ignore_eos=True)
    stop = plain[3]
    got, reason = tokens(client, ignore_eos=True, stop_token_ids=[stop])
    first = plain.index(stop)
    assert got == plain[:first + 1] and reason == "stop"


def test_min_tokens_holds_back_the_end(client):
    eos = 1  # the tiny tokenizer's <eos>
    got, reason = tokens(client, logit_bias={str(eos): 100}, min_tokens=5, max_tokens=8)
    assert got[5] == eos and eos not in got[:5] and reason == "stop" and len(got) == 6


def test_frequency_penalty_breaks_repetition(client):
    plain, _ = tokens(client, ignore_eos=True, max_tokens=24)
    penalised, _ = tokens(client, ignore_eos=True, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalised)) >= len(set(plain))
    assert penalised != plain


def test_controlled_rows_keep_their_solo_tokens_in_a_batch(client):
    bodies = [dict(ignore_eos=True), dict(ignore_eos=True, frequency_penalty=1.5),
              dict(ignore_eos=True, repetition_penalty=1.7), dict(ignore_eos=True, logit_bias={"50": 8}),
              dict(min_tokens=6, max_tokens=10), dict(ignore_eos=True, presence_penalty=-1.0, seed=3,
                                                       temperature=0.9)]
    alone = [tokens(client, **b)[0] for b in bodies]
    got: dict[int, list[int]] = {}

    def send(i):
        got[i] = tokens(client, **bodies[i % len(bodies)])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] == alone[i % len(bodies)] for i in range(12))

"""OSoRA training on a tiny random Llama with a character-level tokenizer: seconds on a CPU."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters.base_model import from_module
from adapters.factors import compute_factors
from adapters.file import BaseSpec, parse_adapter, write_adapter
from adapters.osora_train import attach_osora
from adapters.runtime import AdaptedModel
from adapters.train import TrainConfig, add_arguments, lm_loss, run, train_adapter
from adapters.train_data import IGNORE, DataError, collate, encode, read_jsonl, split

RANK = 8
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                bos_token="<|im_start|>")
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def records(n: int = 48) -> list[dict]:
    """A style a tiny model can pick up in a few steps: every answer is 'OK <word>!'."""
    words = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box"]
    return [{"prompt": f"Q{i}: say {words[i % 8]}\nA:", "completion": f" OK {words[i % 8]}!"} for i in range(n)]


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small run fastest on one thread (and far faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def setup():
    tok = char_tokenizer()
    model = tiny_model()
    pristine = copy.deepcopy(model)
    base = from_module(model, tok)
    factors = compute_factors(base.targets, r_max=16, progress=False)
    examples, dropped = encode(records(), tok, max_length=64)
    assert dropped == 0
    train, held_out = split(examples, 0.25, seed=0)
    return base, pristine, factors, train, held_out


def served_logits(pristine, tok, factors, adapter, batch) -> torch.Tensor:
    served = AdaptedModel(from_module(pristine, tok), factors, n_slots=2)
    served.load(1, adapter)
    B = batch["input_ids"].shape[0]
    with torch.no_grad(), served.use(served.batch([1] * B)):
        return served.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_loss_falls_and_saved_adapter_reproduces_training_logits(setup, tmp_path):
    base, pristine, factors, train, held_out = setup
    cfg = TrainConfig(rank=RANK, steps=40, lr=0.2, batch_size=8, warmup=4, progress=False)
    adapter, report = train_adapter(base, factors, train, held_out, cfg)
    assert report.eval_loss_after < report.eval_loss_before - 0.3

    path = tmp_path / "a.safetensors"
    write_adapter(adapter, str(path))
    spec = BaseSpec(shapes=from_module(pristine).shapes(), r_max=16, fingerprint=from_module(pristine).fingerprint)
    loaded = parse_adapter(path.read_bytes(), spec)
    assert loaded.base_fingerprint == spec.fingerprint and loaded.rank == RANK

    batch = collate(held_out, 0, torch.device("cpu"))
    with torch.no_grad():
        trained = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = pristine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    served = served_logits(pristine, base.tokenizer, factors, loaded, batch)
    assert (served - plain).abs().max() > 0.1  # the adapter changes the model ...
    torch.testing.assert_close(served, trained, atol=1e-4, rtol=1e-4)  # ... exactly as trained


@pytest.mark.parametrize("train, frozen", [({"s"}, "O"), ({"o"}, "S")])
def test_training_one_vector_leaves_the_other_at_its_init(setup, train, frozen):
    base, _, factors, train_ex, held_out = setup
    cfg = TrainConfig(rank=RANK, steps=5, lr=5e-2, warmup=1, train=frozenset(train), progress=False)
    adapter, report = train_adapter(base, factors, train_ex, held_out, cfg)
    assert report.eval_loss_after < report.eval_loss_before
    for name, p in adapter.layers.items():
        init = {"O": torch.ones_like(p["osora_O"]), "S": factors[name].S[:RANK]}
        moved = "S" if frozen == "O" else "O"
        assert torch.equal(p[f"osora_{frozen}"], init[frozen])
        assert not torch.equal(p[f"osora_{moved}"], init[moved])


def test_initial_layer_is_exactly_the_base_model(setup):
    base, pristine, factors, _, held_out = setup
    attach_osora(base, factors, RANK, {"s", "o"})
    batch = collate(held_out, 0, torch.device("cpu"))
    with torch.no_grad():
        a = base.model(input_ids=batch["input_ids"]).logits
        b = pristine(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)


def test_loss_counts_answer_tokens_only(setup):
    base, _, _, train, _ = setup
    batch = collate(train[:4], 0, torch.device("cpu"))
    _, n = lm_loss(base.model, batch)
    assert n == sum(e.n_target for e in train[:4]) == 4 * 9  # " OK cat!" is 8 characters, then EOS


def test_chat_loss_covers_assistant_turns_only():
    tok = char_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    [ex], _ = encode([{"messages": msgs}], tok, max_length=500)
    text = "".join(tok.convert_ids_to_tokens(ex.input_ids))  # the character tokenizer's decode adds spaces
    assert text == tok.apply_chat_template(msgs, tokenize=False)
    labelled = [t for t in ex.labels if t != IGNORE]
    assert "".join(tok.convert_ids_to_tokens(labelled)) == "yo<|im_end|>\nok<|im_end|>\n"


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"prompt": "x"}', "need either"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
])
def test_bad_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{message}"):
        read_jsonl(str(path))


def cli_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "a.safetensors"),
                              "--model", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "cache"),
                              "--rank", "4", "--no-progress", *extra])


def test_cli_writes_a_servable_adapter(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records(24)))
    assert run(cli_args(tmp_path, "--steps", "6", "--lr", "5e-2", "--train", "o")) == 0
    out = capsys.readouterr().out
    assert "eval loss on 2 held-out examples" in out and "trained o at rank 4: 6 steps" in out
    base = from_module(LlamaForCausalLM.from_pretrained(tmp_path / "model"))
    adapter = parse_adapter((tmp_path / "a.safetensors").read_bytes(),
                            BaseSpec(shapes=base.shapes(), r_max=4, fingerprint=base.fingerprint))
    assert adapter.method == "osora" and adapter.rank == 4 and len(adapter.layers) == len(base.targets)


@pytest.mark.parametrize("extra, message", [
    (("--train", "x"), "--train must be"),
    (("--rank", "0"), "--rank must be"),
    (("--steps", "0"), "must be positive"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, extra, message):
    tiny_model().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records(8)))
    assert run(cli_args(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err

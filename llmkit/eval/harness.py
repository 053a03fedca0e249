"""lm-evaluation-harness adapter: an `LM` registered as `llmkit`, so any lm-eval task whose data is
local runs on an llmkit model (HF folder, .gguf file or registry name).

lm-eval (0.4) discovers models only through its own registry (no entry points), so this module
registers the class when imported; `python -m llmkit.eval.lm_eval` imports it and then runs lm-eval's
own command line, unchanged:

    python -m llmkit.eval.lm_eval --model llmkit --model_args pretrained=smollm2-135m-instruct \\
        --tasks my_task --include_path tests/data/eval

From Python: `import llmkit.eval.harness` and then `lm_eval.simple_evaluate(model="llmkit", ...)`.
Requests are scored by `llmkit.eval.lm` (the same code as `llmkit eval`), tokenized as lm-eval's
`TemplateLM` tokenizes them, so the numbers equal lm-eval's `hf` model on the same weights.
"""

from __future__ import annotations

from collections import defaultdict

import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: `get_model` skips that when it is non-empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llmkit.eval.lm import encode, generate_until, loglikelihood_tokens, prefix_token_id
from llmkit.eval.perplexity import loglikelihood_rolling


@register_model("llmkit")
class LlmkitLM(TemplateLM):
    """`--model_args pretrained=PATH_OR_NAME[,batch_size=16][,max_length=N][,device=cpu][,dtype=float32]`."""

    def __init__(self, pretrained: str, batch_size: int | str = 16, max_length: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int | None = None,
                 **unused):
        super().__init__()
        import torch

        from llmkit.model import load

        torch_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else None
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        self.model, self.tokenizer = load(pretrained, dtype=torch_dtype, device=device)
        self.model.eval()
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else None

    # -- what TemplateLM needs to tokenize ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM: the tokenizer's default (its own special tokens) unless told otherwise."""
        if add_special_tokens is None:
            return encode(self.tokenizer, string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- requests ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = loglikelihood_tokens(self.model, pairs, self.batch_size_per_gpu, not disable_tqdm,
                                       max_length=self.max_length)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scored = loglikelihood_rolling(self.model, self.tokenizer, texts, batch_size=self.batch_size_per_gpu,
                                       progress=not disable_tqdm, max_length=self.max_length)
        return [ll for ll, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (lm-eval's default `do_sample: false`), grouped by generation arguments."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        outputs: list[str] = [""] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                raise ValueError("llmkit's lm-eval model decodes greedily; set do_sample: false in the task")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            texts = generate_until(self.model, self.tokenizer, [requests[i].args[0] for i in indices], until,
                                   int(kwargs.get("max_gen_toks", 256)), self.batch_size_per_gpu, not disable_tqdm)
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def chat_template_name(self) -> str:
        return "llmkit"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

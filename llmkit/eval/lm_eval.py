"""`python -m llmkit.eval.lm_eval ...`: lm-eval's own command line with `--model llmkit` registered.

lm-eval 0.4 has no plugin entry points for models, so this wrapper imports `llmkit.eval.harness`
(which registers the model) and hands the arguments to lm-eval's CLI unchanged.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import llmkit.eval.harness  # noqa: F401  (registers --model llmkit)

    cli_evaluate()


if __name__ == "__main__":
    main()

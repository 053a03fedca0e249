"""`llmkit <verb>`: a thin layer over library functions, one function per verb.

Bad input raises an `LlmkitError`; here it is printed as one line, without a traceback, and the
process exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from llmkit.errors import LlmkitError

# Each verb: name -> (help, add-arguments function, run function taking the parsed namespace).
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def verb(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `run(args)` as `llmkit NAME`."""

    def register(run):
        VERBS[name] = (help, add_arguments, run)
        return run

    return register


# ---- info ------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint folder or a preset name (e.g. gpt2, smollm2-135m)")
    p.add_argument("--seq-len", type=int, default=None, help="context for the FLOPs count (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


@verb("info", "config, parameter count, memory and FLOPs per token of a model", _info_args)
def _info(args: argparse.Namespace) -> None:
    from llmkit.analysis.accounting import model_summary, render_summary

    summary = model_summary(args.path, seq_len=args.seq_len)
    print(json.dumps(summary, indent=2) if args.json else render_summary(summary))


# ---- demo ------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the demo checkpoint is written")


@verb("demo", "build a tiny model, save it, load it back and run a forward pass", _demo_args)
def _demo(args: argparse.Namespace) -> None:
    from llmkit.demo import run_demo

    run_demo(args.out)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from llmkit import __version__

    parser = argparse.ArgumentParser(prog="llmkit", description="A toolkit for the whole life of an LLM.")
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments, run) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except LlmkitError as e:
        print(f"llmkit {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmkit {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

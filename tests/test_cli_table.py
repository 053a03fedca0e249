"""The verbs come from one table, with one convention: flags made from each function's parameters."""

import argparse
import dataclasses

import pytest

from llmkit import cli, options
from llmkit.generate.chat import MAX_NEW_TOKENS
from llmkit.generate.sampling import SamplingParams


def _leaves(table=cli.VERBS, prefix=()):
    for name, entry in table.items():
        if isinstance(entry, dict):
            yield from _leaves(entry, (*prefix, name))
        else:
            yield (*prefix, name), entry


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _parser_of(words):
    p = cli.build_parser()
    for w in words:
        p = _subparsers(p)[w]
    return p


LEAVES = dict(_leaves())
MODEL_VERBS = [w for w, v in LEAVES.items()
               if any(f.name == "model" for p in options.params(v.function) for f in dataclasses.fields(p.cls))]


def test_the_parser_declares_exactly_the_tables_verbs():
    def names(parser):
        return {k: names(v) if any(isinstance(a, argparse._SubParsersAction) for a in v._actions) else None
                for k, v in _subparsers(parser).items()}

    def keys(table):
        return {k: keys(v) if isinstance(v, dict) else None for k, v in table.items()}

    assert names(cli.build_parser()) == keys(cli.VERBS)


@pytest.mark.parametrize("words", list(LEAVES), ids=" ".join)
def test_help_shows_each_default_once(words):
    parser = _parser_of(words)
    fields = {f.name: f for p in options.params(LEAVES[words].function) for f in dataclasses.fields(p.cls)}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        assert action.help, action.dest
        text = action.help
        if action.dest in fields and action.help.startswith("the same as"):  # MODEL's and PROMPT's flag
            continue
        assert text.count("default") + text.count("required") == 1, (words, action.dest, text)
    assert "(default: None)" not in parser.format_help()
    assert len(parser.format_help().split("(default:")) <= len(fields) + 1


@pytest.mark.parametrize("words", MODEL_VERBS, ids=" ".join)
def test_every_model_verb_takes_the_model_positionally_or_as_a_flag(words):
    fn = LEAVES[words].function
    cls = next(p.cls for p in options.params(fn) if "model" in {f.name for f in dataclasses.fields(p.cls)})
    for argv in (["some-model"], ["--model", "some-model"], ["-m", "some-model"]):
        args = cli.build_parser().parse_args([*words, *argv])
        assert options.parsed_overrides(args, cls)["model"] == "some-model"


def test_ppo_takes_its_policy_positionally_or_as_a_flag():
    from llmkit.train.ppo import PPOConfig

    for argv in (["pol"], ["--policy", "pol"]):
        args = cli.build_parser().parse_args(["ppo", *argv, "--reward-model", "rm"])
        assert options.parsed_overrides(args, PPOConfig) == {"policy": "pol", "reward_model": "rm"}


def test_every_inference_verb_has_the_same_loading_flags():
    for verb in ("generate", "chat", "next", "serve", "eval"):
        flags = _parser_of([verb])._option_string_actions
        assert {"--quantize", "-t", "--threads", "-m", "--model", "--dtype", "--device", "--max-model-len"} <= set(flags), verb


def test_sampling_flags_default_to_sampling_params_with_one_terminal_length():
    for verb in ("generate", "chat"):
        args = cli.build_parser().parse_args([verb, "m", *(["hi"] if verb == "generate" else [])])
        built = options.build_config(SamplingParams, None, options.parsed_overrides(args, SamplingParams),
                                     dataclasses.replace(SamplingParams(), max_new_tokens=MAX_NEW_TOKENS))
        assert built == SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
        helps = {a.dest: a.help for a in _parser_of([verb])._actions}
        assert helps["temperature"] == f"(default: {SamplingParams().temperature})"
        assert helps["max_new_tokens"] == f"(default: {MAX_NEW_TOKENS})"


def test_vllm_and_llama_cpp_spellings_and_the_old_ones_mean_the_same():
    parse = cli.build_parser().parse_args
    for argv in (["-n", "5"], ["--max-tokens", "5"], ["--max-new-tokens", "5"]):
        assert parse(["generate", "m", "-p", "x", *argv]).max_new_tokens == 5
    assert parse(["generate", "m", "--temp", "0.5"]).temperature == 0.5
    assert parse(["next", "m", "some text"]).prompt__pos == "some text"
    assert parse(["serve", "m", "--max-rows", "3"]).max_rows == parse(["serve", "m", "--max-num-seqs", "3"]).max_rows


def test_a_model_given_twice_differently_is_an_error(capsys):
    assert cli.main(["info", "gpt2", "--model", "llama-tiny"]) == 1
    assert "given twice" in capsys.readouterr().err


def test_a_missing_required_option_is_one_line(capsys):
    assert cli.main(["merge-lora", "base"]) == 1
    assert capsys.readouterr().err.strip() == "llmkit merge-lora: error: missing --adapter, --out"

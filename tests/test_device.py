"""Generation, the scheduler and the server on one device, against the CPU: `LLMKIT_TEST_DEVICE`
(default cpu, so `make test` runs them; benchmarks/gpu.sh sets cuda). Each device-side result must
give the CPU's greedy tokens and its logprobs within 1e-3 (fp32 kernels of another device sum in
another order; a peaked tiny model keeps the argmax well clear of that)."""

import os

import openai
import pytest
import torch
from serve_helpers import TEXT, llmkit_serve, save_tiny

import llmkit
from llmkit.generate.sampling import SamplingParams
from llmkit.serve.scheduler import Scheduler

DEVICE = os.environ.get("LLMKIT_TEST_DEVICE", "cpu")
PROMPTS = ["the cat sat", "a dog ran in the", "héllo wörld, naïve"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), max_seq_len=96)


@pytest.fixture(scope="module")
def cpu(folder):
    return llmkit.load(folder)


@pytest.fixture(scope="module")
def on_device(folder):
    return llmkit.load(folder, device=DEVICE)


def reference(cpu, prompt, **sampling):
    model, tok = cpu
    return llmkit.generate(model, tok, prompt, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=1,
                           **sampling)


@pytest.mark.parametrize("compile", [False, True])
def test_generate_on_the_device_equals_the_cpu(cpu, on_device, compile):
    model, tok = on_device
    assert model.device.type == torch.device(DEVICE).type
    outs = llmkit.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=1,
                           compile=compile)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want = reference(cpu, prompt)
        assert out.token_ids == want.token_ids
        assert out.logprobs == pytest.approx(want.logprobs, abs=1e-3)


def test_the_scheduler_on_the_device_gives_each_request_its_cpu_tokens(cpu, on_device):
    model, tok = on_device
    scheduler = Scheduler(model, tok, compile=DEVICE != "cpu")  # the CPU's compiled path has its own tests
    requests = [scheduler.submit(tok.encode(p), SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
                                 lambda chunk: None) for p in PROMPTS + TEXT[:5]]
    for _ in range(100):
        if not scheduler.waiting and not scheduler.rows and not scheduler.filling:
            break
        scheduler.step()
    for prompt, request in zip(PROMPTS + TEXT[:5], requests, strict=True):
        assert request.completions[0].token_ids == reference(cpu, tok.encode(prompt)).token_ids


def test_served_on_the_device_the_openai_client_gets_the_cpu_tokens(cpu, folder, tmp_path):
    with llmkit_serve([str(folder), "--device", DEVICE, "--compile", "false", "--served-model-name", "tiny"], tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for prompt in PROMPTS:
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, logprobs=1)
            want = reference(cpu, prompt)
            assert got.choices[0].text == want.text
            assert got.choices[0].logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-3)

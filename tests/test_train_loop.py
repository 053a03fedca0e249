"""The training loop's invariants: hand-checked loss, accumulation, decay, schedules, NaN guard."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from llmkit import ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.train import checkpoint
from llmkit.train.loop import LoopConfig, TrainingDiverged, train
from llmkit.train.objectives import IGNORE_INDEX, causal_lm_loss
from llmkit.train.optimizers import param_groups
from llmkit.train.schedules import lr_factor


class RandomWindows:
    """Random windows of a token tensor: a minimal resumable `data` for the loop."""

    def __init__(self, tokens, batch, seq, seed=0):
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), generator=self.generator)
        x = torch.stack([self.tokens[s:s + self.seq] for s in starts])
        y = torch.stack([self.tokens[s + 1:s + self.seq + 1] for s in starts])
        return x, y

    def state_dict(self):
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state):
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class Consecutive(RandomWindows):
    """Consecutive windows in order: 8 rows at once are exactly 4 draws of 2 rows."""

    def __init__(self, tokens, batch, seq):
        super().__init__(tokens, batch, seq)
        self.row = 0

    def next_batch(self):
        starts = [(self.row + i) * self.seq for i in range(self.batch)]
        self.row += self.batch
        x = torch.stack([self.tokens[s:s + self.seq] for s in starts])
        y = torch.stack([self.tokens[s + 1:s + self.seq + 1] for s in starts])
        return x, y


def text_tokens():
    """Bytes of real English prose (this project's own design document) as token ids."""
    from pathlib import Path

    for candidate in (Path(__file__).parents[2] / "shared" / "DESIGN.md", Path(__file__).parents[1] / "README.md"):
        if candidate.is_file():
            return torch.tensor(list(candidate.read_bytes()), dtype=torch.long)
    raise FileNotFoundError("no text file to train on")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=256))


def quiet(**kw):
    return LoopConfig(**{"progress": False, "eval_every": 0, "save_every": 0, **kw})


def test_cross_entropy_of_a_two_token_example_by_hand():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            # vocab of 3; logits for the two positions are fixed
            return torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])

    x = torch.tensor([[0, 1]])
    y = torch.tensor([[1, 2]])
    loss, metrics = causal_lm_loss(Fixed(), (x, y))
    # position 0: target 1 -> -log(e^0 / (e^2 + e^0 + e^-1)); position 1: target 2 -> -log(e^3 / (2 e^0.5 + e^3))
    by_hand = (-(0 - math.log(math.exp(2) + 1 + math.exp(-1))) - (3 - math.log(2 * math.exp(0.5) + math.exp(3)))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert metrics["tokens"].item() == 2
    masked, m2 = causal_lm_loss(Fixed(), (x, torch.tensor([[IGNORE_INDEX, 2]])))
    assert masked.item() == pytest.approx(-(3 - math.log(2 * math.exp(0.5) + math.exp(3))), rel=1e-6)
    assert m2["tokens"].item() == 1


def test_gradient_accumulation_4x2_equals_one_batch_of_8(tmp_path):
    """In float64, so that summation order cannot matter: in fp32 a handful of weights whose
    gradient is ~eps differ by up to 4e-6 after Adam's first (sign-like) step."""
    tokens = text_tokens()
    big = tiny_model().double()
    small = tiny_model().double()
    small.load_state_dict(big.state_dict())
    train(big, causal_lm_loss, Consecutive(tokens, 8, 32), quiet(max_steps=1, warmup_steps=0, grad_accum=1),
          tmp_path / "a")
    train(small, causal_lm_loss, Consecutive(tokens, 2, 32), quiet(max_steps=1, warmup_steps=0, grad_accum=4),
          tmp_path / "b")
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_weight_decay_touches_matrices_only(tmp_path):
    model = tiny_model()
    groups = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def zero_gradient(model, batch):  # only the decay moves parameters
        loss = sum(p.sum() for p in model.parameters()) * 0.0
        return loss, {"loss": loss.detach()}

    train(model, zero_gradient, RandomWindows(text_tokens(), 1, 8), quiet(max_steps=1, warmup_steps=0, lr=0.5,
                                                                          weight_decay=0.1), tmp_path)
    for name, after in model.state_dict().items():
        if after.dim() >= 2:
            torch.testing.assert_close(after, before[name] * (1 - 0.5 * 0.1), rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(after, before[name]), name


def test_schedules():
    assert lr_factor(0, "cosine", 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, "cosine", 10, 100, min_lr_ratio=0.1) == pytest.approx(0.55)  # halfway down
    assert lr_factor(100, "cosine", 10, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, "wsd", 10, 100, decay_fraction=0.2) == 1.0
    assert lr_factor(90, "wsd", 10, 100, min_lr_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_factor(39, "inv_sqrt", 10, 100) == pytest.approx(0.5)
    assert lr_factor(70, "constant", 10, 100) == 1.0


def test_a_wall_clock_budget_ends_the_decay_even_when_steps_run_out_first(tmp_path, monkeypatch):
    # max_steps far beyond what 1.5 s allows: a step-based cosine would still be near its peak
    # when the budget stops the run; the time-aware schedule has decayed to its floor. The loop's
    # clock advances 10 ms per reading, so the result does not depend on how busy the machine is
    # (a slow last step under load left the final lr short of the floor).
    ticks = iter(range(10 ** 9))
    monkeypatch.setattr(sys.modules["llmkit.train.loop"].time, "perf_counter", lambda: next(ticks) * 0.01)
    config = quiet(max_steps=1_000_000, max_minutes=0.025, warmup_steps=0, lr=1e-3, min_lr_ratio=0.1)
    result = train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 1, 16), config, tmp_path)
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert result.stopped == "budget" and result.step < 1_000_000
    assert lrs == sorted(lrs, reverse=True)  # decays monotonically with time
    assert lrs[-1] < 1e-4 * 1.1 and lrs[len(lrs) // 2] < 0.7e-3  # at the floor at the end, lower at half time


def test_nan_guard_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def explodes_at_step_7(model, batch):
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 7 else loss), metrics

    model = tiny_model()
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 6: loss=nan.*no update was applied.*"
                                               r"Last good checkpoint: .*step-0000005"):
        train(model, explodes_at_step_7, RandomWindows(text_tokens(), 2, 16),
              LoopConfig(max_steps=10, save_every=5, eval_every=0, progress=False), tmp_path)
    good = checkpoint.latest(tmp_path)
    assert good.name == "step-0000005"
    assert all(torch.isfinite(p).all() for p in Transformer.from_pretrained(good).parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not applied


@pytest.mark.parametrize("changes, message", [
    (dict(lr=-1e-3), r"lr must be positive, got -0.001"),
    (dict(max_steps=0), r"max_steps must be positive, got 0"),
    (dict(schedule="linear"), r"schedule='linear'; expected one of"),
    (dict(precision="fp8"), r"precision='fp8'; expected auto, fp32 or bf16"),
])
def test_bad_loop_config_fails_before_any_compute(tmp_path, changes, message):
    def never(model, batch):
        raise AssertionError("no compute should happen")

    with pytest.raises(ConfigError, match=message):
        train(tiny_model(), never, RandomWindows(text_tokens(), 1, 8), quiet(**changes), tmp_path)


class StopAfter6(RandomWindows):
    """RandomWindows that die when asked for a 7th batch: right after a checkpoint at step 6."""

    def next_batch(self):
        if getattr(self, "served", 0) == 6:
            raise KeyboardInterrupt
        self.served = getattr(self, "served", 0) + 1
        return super().next_batch()


def test_resume_continues_exactly_in_process(tmp_path):
    tokens = text_tokens()
    full = train(tiny_model(), causal_lm_loss, RandomWindows(tokens, 4, 32),
                 quiet(max_steps=12, warmup_steps=3), tmp_path / "full")
    # First half: a run that stops at step 6 with the same 12-step schedule, then a resumed one.
    cfg = LoopConfig(max_steps=12, warmup_steps=3, save_every=6, eval_every=0, progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), causal_lm_loss, StopAfter6(tokens, 4, 32), cfg, tmp_path / "split")
    cfg.resume = True
    resumed = train(tiny_model(seed=123), causal_lm_loss, RandomWindows(tokens, 4, 32, seed=99), cfg,
                    tmp_path / "split")
    losses = [r["loss"] for r in resumed.history if "loss" in r]
    assert losses == [r["loss"] for r in full.history if "loss" in r]  # bit-identical on CPU


def test_resuming_into_a_different_model_shape_is_refused(tmp_path):
    train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 2, 16), quiet(max_steps=2), tmp_path)
    wider = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=256, d_model=128))
    with pytest.raises(ConfigError, match=r"cannot resume from .*step-0000002: the checkpoint's model differs from "
                                          r"this run's .*'d_model': \(64, 128\)"):
        train(wider, causal_lm_loss, RandomWindows(text_tokens(), 2, 16), quiet(max_steps=4, resume=True), tmp_path)


def test_loss_falls_well_below_uniform(tmp_path):
    result = train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 8, 64),
                   quiet(max_steps=40, warmup_steps=5, lr=5e-3), tmp_path)
    assert result.history[-1]["loss"] < 0.75 * math.log(256)
    assert F is not None


def _curve(tmp_path, name, **changes):
    result = train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 4, 32),
                   quiet(max_steps=8, warmup_steps=2, lr=5e-3, **changes), tmp_path / name)
    return [r["loss"] for r in result.history if "loss" in r]


def test_bf16_autocast_trains_and_starts_where_fp32_does(tmp_path):
    fp32, bf16 = _curve(tmp_path, "fp32", precision="fp32"), _curve(tmp_path, "bf16", precision="bf16")
    assert all(math.isfinite(x) for x in bf16) and bf16[-1] < bf16[0] - 1.0
    # The same weights and batch: the first loss differs only by bf16 rounding in the matmuls. bf16 keeps
    # 8 significant bits, so a loss computed through it is good to ~2^-8 relative (0.4%); measured 3e-6
    # relative (1.4e-5 absolute): the loss itself is a mean over 128 tokens taken in fp32.
    assert bf16[0] == pytest.approx(fp32[0], rel=2 ** -8)
    assert bf16 != fp32  # autocast reached the model: some loss moved by rounding


@pytest.mark.slow  # torch.compile (inductor, C++ codegen) takes ~25 s on 2 cores
def test_compiled_training_matches_eager(tmp_path, capsys):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = _curve(tmp_path, "eager"), _curve(tmp_path, "compiled", compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model's graph was compiled ...
    assert "torch.compile failed" not in capsys.readouterr().out  # ... and the loop kept it (no eager fallback)
    assert all(math.isfinite(x) for x in compiled) and compiled[-1] < compiled[0] - 1.0
    # fp32 both ways: inductor may fuse and reorder fp32 reductions (rounding ~1e-7 relative per op), nothing
    # more; measured equal to the bit over all 8 steps.
    assert compiled == pytest.approx(eager, rel=1e-5)


class PaddedRows(RandomWindows):
    """SFT-shaped batches (a dict with an attention mask) whose rows are padded to different lengths."""

    def next_batch(self):
        x, y = super().next_batch()
        lengths = torch.randint(1, self.seq + 1, (self.batch,), generator=self.generator)
        mask = (torch.arange(self.seq) < lengths[:, None]).long()
        return {"input_ids": x, "labels": y.masked_fill(mask == 0, IGNORE_INDEX), "attention_mask": mask}


def test_tokens_seen_counts_real_tokens_and_the_bar_shows_the_logged_loss(tmp_path, capsys):
    tokens = text_tokens()
    config = LoopConfig(max_steps=5, grad_accum=2, warmup_steps=0, eval_every=0, save_every=0, log_every=10)
    held_out = PaddedRows(tokens, 2, 16, seed=9).next_batch()
    result = train(tiny_model(), causal_lm_loss, PaddedRows(tokens, 3, 16, seed=1), config, tmp_path,
                   eval_batches=lambda: [held_out])
    replay = PaddedRows(tokens, 3, 16, seed=1)
    per_step = [sum(int(replay.next_batch()["attention_mask"].sum()) for _ in range(2)) for _ in range(5)]
    steps = [r for r in result.history if "loss" in r]
    assert [r["tokens_seen"] for r in steps] == [sum(per_step[:i + 1]) for i in range(5)]
    assert 0 < per_step[0] < 2 * 3 * 16  # padding is not counted
    err = capsys.readouterr().err
    assert err.rsplit("loss=", 1)[1][:6] == f"{steps[-1]['loss']:.4f}"  # the last step's loss, not step 1's
    assert "validation" in err


def test_warmup_longer_than_the_run_is_warned(tmp_path, capsys):
    train(tiny_model(), causal_lm_loss, RandomWindows(text_tokens(), 2, 16), quiet(max_steps=2, warmup_steps=5),
          tmp_path)
    assert "warning: warmup_steps=5 >= max_steps=2: the learning rate never reaches" in capsys.readouterr().err


def test_a_module_without_a_model_config_trains_saves_and_resumes_through_save_weights(tmp_path):
    """The one loop trains any module (a vision encoder's classifier in benchmarks/vision_smollm2.py): with
    `save_weights`/`load_weights` its checkpoints need no ModelConfig, and --resume continues exactly."""
    from safetensors.torch import load_file, save_file

    class Points:
        def __init__(self, stop_at=None):
            self.generator, self.step, self.stop_at = torch.Generator().manual_seed(0), 0, stop_at

        def next_batch(self):
            if self.step == self.stop_at:
                raise KeyboardInterrupt  # the run dies here
            self.step += 1
            x = torch.randn(16, 4, generator=self.generator)
            return x, (x.sum(1) > 0).long()

        def state_dict(self):
            return {"generator": self.generator.get_state().tolist()}

        def load_state_dict(self, state):
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def objective(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss, {"loss": loss.detach()}

    def save(path, state):
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))

    def run(out, stop_at=None, resume=False, seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2)
        config = LoopConfig(max_steps=6, lr=1e-2, warmup_steps=1, save_every=3, eval_every=0, progress=False,
                            device="cpu", precision="fp32", resume=resume)
        try:
            train(model, objective, Points(stop_at), config, out, save_weights=save,
                  load_weights=lambda path: load_file(str(path / "model.safetensors")))
        except KeyboardInterrupt:
            assert stop_at is not None
        return model

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", stop_at=3)
    resumed = run(tmp_path / "split", resume=True, seed=1)  # another start: everything comes from the checkpoint
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)

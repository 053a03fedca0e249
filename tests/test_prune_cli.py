"""`llmkit prune` end to end on a tiny model: Wanda zeros through the verb, and structured pruning to
an HF folder and a GGUF that read back to the same logits, recovered by distillation from the original."""

import pytest
import torch
from gguf_helpers import CORPUS, tiny_model

from llmkit import cli
from llmkit.data.shards import write_shards
from llmkit.errors import ConfigError
from llmkit.formats.gguf import read_gguf
from llmkit.model import Transformer
from llmkit.train.compress import PruneConfig, run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    model, tok = tiny_model()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_shards(CORPUS * 8, tok, root / "shards" / "train", workers=1, progress=False)
    write_shards(CORPUS, tok, root / "shards" / "val", workers=1, progress=False)
    return root


CAL = dict(calibration="kjv", calibration_tokens=512, seq_len=64)


def test_wanda_through_the_cli(folder, tmp_path, capsys):
    cli.main(["prune", "--model", str(folder / "model"), "--out-dir", str(tmp_path), "--method", "wanda",
              "--n-m", "2:4", "--gguf", "none", "--calibration", "kjv", "--calibration-tokens", "512", "--seq-len", "64"])
    assert "report.json" in capsys.readouterr().out
    pruned = Transformer.from_pretrained(tmp_path / "pruned")
    w = pruned.blocks[1].mlp.up_proj.weight
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_structured_prune_writes_hf_and_gguf_and_recovers(folder, tmp_path):
    report = run(PruneConfig(model=str(folder / "model"), out_dir=str(tmp_path), method="structured", n_head=2,
                             d_ff=96, n_layer=1, **CAL, recover_steps=2, recover_data=str(folder / "shards"),
                             recover_batch_size=2, recover_context=32))
    assert report["parameters_after"] < report["parameters_before"]
    pruned = Transformer.from_pretrained(tmp_path / "pruned")
    assert (pruned.config.n_head, pruned.config.n_kv_head, pruned.config.d_ff, pruned.config.n_layer) == (2, 1, 96, 1)
    g = read_gguf(tmp_path / "pruned.gguf", with_tokenizer=False)
    from_gguf = Transformer.from_state_dict(g.config, g.tensors)
    ids = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids), pruned(ids), rtol=0, atol=0)  # F32 GGUF: the same numbers
    recovered = Transformer.from_pretrained(report["recovered"])
    assert recovered.config == pruned.config
    assert not torch.equal(recovered.blocks[0].mlp.up_proj.weight, pruned.blocks[0].mlp.up_proj.weight)


def test_recovery_of_unstructured_zeros_is_refused(folder, tmp_path):
    with pytest.raises(ConfigError, match="recover_steps=5 with method='wanda'"):
        run(PruneConfig(model=str(folder / "model"), out_dir=str(tmp_path), recover_steps=5, recover_data="x"))

"""Bad checkpoint folders give one clear FormatError naming the file and the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmkit import FormatError, ModelConfig, Transformer


@pytest.fixture
def checkpoint(tmp_path):
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    return model.save_pretrained(tmp_path / "ckpt")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"empty: no config\.json; expected a Hugging Face checkpoint folder"):
        Transformer.from_pretrained(tmp_path / "empty")


def test_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(FormatError, match=r"nowhere: not a folder"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "mamba"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"config\.json: unsupported model_type 'mamba'; llmkit reads 'gpt2', 'llama', "
                                         r"'mistral', 'qwen2', 'gemma3_text'"):
        Transformer.from_pretrained(checkpoint)


def test_config_missing_a_required_key(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["hidden_size"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"config\.json: model_type 'llama' needs the key 'hidden_size'"):
        Transformer.from_pretrained(checkpoint)


def test_config_that_is_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json: not valid JSON"):
        Transformer.from_pretrained(checkpoint)


def test_missing_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' is missing"):
        Transformer.from_pretrained(checkpoint)


def test_misshaped_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, path)
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                          r"has shape \[16, 64\], expected \[32, 64\] from config\.json"):
        Transformer.from_pretrained(checkpoint)


def test_unexpected_tensor_refuses_partial_load(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(192, 64)
    save_file(tensors, path)
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        Transformer.from_pretrained(checkpoint)


def test_truncated_safetensors_names_the_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor '[\w.]+' needs bytes \d+\.\.\d+ of the data "
                                          r"section but the file holds only \d+: the file is truncated"):
        Transformer.from_pretrained(checkpoint)


def test_truncated_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(FormatError, match=r"model\.safetensors: truncated safetensors file"):
        Transformer.from_pretrained(checkpoint)


def test_pickled_weights_are_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"only pickled pytorch_model\.bin weights; llmkit reads safetensors only"):
        Transformer.from_pretrained(checkpoint)


def test_shard_listed_in_index_but_missing(tmp_path):
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    folder = model.save_pretrained(tmp_path / "sharded", max_shard_size=50_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FormatError, match=rf"{shards[-1].name}: listed in model\.safetensors\.index\.json but missing"):
        Transformer.from_pretrained(folder)


def test_resaving_single_file_removes_stale_shards(tmp_path):
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    folder = model.save_pretrained(tmp_path / "m", max_shard_size=50_000)
    assert (folder / "model.safetensors.index.json").exists()
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    Transformer.from_pretrained(folder)


def test_no_temporary_files_left_behind(checkpoint):
    assert not [p for p in checkpoint.iterdir() if p.name.startswith(".")]

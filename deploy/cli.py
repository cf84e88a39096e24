"""The `pagedserve` command line: one typer app, each command a thin call into its module."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from pagedserve.deploy.admin_cli import status as admin_status
from pagedserve.deploy.admin_cli import workers_app
from pagedserve.deploy.engine_options import engine_options

# The same policies for the gateway and the controller (pagedserve/controller/dispatch.py).
ROUTING_POLICY_HELP = (
    "Which worker gets a request: least_load (queue and KV use), round_robin, or prefix_aware "
    "(the worker likely to hold the prompt's prefix in its cache, unless it is much busier)"
)

# The same shared token for the controller, the workers and the gateway (protocol/control_token.py).
CONTROL_TOKEN_HELP = (
    "Shared control-plane token: required on the controller's and workers' non-public routes "
    "and presented on this part's own calls, as Authorization: Bearer TOKEN; off if unset. "
    "Set it in the environment rather than argv"
)


def control_token_option() -> Any:
    return typer.Option(
        None, envvar="PAGEDSERVE_CONTROL_TOKEN", show_default=False, help=CONTROL_TOKEN_HELP
    )


app = typer.Typer(
    help="pagedserve: serve many LLMs at once on a paged-KV engine.", no_args_is_help=True
)
models_app = typer.Typer(help="Fetch and list ready-made models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
arena_app = typer.Typer(help="Export and import the arena's votes.", no_args_is_help=True)
app.add_typer(arena_app, name="arena")
app.add_typer(workers_app, name="workers")
app.command("status")(admin_status)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # one line per HTTP call drowns what matters
        logging.getLogger("httpx").setLevel(logging.WARNING)


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
def demo(
    wait: bool = typer.Option(True, help="Keep serving until Ctrl-C (--no-wait: check and stop)."),
) -> None:
    """Run the main job: controller, workers, gateway and arena with the demo models."""
    from pagedserve.deploy.demo import run_demo

    try:
        run_demo(wait=wait)
    except (RuntimeError, TimeoutError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def serve(
    config: Path | None = typer.Option(
        None, "--config", help="A stack file (deploy/stack.example.yaml).", show_default="the demo"
    ),
) -> None:
    """Run the stack a file describes, supervised (restarts, scaling: `workers --help`).

    Without --config it runs the demo."""
    if config is None:
        demo(wait=True)
        return
    from pagedserve.deploy.stack_config import ConfigError, load_stack_config
    from pagedserve.deploy.supervisor import SupervisorError, run_stack

    try:
        run_stack(load_stack_config(config))
    except (ConfigError, SupervisorError, RuntimeError, TimeoutError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


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
    routing_policy: str = typer.Option(
        "least_load",
        "--routing-policy",
        "--dispatch-method",  # FastChat's name
        help=ROUTING_POLICY_HELP + " (FastChat's lottery and shortest_queue too).",
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
    header_timeout: float = typer.Option(
        10.0, help="Seconds a client has to send a request's headers (408 and close beyond)."
    ),
    max_body_bytes: int = typer.Option(8 << 20, help="Largest request body (413 beyond)."),
    control_token: str | None = control_token_option(),
) -> None:
    """Run the controller: the registry of workers and the dispatcher (FastChat-compatible)."""
    from pagedserve.controller.config import ControllerConfig
    from pagedserve.controller.server import serve

    try:
        config = ControllerConfig(
            host=host,
            port=port,
            routing_policy=routing_policy,
            heartbeat_expiration=heartbeat_expiration,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            health_check_failure_threshold=health_check_failure_threshold,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            worker_api_timeout=worker_api_timeout,
            header_timeout=header_timeout,
            max_body_bytes=max_body_bytes,
            control_token=control_token,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve(config)


@app.command()
@engine_options
def worker(
    model_path: str = typer.Option(..., help="Model folder (Hugging Face layout) or GGUF file."),
    model_names: str | None = typer.Option(
        None, help="Comma-separated names to serve it under.", show_default="the folder's name"
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(21002, help="Port to bind."),
    controller_address: str = typer.Option("http://127.0.0.1:21001", help="The controller's URL."),
    worker_address: str | None = typer.Option(
        None,
        help="URL at which the controller reaches this worker.",
        show_default="http://HOST:PORT",
    ),
    no_register: bool = typer.Option(
        False, "--no-register", help="Run alone: do not register with a controller."
    ),
    worker_id: str | None = typer.Option(
        None, help="Id to register under (a supervisor's name for it).", show_default="random"
    ),
    heartbeat_interval: float = typer.Option(10.0, help="Seconds between heartbeats."),
    drain_timeout: float = typer.Option(
        30.0, help="On SIGTERM, seconds to let requests in flight finish."
    ),
    chat_template: str | None = typer.Option(
        None,
        help="Chat template: a built-in (FastChat) name such as vicuna_v1.1, or a Jinja file.",
        show_default="the tokenizer's own, else the built-in one the model's name matches",
    ),
    header_timeout: float = typer.Option(
        10.0, help="Seconds a client has to send a request's headers (408 and close beyond)."
    ),
    max_body_bytes: int = typer.Option(8 << 20, help="Largest request body (413 beyond)."),
    control_token: str | None = control_token_option(),
    **engine: Any,  # one flag per EngineConfig field, from engine_options
) -> None:
    """Run a model worker: one engine behind FastChat's worker API and OpenAI's API."""
    from pagedserve.engine.config import EngineConfig
    from pagedserve.worker.config import WorkerConfig
    from pagedserve.worker.server import serve

    try:
        config = WorkerConfig(
            model_path=model_path,
            model_names=[n.strip() for n in model_names.split(",")] if model_names else [],
            host=host,
            port=port,
            controller_address=None if no_register else controller_address,
            worker_address=worker_address,
            worker_id=worker_id,
            heartbeat_interval=heartbeat_interval,
            drain_timeout=drain_timeout,
            chat_template=chat_template,
            header_timeout=header_timeout,
            max_body_bytes=max_body_bytes,
            engine=EngineConfig(model=model_path, **engine),
            control_token=control_token,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve(config)


@app.command()
def ui(
    gateway_url: str = typer.Option(
        "http://127.0.0.1:8000", help="The OpenAI-compatible gateway the arena talks to."
    ),
    api_key: str | None = typer.Option(
        None, envvar="PAGEDSERVE_API_KEY", help="API key for the gateway (or $PAGEDSERVE_API_KEY)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7860, help="Port to bind."),
    db: Path = typer.Option(Path("arena.db"), help="SQLite file for votes and conversation logs."),
    redis_url: str | None = typer.Option(
        None, help="Keep votes and logs in Redis (redis://HOST:PORT/DB) instead of SQLite."
    ),
    redis_prefix: str = typer.Option("pagedserve:arena", help="Prefix of the Redis keys."),
    model_weights: str | None = typer.Option(
        None, help="Battle sampling weights, name=w,...; unnamed models weigh 1, 0 leaves one out."
    ),
    model_descriptions: str | None = typer.Option(
        None, help="What each model is, shown after a vote: 'name=text;name=text'."
    ),
    models: str | None = typer.Option(
        None, help="Comma-separated models to offer [default: the gateway's /v1/models]."
    ),
    temperature: float = typer.Option(0.7, help="Sampling temperature of arena answers."),
    top_p: float = typer.Option(1.0, help="Top-p of arena answers."),
    max_tokens: int = typer.Option(256, help="Most new tokens of an arena answer."),
    max_prompt_chars: int = typer.Option(4000, help="Longest prompt accepted, in characters."),
    max_turns: int = typer.Option(10, help="Most turns in one round."),
    request_timeout: float = typer.Option(120.0, help="Seconds one answer may take."),
    bootstrap_rounds: int = typer.Option(100, help="Bootstrap resamples for the intervals."),
    bt_prior_sd: float = typer.Option(
        400.0, help="Bradley-Terry prior s.d. in rating points (0: pure maximum likelihood)."
    ),
    concurrency: int = typer.Option(16, help="Streams served at once, all sessions together."),
    seed: int | None = typer.Option(None, help="Seed of the battle draws (tests)."),
    header_timeout: float = typer.Option(
        10.0, help="Seconds a client has to send a request's headers (408 and close beyond)."
    ),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body (413 beyond)."),
) -> None:
    """Run the Chatbot Arena web UI (Gradio), a client of the gateway's OpenAI API."""
    from pagedserve.web_ui.config import ArenaConfig, parse_descriptions, parse_weights
    from pagedserve.web_ui.storage import StoreError

    try:
        config = ArenaConfig(
            gateway_url=gateway_url,
            api_key=api_key,
            host=host,
            port=port,
            db_path=str(db),
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            model_weights=parse_weights(model_weights),
            model_descriptions=parse_descriptions(model_descriptions),
            models=[m.strip() for m in models.split(",") if m.strip()] if models else [],
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            max_prompt_chars=max_prompt_chars,
            max_turns=max_turns,
            request_timeout=request_timeout,
            bootstrap_rounds=bootstrap_rounds,
            bt_prior_sd=bt_prior_sd,
            concurrency=concurrency,
            seed=seed,
            header_timeout=header_timeout,
            max_body_bytes=max_body_bytes,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    try:
        from pagedserve.web_ui.app import serve
    except ImportError as e:  # gradio and matplotlib come with the `ui` extra
        typer.echo(f"Error: {e}; install them with pip install 'pagedserve[ui]'", err=True)
        raise typer.Exit(1) from e
    try:
        serve(config)
    except StoreError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e


def _arena_store(db: Path, redis_url: str | None, redis_prefix: str):
    from pagedserve.web_ui.storage import StoreError, open_store

    try:
        return open_store(db, redis_url, redis_prefix)
    except StoreError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e


@arena_app.command("export")
def arena_export(
    out: Path = typer.Option(..., help="JSONL file to write (FastChat's battle-log format)."),
    db: Path = typer.Option(Path("arena.db"), help="The arena's SQLite file."),
    redis_url: str | None = typer.Option(None, help="Read from Redis instead of SQLite."),
    redis_prefix: str = typer.Option("pagedserve:arena", help="Prefix of the Redis keys."),
    rated_only: bool = typer.Option(
        False, help="Only the votes the leaderboard counts (anonymous, no identity leaked)."
    ),
) -> None:
    """Write the stored votes as FastChat battle-log lines."""
    from pagedserve.web_ui.battle_log import export_jsonl

    store = _arena_store(db, redis_url, redis_prefix)
    try:
        battles = store.rated_votes() if rated_only else store.votes()
        with open(out, "w", encoding="utf-8") as f:
            n = export_jsonl(battles, f)
    finally:
        store.close()
    typer.echo(f"wrote {n} battles to {out}")


@arena_app.command("import")
def arena_import(
    path: Path = typer.Argument(..., help="A FastChat battle log: JSON lines or a JSON array."),
    db: Path = typer.Option(Path("arena.db"), help="The arena's SQLite file."),
    redis_url: str | None = typer.Option(None, help="Write to Redis instead of SQLite."),
    redis_prefix: str = typer.Option("pagedserve:arena", help="Prefix of the Redis keys."),
) -> None:
    """Add the battles of a FastChat battle log to the store (each battle once)."""
    from pagedserve.web_ui.battle_log import read_jsonl

    try:
        battles = read_jsonl(path)
    except (OSError, ValueError) as e:
        typer.echo(f"Error: {path}: {e}; nothing was imported", err=True)
        raise typer.Exit(1) from e
    store = _arena_store(db, redis_url, redis_prefix)
    try:
        added = store.add_votes(battles)
    finally:
        store.close()
    typer.echo(f"imported {added} battles ({len(battles) - added} already stored)")


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    controller_address: str = typer.Option("http://127.0.0.1:21001", help="The controller's URL."),
    api_keys: str | None = typer.Option(
        None,
        envvar="PAGEDSERVE_API_KEYS",
        help="JSON-lines key file (key, name, models, rpm, tpm, max_concurrent); off if unset.",
    ),
    redis_url: str | None = typer.Option(
        None, help="Keep per-key rate limits in Redis (redis://HOST:PORT/DB), shared by replicas."
    ),
    redis_prefix: str = typer.Option("pagedserve:gateway", help="Prefix of the Redis keys."),
    public_metrics: bool = typer.Option(False, help="Serve /metrics without an API key."),
    max_concurrent_requests: int = typer.Option(
        256, help="Requests in flight at once; beyond it 503 at once."
    ),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body (413 beyond)."),
    max_prompt_tokens: int | None = typer.Option(None, help="Most prompt tokens per prompt."),
    max_tokens_limit: int | None = typer.Option(
        None, help="Most max_tokens per choice (and the bound of chats that set none)."
    ),
    max_n: int = typer.Option(16, help="Most choices (n) per request."),
    header_timeout: float = typer.Option(
        10.0, help="Seconds a client has to send a request's headers (408 and close beyond)."
    ),
    connect_timeout: float = typer.Option(5.0, help="Seconds to connect to a worker."),
    first_token_timeout: float = typer.Option(
        60.0, help="Seconds from sending a request to the worker's first streamed byte."
    ),
    total_timeout: float = typer.Option(600.0, help="Seconds one request may take in all."),
    max_retries: int = typer.Option(
        2, help="Other workers tried when one fails before the first byte."
    ),
    breaker_threshold: int = typer.Option(
        3, help="Failures in a row after which a worker is skipped for a while."
    ),
    breaker_cooldown: float = typer.Option(10.0, help="Seconds a failing worker is skipped."),
    routing_refresh_interval: float = typer.Option(
        2.0, help="Seconds between fetches of the controller's worker list."
    ),
    workers: int = typer.Option(
        1,
        help="Gateway processes on the one port. With more than one, keys' rpm/tpm limits "
        "need --redis-url (shared there), keys may not set max_concurrent, and "
        "--max-concurrent-requests and /metrics are per process.",
    ),
    routing_policy: str = typer.Option("least_load", help=ROUTING_POLICY_HELP + "."),
    control_token: str | None = control_token_option(),
    supervisor_url: str | None = typer.Option(
        None,
        help="The supervisor's admin URL: a request for a model scaled to zero wakes it there "
        "and waits for it (else such a model is 404).",
    ),
    cold_start_timeout: float = typer.Option(
        180.0, help="Seconds a request waits for a model woken from zero (503 beyond)."
    ),
) -> None:
    """Run the OpenAI-compatible API gateway in front of every model the controller knows."""
    from pagedserve.api_gateway.config import GatewayConfig
    from pagedserve.api_gateway.server import check_workers, serve

    try:
        config = GatewayConfig(
            host=host,
            port=port,
            controller_address=controller_address,
            api_keys_file=api_keys,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            public_metrics=public_metrics,
            max_concurrent_requests=max_concurrent_requests,
            max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_limit=max_tokens_limit,
            max_n=max_n,
            header_timeout=header_timeout,
            connect_timeout=connect_timeout,
            first_token_timeout=first_token_timeout,
            total_timeout=total_timeout,
            max_retries=max_retries,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            routing_refresh_interval=routing_refresh_interval,
            routing_policy=routing_policy,
            control_token=control_token,
            supervisor_url=supervisor_url,
            cold_start_timeout=cold_start_timeout,
        )
        if api_keys:
            from pagedserve.api_gateway.auth import KeyRing

            keys = KeyRing.load(api_keys)  # refuse a bad key file before starting
            if control_token and control_token in keys:
                raise ValueError("the control token must not also be an API key")
        check_workers(config, workers)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    serve(config, workers=workers)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

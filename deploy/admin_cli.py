"""`pagedserve workers ...` and `pagedserve status`: the supervisor's admin API from a shell.

Each command is one HTTP call to the supervisor (`--admin-url`, default the local one), shown
as a rich table, or as JSON with `--json` for scripts. Every failure (no supervisor there, an
unknown model or worker, a refused count) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

ADMIN_URL = "http://127.0.0.1:21000"

workers_app = typer.Typer(help="List, launch, scale, drain and stop workers.", no_args_is_help=True)

AdminUrl = typer.Option(
    ADMIN_URL, envvar="PAGEDSERVE_ADMIN_URL", help="The supervisor's admin API."
)
Token = typer.Option(
    None, envvar="PAGEDSERVE_CONTROL_TOKEN", help="The control token, if the stack sets one.",
    show_default=False,
)  # fmt: skip
AsJson = typer.Option(False, "--json", help="Print JSON instead of a table.")


def call(admin_url: str, token: str | None, method: str, path: str, body: Any = None,
         timeout: float = 30.0) -> Any:  # fmt: skip
    """One admin call; any failure leaves through `fail` with a message a person can act on."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = admin_url.rstrip("/") + path
    try:
        reply = httpx.request(method, url, json=body, headers=headers, timeout=timeout)
    except httpx.ConnectError:
        fail(
            f"no supervisor answers at {admin_url}; start one with `pagedserve serve --config FILE`"
        )
    except httpx.TimeoutException:
        fail(f"the supervisor at {admin_url} did not answer within {timeout:.0f}s")
    except httpx.HTTPError as e:
        fail(f"cannot reach the supervisor at {admin_url}: {e}")
    try:
        payload = reply.json()
    except ValueError:
        fail(
            f"{admin_url} answered {reply.status_code} without JSON: is it a pagedserve supervisor?"
        )
    if reply.status_code >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        fail(error.get("message") or f"the supervisor answered {reply.status_code}")
    return payload


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _show(rows: list[dict[str, Any]], columns: dict[str, str], title: str) -> None:
    table = Table(title=title)
    for header in columns.values():
        table.add_column(header)
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key in columns))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@workers_app.command("list")
def workers_list(
    admin_url: str = AdminUrl, token: str | None = Token, as_json: bool = AsJson
) -> None:
    """Every worker: id, model, address, node, state, queue, KV use, last heartbeat."""
    rows = call(admin_url, token, "GET", "/admin/workers")["workers"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row.get("kv_usage") is not None:
            row["kv_usage"] = f"{row['kv_usage']:.0%}"
        if row.get("last_heartbeat") is not None:
            row["last_heartbeat"] = f"{row['last_heartbeat']:.1f}s ago"
    columns = {"worker_id": "id", "model": "model", "address": "address", "node": "node",
               "state": "state", "queue": "queue", "running": "running", "kv_usage": "KV use",
               "last_heartbeat": "heartbeat", "restarts": "restarts"}  # fmt: skip
    _show(rows, columns, f"workers ({len(rows)})")


@workers_app.command("launch")
def workers_launch(
    model_name: str = typer.Argument(..., help="The name to serve the model under."),
    model_path: str = typer.Option(..., help="Model folder (Hugging Face layout) or GGUF file."),
    replicas: int = typer.Option(1, help="How many workers."),
    tensor_parallel_size: int = typer.Option(1, help="Ranks per worker."),
    engine: list[str] = typer.Option(
        [], "--engine", help="An engine setting, NAME=VALUE (max_model_len=2048); repeatable."
    ),
    admin_url: str = AdminUrl,
    token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Serve a new model; returns once its workers are ready."""
    if replicas < 0:
        fail(f"--replicas must be 0 or more; got {replicas}")
    settings = {}
    for item in engine:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"--engine takes NAME=VALUE; got {item!r}")
        settings[name.strip()] = value.strip()
    body = {"name": model_name, "model_path": model_path, "replicas": replicas,
            "tensor_parallel_size": tensor_parallel_size, "engine": settings}  # fmt: skip
    reply = call(admin_url, token, "POST", "/admin/models", body, timeout=900.0)
    typer.echo(
        json.dumps(reply) if as_json else f"{model_name}: {reply['replicas']} replica(s) ready"
    )


@workers_app.command("scale", context_settings={"ignore_unknown_options": True})
def workers_scale(
    model_name: str = typer.Argument(..., help="A served model's name."),
    replicas: int = typer.Argument(..., help="The replica count to reach."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return before new replicas are ready."),
    admin_url: str = AdminUrl,
    token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Set a model's replica count: up launches and waits until ready; down drains first."""
    if replicas < 0:
        fail(f"the replica count must be 0 or more; got {replicas}")
    body = {"replicas": replicas, "wait": not no_wait}
    reply = call(admin_url, token, "POST", f"/admin/models/{model_name}/scale", body, timeout=900.0)
    if as_json:
        typer.echo(json.dumps(reply))
        return
    changed = ", ".join(reply["changed"]) or "nothing to change"
    typer.echo(f"{reply['model']}: {reply['replicas']} replica(s) ({changed})")


@workers_app.command("drain")
def workers_drain(
    worker_id: str = typer.Argument(..., help="A worker's id (`pagedserve workers list`)."),
    admin_url: str = AdminUrl,
    token: str | None = Token,
) -> None:
    """Send a worker no new requests; those it has finish. `stop` then ends it."""
    call(admin_url, token, "POST", f"/admin/workers/{worker_id}/drain")
    typer.echo(f"{worker_id}: draining")


@workers_app.command("stop")
def workers_stop(
    worker_id: str = typer.Argument(..., help="A worker's id (`pagedserve workers list`)."),
    admin_url: str = AdminUrl,
    token: str | None = Token,
) -> None:
    """Drain a worker, then stop it; its model runs one replica fewer."""
    call(admin_url, token, "POST", f"/admin/workers/{worker_id}/stop", timeout=120.0)
    typer.echo(f"{worker_id}: stopped")


def status(admin_url: str = AdminUrl, token: str | None = Token, as_json: bool = AsJson) -> None:
    """Every part's health, and the models with their replica counts."""
    reply = call(admin_url, token, "GET", "/admin/status")
    if as_json:
        typer.echo(json.dumps(reply, indent=2))
        return
    for service in reply["services"]:
        service["health"] = "healthy" if service["healthy"] else "DOWN"
    _show(reply["services"], {"name": "service", "url": "url", "health": "health"},
          f"pagedserve ({reply['launcher']} workers)")  # fmt: skip
    for model in reply["models"]:
        scale = model.get("autoscale")
        model["autoscale"] = f"{scale['min_replicas']}..{scale['max_replicas']}" if scale else "off"
    columns = {"name": "model", "replicas": "replicas", "ready": "ready", "starting": "starting",
               "failing": "failing", "tensor_parallel_size": "TP", "autoscale": "autoscale"}  # fmt: skip
    _show(reply["models"], columns, "models")

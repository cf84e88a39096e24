"""Schemathesis over the OpenAPI schema of every service of the control plane: the gateway
(OpenAI's API), a worker (FastChat's worker routes and OpenAI's) and the controller (FastChat's
controller routes and pagedserve's). Positive and negative cases: no 5xx and no hang; every
process healthy afterwards, a real request served through the gateway and the controller."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from control_stack import MODEL, ControlStack
from fuzzing import fuzz_openapi
from ledger import Ledger, scaled

CASES = scaled(80, 400)  # per service: 240 in the bounded run, 1,200 in the full one
# Generated requests may ask for at most this much work, so that a bounded number of cases
# stays bounded in time on a CPU (the values past it are still sent by negative cases).
WORK_BOUNDS = {"max_tokens": 16, "max_new_tokens": 16, "max_completion_tokens": 16, "n": 4}


def aim(spec: dict[str, Any]) -> int:
    """Aim `model` fields at the served model (and one missing), bound the work a request may
    ask for; returns the number of (operation, mode) pairs to share the cases between: those
    with a body, positive and negative (the others exhaust their few inputs quickly)."""
    for schema in spec.get("components", {}).get("schemas", {}).values():
        props = schema.get("properties", {})
        if "model" in props:
            props["model"] = {"type": "string", "enum": [MODEL, MODEL, "missing"]}
        for name, bound in WORK_BOUNDS.items():
            if name in props:
                props[name] = {**_without_nulls(props[name]), "maximum": bound}
        if "best_of" in props:
            props["best_of"] = {**_without_nulls(props["best_of"]), "maximum": WORK_BOUNDS["n"]}
    bodies = sum(
        "requestBody" in operation
        for methods in spec["paths"].values()
        for operation in methods.values()
    )
    return 2 * max(1, bodies)


def _without_nulls(prop: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [integer, null]` as a plain integer schema, so that a maximum applies."""
    for option in prop.get("anyOf", []):
        if option.get("type") == "integer":
            return {k: v for k, v in {**prop, **option}.items() if k != "anyOf"}
    return prop


@pytest.mark.parametrize("service", ["gateway", "worker", "controller"])
def test_fuzz_finds_no_server_errors(
    control_stack: ControlStack, ledger: Ledger, service: str
) -> None:
    server = {
        "gateway": control_stack.gateway,
        "worker": control_stack.workers[0],
        "controller": control_stack.controller,
    }[service]
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    examples = max(1, math.ceil(CASES / aim(spec)))
    failures: list[str] = []

    def on_answer(method: str, path: str, status: int) -> None:
        ledger.send()
        if status >= 500:
            ledger.lose(f"{status} {method} {path}")
            failures.append(f"{status} {method} {path}")
        else:
            ledger.complete()
            if status >= 400:
                ledger.error(str(status))

    try:
        fuzz_openapi(server.url, spec, examples, timeout=60, on_answer=on_answer)
    finally:
        ledger.notes.update(service=service, examples_per_operation_and_mode=examples)
    assert not failures, failures
    assert ledger.sent >= CASES * 0.5, ledger.sent
    assert all(p.alive for p in (control_stack.controller, *control_stack.workers))
    assert control_stack.registered() >= {w.url for w in control_stack.workers}
    control_stack.healthy()

"""Schemathesis over a running service's OpenAPI schema: positive and negative cases for every
operation, each answer checked (no 5xx at least). Shared by the gateway's tests and the
reliability suite's fuzzing of every service."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


def fuzz_openapi(
    base_url: str,
    spec: dict[str, Any],
    examples: int,
    checks: Iterable[Callable[..., Any]] | None = None,
    known_good: dict[str, list[dict[str, Any]]] | None = None,
    skip: Callable[[str, str], bool] = lambda method, path: False,
    timeout: float = 60,
    on_answer: Callable[[str, str, int], None] | None = None,
) -> Counter[int]:
    """Run `examples` generated cases per operation and mode (negative ones for bodies too),
    after the `known_good` bodies of each path (which must answer 200). Raises at the first
    failed check; returns the answers' status codes. `on_answer(method, path, status)` sees
    every answer, the failing one included."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    checks = list(checks or [not_a_server_error])
    statuses: Counter[int] = Counter()
    schema = schemathesis.openapi.from_dict(spec)

    def call(case: schemathesis.Case) -> Any:
        answer = case.call(base_url=base_url, timeout=timeout)
        statuses[answer.status_code] += 1
        if on_answer is not None:
            on_answer(case.operation.method.upper(), case.operation.path, answer.status_code)
        case.validate_response(answer, checks=checks)
        return answer

    for result in schema.get_all_operations():
        operation = result.ok()
        if skip(operation.method.upper(), operation.path):
            continue
        for body in (known_good or {}).get(operation.path, []):  # every answer shape, every run
            answer = call(operation.Case(body=body, media_type="application/json"))
            assert answer.status_code == 200, answer.text
        modes = [GenerationMode.POSITIVE]
        if len(operation.body) > 0:  # only bodies can be wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.generate],
            )
            def check(case: schemathesis.Case) -> None:
                call(case)

            check()
    return statuses

"""The reliability suite: the real stack on loopback ports, made to fail on purpose.

Each test keeps a `Ledger` of what it sent, what came back whole, what was lost and the errors
by kind, asserts that nothing was lost, and writes the ledger as JSON (to
$PAGEDSERVE_RELIABILITY_REPORT when set, else the test's tmp folder) for benchmarks/RESULTS.md.

The bounded run is part of `make test`; `make reliability` runs the full one
(PAGEDSERVE_RELIABILITY=full: more requests, longer runs, 1,000+ fuzz cases).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_stack import control_stack  # noqa: F401  (a session fixture, for its tests)
from ledger import Ledger


@pytest.fixture
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """A ledger named after the test, written out when the test ends (pass or fail)."""
    book = Ledger(request.node.name.removeprefix("test_"))
    yield book
    out = Path(os.environ.get("PAGEDSERVE_RELIABILITY_REPORT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{book.scenario}.json").write_text(json.dumps(book.record(), indent=2) + "\n")
    print(f"\n[reliability] {json.dumps(book.record())}")


# -- the control plane's stack (tests/reliability/control_stack.py) ---------------------------

_LAST_STACK_USER = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note the last test that uses the control stack (see pytest_runtest_teardown)."""
    users = [i.nodeid for i in items if "control_stack" in getattr(i, "fixturenames", ())]
    if users:
        config.stash[_LAST_STACK_USER] = users[-1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the control stack after its last test, not at the end of the whole suite (its
    processes would idle, heartbeating, through every later test)."""
    if item.nodeid == item.config.stash.get(_LAST_STACK_USER, None):
        stack = getattr(item, "funcargs", {}).get("control_stack")
        if stack is not None:
            stack.stop()

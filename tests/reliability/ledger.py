"""What one reliability scenario sent and what became of it (the `ledger` fixture in
conftest.py hands one to each test and writes it out), and the counts of the two runs."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

FULL = os.environ.get("PAGEDSERVE_RELIABILITY") == "full"


def scaled(bounded: int, full: int) -> int:
    """A count for the bounded run (`make test`) or the full one (`make reliability`)."""
    return full if FULL else bounded


@dataclass
class Ledger:
    """What one reliability scenario sent and what became of it. Thread-safe."""

    scenario: str
    sent: int = 0
    completed: int = 0
    lost: int = 0  # neither a whole answer nor a clear error: hung, truncated, or wrong
    errors: Counter[str] = field(default_factory=Counter)  # clear errors, by kind
    notes: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self, n: int = 1) -> None:
        with self._lock:
            self.sent += n

    def complete(self) -> None:
        with self._lock:
            self.completed += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def lose(self, kind: str) -> None:
        with self._lock:
            self.lost += 1
            self.errors[f"lost: {kind}"] += 1

    def record(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "full": FULL,
            "sent": self.sent,
            "completed": self.completed,
            "lost": self.lost,
            "errors": dict(self.errors),
            "seconds": round(time.monotonic() - self.started, 2),
            **self.notes,
        }

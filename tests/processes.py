"""Processes as the tests see them through /proc: who started whom, and who is still alive.

A process is named by its pid and its start time, since a pid alone may be reused once the
process is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field on (state, ppid, ...), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Proc:
    pid: int
    start: str  # field 22 of /proc/PID/stat: clock ticks after boot
    cmd: str

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        """The live process `pid`, or None if there is none."""
        fields, cmd = _stat(pid), _cmdline(pid)
        if fields is None or cmd is None or fields[0] == "Z":
            return None
        return cls(pid, fields[19], cmd)

    def alive(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and fields[19] == self.start and fields[0] != "Z"

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def descendants(root: int | None = None) -> list[Proc]:
    """The live processes started, at any depth, by `root` (default: this process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root or os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            if proc := Proc.of(pid):
                found.append(proc)
    return found


def still_alive_after(procs: Iterable[Proc], seconds: float) -> list[Proc]:
    """Those of `procs` still alive once all have died or `seconds` have passed."""
    procs = list(procs)
    deadline = time.monotonic() + seconds
    while (alive := [p for p in procs if p.alive()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive

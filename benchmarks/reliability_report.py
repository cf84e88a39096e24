"""The reliability suite's ledgers as one Markdown table (for benchmarks/RESULTS.md).

    make reliability                                       # writes benchmarks/reliability/*.json
    python -m benchmarks.reliability_report [benchmarks/reliability]

Each ledger (tests/reliability/conftest.py) says what a scenario sent, what completed, what
was lost and the errors by kind; the other figures it recorded follow in the last column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_COLUMNS = ("scenario", "full", "sent", "completed", "lost", "errors", "seconds")


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return " / ".join(map(str, value))
    return str(value)


def table(ledgers: list[dict]) -> str:
    lines = [
        "| scenario | run | sent | completed | lost | errors by kind | s | also recorded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ledger in sorted(ledgers, key=lambda x: x["scenario"]):
        extra = {k: v for k, v in ledger.items() if k not in _COLUMNS}
        lines.append(
            f"| {ledger['scenario'].replace('_', ' ')} | {'full' if ledger['full'] else 'bounded'} "
            f"| {ledger['sent']} | {ledger['completed']} | {ledger['lost']} "
            f"| {_cell(ledger['errors'])} | {ledger['seconds']} | {_cell(extra)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="benchmarks/reliability")
    args = parser.parse_args()
    paths = sorted(Path(args.folder).glob("*.json"))
    if not paths:
        raise SystemExit(f"no ledgers in {args.folder}: run `make reliability` first")
    print(table([json.loads(p.read_text()) for p in paths]))


if __name__ == "__main__":
    main()

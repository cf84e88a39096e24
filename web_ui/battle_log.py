"""What the arena records, and FastChat's battle-log format for it.

A `Battle` is one vote on one round: the two models, both conversations, the verdict, who
voted (an anonymous session id) and when. `ChatLog` is one finished turn of one model in any
tab, votes or not. FastChat's cleaned battle log (fastchat/serve/monitor/clean_battle_data.py)
is one JSON object per battle:

    {"question_id", "model_a", "model_b", "winner", "judge", "conversation_a",
     "conversation_b", "turn", "anony", "language", "tstamp"}

with winner in {"model_a", "model_b", "tie", "tie (bothbad)"} and conversations as OpenAI
messages. `export_jsonl` writes that format (one object a line, FastChat's fields only);
`read_jsonl` reads it back, also from FastChat's own files (a JSON array or JSON lines), and
validates every row before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pagedserve.web_ui.ratings import WINNERS, Outcome

Message = dict[str, str]

FASTCHAT_FIELDS = (
    "question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b",
    "turn", "anony", "language", "tstamp",
)  # fmt: skip

# Words that give a model's maker or family away in an answer (FastChat's IDENTITY_WORDS,
# trimmed to names, plus the families served here). The served models' own names are added.
IDENTITY_WORDS = (
    "smollm", "hugging face", "huggingface", "llama", "vicuna", "lmsys", "koala", "chatgpt",
    "gpt-4", "openai", "anthropic", "claude", "bard", "gemini", "google", "mistral", "qwen",
    "alibaba", "chatglm", "zhipu", "pagedserve",
)  # fmt: skip


def new_id() -> str:
    return uuid.uuid4().hex


def reveals_identity(
    answers: Iterable[str], model_names: Iterable[str], words: Iterable[str] = IDENTITY_WORDS
) -> bool:
    """Whether any answer names a model or a maker: lmarena drops such votes from its ratings,
    since the voter could tell who was who. Whole words only, case-insensitive."""
    terms = {w.lower() for w in words} | {m.lower() for m in model_names}
    text = "\n".join(answers).lower()
    return any(re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", text) for t in terms if t)


@dataclass
class Battle:
    """One vote. `anony`: the names were hidden when the vote was cast."""

    model_a: str
    model_b: str
    winner: str
    conversation_a: list[Message]
    conversation_b: list[Message]
    judge: str
    anony: bool = True
    tstamp: float = field(default_factory=time.time)
    battle_id: str = field(default_factory=new_id)
    language: str = "unknown"
    leaked_identity: bool = False

    def __post_init__(self) -> None:
        self.outcome()  # validates the winner and the pair
        for name in ("conversation_a", "conversation_b"):
            _check_messages(getattr(self, name), name)
        if not self.battle_id:
            raise ValueError("battle_id must not be empty")

    @property
    def turn(self) -> int:
        return sum(m["role"] == "user" for m in self.conversation_a)

    @property
    def rated(self) -> bool:
        """Counted on the leaderboard: an anonymous vote in which no answer gave a name away."""
        return self.anony and not self.leaked_identity

    def outcome(self) -> Outcome:
        return Outcome(self.model_a, self.model_b, self.winner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Battle:
        return cls(**d)

    def to_fastchat(self) -> dict[str, Any]:
        return {
            "question_id": self.battle_id,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "winner": self.winner,
            "judge": self.judge,
            "conversation_a": self.conversation_a,
            "conversation_b": self.conversation_b,
            "turn": self.turn,
            "anony": self.anony,
            "language": self.language,
            "tstamp": self.tstamp,
        }

    @classmethod
    def from_fastchat(cls, row: dict[str, Any]) -> Battle:
        """A battle from a FastChat battle-log row. Rows without conversations (FastChat's
        "simple" mode) get empty ones; a row without question_id gets an id made from its
        content, so that importing the same file twice stores it once."""
        missing = [k for k in ("model_a", "model_b", "winner") if k not in row]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if row["winner"] not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}; got {row['winner']!r}")
        battle_id = row.get("question_id") or _content_id(row)
        conv_a = [_message(m) for m in row.get("conversation_a") or []]
        conv_b = [_message(m) for m in row.get("conversation_b") or []]
        return cls(
            model_a=str(row["model_a"]),
            model_b=str(row["model_b"]),
            winner=row["winner"],
            conversation_a=conv_a,
            conversation_b=conv_b,
            judge=str(row.get("judge") or "imported"),
            anony=bool(row.get("anony", True)),
            tstamp=float(row.get("tstamp") or 0.0),
            battle_id=str(battle_id),
            language=str(row.get("language") or "unknown"),
            # FastChat's cleaning already dropped the leaks it found; look again with our words.
            leaked_identity=reveals_identity(
                [m["content"] for m in conv_a + conv_b if m["role"] == "assistant"],
                [str(row["model_a"]), str(row["model_b"])],
            ),
        )


@dataclass
class ChatLog:
    """One finished turn of one model: the conversation up to and with its answer."""

    session_id: str
    mode: str  # "anony", "named" or "direct"
    model: str
    messages: list[Message]
    params: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None  # "stop", "length", or None when it failed
    error: str | None = None
    round_id: str | None = None
    tstamp: float = field(default_factory=time.time)
    log_id: str = field(default_factory=new_id)

    def __post_init__(self) -> None:
        if self.mode not in ("anony", "named", "direct"):
            raise ValueError(f"mode must be anony, named or direct; got {self.mode!r}")
        _check_messages(self.messages, "messages")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatLog:
        return cls(**d)


def _message(m: Any) -> Message:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"a conversation message must have role and content; got {m!r}")
    return {"role": str(m["role"]), "content": str(m["content"] or "")}


def _check_messages(messages: Sequence[Message], name: str) -> None:
    for m in messages:
        if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{name}: each message is {{role, content}}; got {m!r}")


def _content_id(row: dict[str, Any]) -> str:
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return "import-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


# -- files ---------------------------------------------------------------------------------------


def export_jsonl(battles: Iterable[Battle], out: TextIO) -> int:
    """Write FastChat battle-log lines; returns how many."""
    n = 0
    for b in battles:
        out.write(json.dumps(b.to_fastchat(), ensure_ascii=False) + "\n")
        n += 1
    return n


def _rows(text: str) -> Iterator[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # FastChat's clean_battle_*.json: one JSON array
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from e
        yield from enumerate(rows, start=1)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno}: not valid JSON: {e}") from e


def read_jsonl(path: Path) -> list[Battle]:
    """Every battle in a FastChat battle log; a bad row raises ValueError naming its line, and
    then nothing of the file is used."""
    battles = []
    for lineno, row in _rows(Path(path).read_text(encoding="utf-8")):
        if not isinstance(row, dict):
            raise ValueError(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
        try:
            battles.append(Battle.from_fastchat(row))
        except (ValueError, TypeError) as e:
            raise ValueError(f"line {lineno}: {e}") from e
    return battles

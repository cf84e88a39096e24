"""The arena's stores (SQLite and a real redis-server, one suite) and FastChat's battle-log
format: export, import, round trip, and bad files that store nothing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import redis_or_skip

from pagedserve.web_ui.battle_log import (
    FASTCHAT_FIELDS,
    Battle,
    ChatLog,
    export_jsonl,
    read_jsonl,
    reveals_identity,
)
from pagedserve.web_ui.ratings import bradley_terry, online_elo
from pagedserve.web_ui.storage import ArenaStore, RedisStore, SQLiteStore, StoreError, open_store


def conv(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def battle(i: int, winner: str = "model_a", **kw) -> Battle:
    fields = dict(
        model_a=f"m{i % 3}",
        model_b=f"m{(i + 1) % 3}",
        winner=winner,
        conversation_a=conv(f"q{i}", f"answer a{i}"),
        conversation_b=conv(f"q{i}", f"answer b{i}"),
        judge=f"arena_user_s{i % 2}",
        tstamp=1000.0 + i,
        battle_id=f"b{i}",
    )
    fields.update(kw)
    return Battle(**fields)


@pytest.fixture(params=["sqlite", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ArenaStore]:
    if request.param == "sqlite":
        s: ArenaStore = SQLiteStore(tmp_path / "arena.db")
        yield s
        s.close()
        return
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        s = RedisStore(server.url, prefix="test:arena")
        yield s
        s.close()


def test_votes_are_stored_once_and_come_back_in_time_order(store: ArenaStore) -> None:
    later, earlier = battle(2, tstamp=2000.0), battle(1, winner="tie (bothbad)")
    assert store.add_vote(later) is True
    assert store.add_vote(earlier) is True
    assert store.add_vote(later) is False  # a double click, a retry: still one vote
    got = store.votes()
    assert [b.battle_id for b in got] == ["b1", "b2"]
    assert got[0] == earlier and got[1] == later  # every field survives


def test_a_batch_is_all_new_rows_in_one_step(store: ArenaStore) -> None:
    store.add_vote(battle(0))
    assert store.add_votes([battle(i) for i in range(4)]) == 3
    assert store.add_votes([]) == 0
    assert len(store.votes()) == 4


def test_rated_votes_leave_out_named_and_leaked_battles(store: ArenaStore) -> None:
    store.add_votes(
        [
            battle(0),
            battle(1, anony=False),
            battle(2, leaked_identity=True),
            battle(3, winner="tie"),
        ]
    )
    assert [b.battle_id for b in store.rated_votes()] == ["b0", "b3"]


def test_chat_logs_round_trip(store: ArenaStore) -> None:
    ok = ChatLog("s1", "direct", "m0", conv("hi", "hello"), {"temperature": 0.5}, "stop")
    failed = ChatLog(
        "s1", "anony", "m1", [{"role": "user", "content": "hi"}], error="model down", tstamp=1.0
    )
    store.add_chat(ok)
    store.add_chat(failed)
    store.add_chat(ok)
    assert store.chats() == [failed, ok]


def test_sqlite_keeps_votes_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "arena.db"
    first = open_store(db_path=path)
    first.add_vote(battle(0))
    first.close()
    again = open_store(db_path=path)
    assert [b.battle_id for b in again.votes()] == ["b0"]
    again.close()


# -- FastChat's battle-log format ----------------------------------------------------------------


def test_export_writes_fastchat_rows() -> None:
    out = io.StringIO()
    b = battle(0, conversation_a=conv("q", "a") + conv("q2", "a2"))
    b.conversation_b = b.conversation_a
    assert export_jsonl([b], out) == 1
    row = json.loads(out.getvalue())
    assert tuple(row) == FASTCHAT_FIELDS
    assert row["winner"] == "model_a" and row["turn"] == 2 and row["anony"] is True
    assert row["judge"] == "arena_user_s0" and row["question_id"] == "b0"
    assert row["conversation_a"][1] == {"role": "assistant", "content": "a"}


def test_export_import_round_trip_gives_the_same_battles_and_ratings(tmp_path: Path) -> None:
    winners = ["model_a", "model_b", "tie", "tie (bothbad)", "model_a", "model_a"]
    original = [battle(i, w) for i, w in enumerate(winners)]
    path = tmp_path / "battles.jsonl"
    with open(path, "w") as f:
        export_jsonl(original, f)
    back = read_jsonl(path)
    assert back == original
    assert online_elo([b.outcome() for b in back]) == online_elo([b.outcome() for b in original])
    store = SQLiteStore(tmp_path / "imported.db")
    assert store.add_votes(back) == len(original)
    assert store.add_votes(read_jsonl(path)) == 0  # importing the file again adds nothing
    stored = [b.outcome() for b in store.votes()]
    assert bradley_terry(stored) == bradley_terry([b.outcome() for b in original])
    store.close()


def test_import_reads_fastchat_json_arrays_and_simple_rows(tmp_path: Path) -> None:
    rows = [
        {  # clean_battle_data.py "simple" mode: no conversations, no question_id
            "model_a": "vicuna-13b",
            "model_b": "koala-13b",
            "winner": "model_a",
            "judge": "arena_user_1",
            "turn": 1,
            "anony": True,
            "language": "English",
            "tstamp": 1682351591.1322,
        },
        {
            "model_a": "koala-13b",
            "model_b": "vicuna-13b",
            "winner": "tie (bothbad)",
            "judge": "arena_user_2",
            "anony": False,
            "tstamp": 1682351600.0,
            "conversation_a": conv("who are you?", "I am Vicuna, made by LMSYS."),
            "conversation_b": conv("who are you?", "A helpful assistant."),
        },
    ]
    path = tmp_path / "clean_battle.json"
    path.write_text(json.dumps(rows, indent=2))
    got = read_jsonl(path)
    assert [b.winner for b in got] == ["model_a", "tie (bothbad)"]
    assert got[0].language == "English" and got[0].conversation_a == []
    assert got[0].battle_id.startswith("import-")
    assert read_jsonl(path)[0].battle_id == got[0].battle_id  # same row, same id
    assert got[1].leaked_identity and not got[1].rated and not got[1].anony


@pytest.mark.parametrize(
    "line, error",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"model_a": "x", "model_b": "y", "winner": "leftvote"}', "line 2: winner"),
        ('{"model_a": "x", "winner": "tie"}', "line 2: missing model_b"),
        ('{"model_a": "x", "model_b": "x", "winner": "tie"}', "line 2: .*two different"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_a_bad_row_names_its_line_and_nothing_is_imported(
    tmp_path: Path, line: str, error: str
) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(battle(0).to_fastchat())
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=error):
        read_jsonl(path)


def test_cli_export_and_import(tmp_path: Path) -> None:
    src = SQLiteStore(tmp_path / "src.db")
    src.add_votes([battle(0), battle(1, anony=False), battle(2, leaked_identity=True)])
    src.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pagedserve.deploy.cli", "arena", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    out = tmp_path / "all.jsonl"
    r = cli("export", "--db", str(tmp_path / "src.db"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote 3 battles" in r.stdout
    rated = tmp_path / "rated.jsonl"
    r = cli("export", "--db", str(tmp_path / "src.db"), "--out", str(rated), "--rated-only")
    assert r.returncode == 0, r.stderr
    assert len(rated.read_text().splitlines()) == 1
    r = cli("import", str(out), "--db", str(tmp_path / "dst.db"))
    assert r.returncode == 0 and "imported 3 battles (0 already stored)" in r.stdout
    r = cli("import", str(out), "--db", str(tmp_path / "dst.db"))
    assert "imported 0 battles (3 already stored)" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text() + "oops\n")
    r = cli("import", str(bad), "--db", str(tmp_path / "fresh.db"))
    assert r.returncode == 1 and "line 4" in r.stderr and "nothing was imported" in r.stderr
    fresh = SQLiteStore(tmp_path / "fresh.db")
    assert fresh.votes() == []
    fresh.close()


def test_identity_words_match_whole_words_only() -> None:
    assert reveals_identity(["I was trained by OpenAI."], [])
    assert reveals_identity(["Ask tiny-a anything"], ["tiny-a"])
    assert not reveals_identity(["The llamas graze; a googleplex"], [])
    assert not reveals_identity(["tiny-ab is not a name here"], ["tiny-a"])


def test_open_store_takes_redis_when_given_a_url(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(StoreError, match="cannot reach Redis at redis://127.0.0.1:1/0"):
        open_store(redis_url="redis://127.0.0.1:1/0")
    with redis_or_skip(tmp_path_factory.mktemp("redis")) as server:
        store = open_store(db_path="ignored.db", redis_url=server.url, prefix="p1")
        assert isinstance(store, RedisStore)
        store.add_vote(battle(0))
        other = open_store(redis_url=server.url, prefix="p2")  # prefixes keep arenas apart
        assert other.votes() == [] and [b.battle_id for b in store.votes()] == ["b0"]
        store.close()
        other.close()

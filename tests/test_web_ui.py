"""The arena end to end: `pagedserve ui` as a real process in front of a real OpenAI endpoint
(the gateway when it exists, else a tiny-model worker's own /v1 routes, which serve the same
API), driven through `gradio_client` and through a real browser (Playwright + Debian's
Chromium). A battle, a vote, the vote stored, the leaderboard updated; the errors a person
can cause or meet: empty and over-long prompts, double votes, a model that is down, a gateway
that is down."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import (
    ServerProcess,
    cli,
    controller_process,
    free_port,
    skip_or_fail_in_ci,
    start_all,
    wait_until,
    worker_process,
)

# gradio_client reports every Client it makes to a telemetry endpoint unless told not to.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
from gradio_client import Client  # noqa: E402

from pagedserve.web_ui.storage import SQLiteStore  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
SCREENSHOT_COPY = Path("/tmp/arena-screenshot.png")
ENGINE = {"kv_cache_memory": 16 << 20, "max_model_len": 512}
DESCRIPTIONS = (
    "tiny-a=tiny random Llama (copy A): random weights, for speed tests;"
    "tiny-b=tiny random Llama (copy B): random weights, for speed tests"
)
MAX_PROMPT_CHARS = 300


@dataclass
class Stack:
    arena: ServerProcess
    arena_down: ServerProcess  # its gateway URL points at a port where nothing listens
    arena_limited: ServerProcess | None  # its API key may send one request a minute
    db: Path

    @contextlib.contextmanager
    def client(self, which: str = "arena") -> Iterator[Client]:
        """A gradio_client session (its own gr.State) on arena, arena_down or arena_limited."""
        server = getattr(self, which)
        assert server is not None
        c = Client(server.url + "/", verbose=False)
        try:
            yield c
        finally:
            c.close()

    def votes(self) -> list[Any]:
        store = SQLiteStore(self.db)
        try:
            return store.votes()
        finally:
            store.close()

    def chats(self) -> list[Any]:
        store = SQLiteStore(self.db)
        try:
            return store.chats()
        finally:
            store.close()


def arena_process(
    log_dir: Path, gateway_url: str, db: Path, name: str, api_key: str | None = None
) -> ServerProcess:
    port = free_port()
    key = ["--api-key", api_key] if api_key else []
    argv = cli(
        "ui",
        *key,
        "--gateway-url", gateway_url,
        "--port", str(port),
        "--db", str(db),
        "--max-tokens", "24",
        "--max-prompt-chars", str(MAX_PROMPT_CHARS),
        "--bootstrap-rounds", "20",
        "--seed", "0",
        "--model-descriptions", DESCRIPTIONS,
    )  # fmt: skip
    return ServerProcess(name, argv, port, log_dir, ready_path="/health")


def gateway_available() -> bool:
    """The gateway is there once api_gateway/app.py and a `pagedserve gateway` command exist."""
    from pagedserve.deploy.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
    return (
        "gateway" in commands and importlib.util.find_spec("pagedserve.api_gateway.app") is not None
    )


KEYS = {"arena": "sk-arena-main-0123456789", "limited": "sk-arena-limited-0123456789"}


@dataclass
class Backend:
    url: str
    servers: list[ServerProcess]
    keys: dict[str, str]  # arena name -> API key; empty without the gateway


def openai_backend(log_dir: Path, model: Path) -> Backend:
    """The OpenAI API serving the tiny model as tiny-a and tiny-b: controller + worker + gateway
    (with API keys, one of them limited to a request a minute) when the gateway exists, else the
    worker alone (its own /v1 routes, no keys). One worker serves both names: two "models" for
    the price of one."""
    names = "tiny-a,tiny-b"
    if not gateway_available():
        worker = worker_process(log_dir, model, None, model_names=names, **ENGINE)
        start_all(worker, timeout=120)
        return Backend(worker.url, [worker], {})
    key_file = log_dir / "keys.jsonl"
    key_file.write_text(
        json.dumps({"key": KEYS["arena"], "name": "arena"})
        + "\n"
        + json.dumps({"key": KEYS["limited"], "name": "limited", "rpm": 1})
        + "\n"
    )
    controller = controller_process(log_dir)
    start_all(controller)
    worker = worker_process(log_dir, model, controller.url, model_names=names, **ENGINE)
    port = free_port()
    argv = cli("gateway", "--host", "127.0.0.1", "--port", str(port),
               "--controller-address", controller.url, "--api-keys", str(key_file))  # fmt: skip
    gateway = ServerProcess("gateway", argv, port, log_dir)
    auth = {"Authorization": f"Bearer {KEYS['arena']}"}
    try:
        start_all(worker, gateway, timeout=120)
        wait_until(
            lambda: (
                {"tiny-a", "tiny-b"}
                <= {
                    m["id"]
                    for m in httpx.get(gateway.url + "/v1/models", headers=auth, timeout=5).json()[
                        "data"
                    ]
                }
            ),
            60,
            what="the gateway lists tiny-a and tiny-b",
        )
    except BaseException:
        controller.stop()
        raise
    return Backend(gateway.url, [gateway, worker, controller], KEYS)


def stop_all(servers: list[ServerProcess]) -> None:
    for s in servers:  # all at once: each arena gives open connections a few seconds
        s.signal(signal.SIGTERM)
    for s in servers:
        if s.proc is None:
            continue
        try:
            s.wait(timeout=15)
        except subprocess.TimeoutExpired:
            s.kill()


@pytest.fixture(scope="module")
def stack(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("arena")
    db = log_dir / "arena.db"
    down_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    arena_down = arena_process(log_dir, down_url, log_dir / "down.db", "arena-down")
    arena_down.start(wait=False)  # starts while the model loads
    try:
        backend = openai_backend(log_dir, tiny_llama)
    except BaseException:
        arena_down.stop()
        raise
    arena = arena_process(log_dir, backend.url, db, "arena", backend.keys.get("arena"))
    limited = None
    if "limited" in backend.keys:
        limited_db = log_dir / "limited.db"
        limited = arena_process(log_dir, backend.url, limited_db, "arena-limited", KEYS["limited"])
    started = [arena] + ([limited] if limited else [])
    servers = [*started, arena_down, *backend.servers]
    try:
        start_all(*started, timeout=60)
        arena_down.wait_ready(60)
        yield Stack(arena, arena_down, limited, db)
    finally:
        stop_all(servers)


def texts(chat: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of each message of a chatbot value as gradio_client returns it."""
    out = []
    for m in chat:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        out.append((m["role"], content))
    return out


# outputs of the battle and side-by-side endpoints (gr.State and buttons are not returned)
CHAT_A, CHAT_B, NAME_A, NAME_B, STATUS = range(5)


def test_battle_vote_is_stored_and_the_leaderboard_updates(stack: Stack) -> None:
    before = len(stack.votes())
    with stack.client() as c:
        out = c.predict("Say hello in three words.", api_name="/battle_send")
        for chat in (out[CHAT_A], out[CHAT_B]):
            (role_q, prompt), (role_a, answer) = texts(chat)
            assert (role_q, prompt) == ("user", "Say hello in three words.")
            assert role_a == "assistant" and answer and not answer.startswith("⚠️")
        assert "hidden until you vote" in out[NAME_A] and "hidden until you vote" in out[NAME_B]
        assert "Both answers are in" in out[STATUS]
        out = c.predict("Now in two words.", api_name="/battle_send")  # a second turn
        assert [r for r, _ in texts(out[CHAT_B])] == ["user", "assistant"] * 2

        out = c.predict(api_name="/battle_vote_b")
        assert "Thanks for voting" in out[STATUS]
        names = out[NAME_A] + out[NAME_B]
        assert "tiny-a" in names and "tiny-b" in names and "random weights" in names
        votes = stack.votes()
        assert len(votes) == before + 1
        vote = votes[-1]
        assert vote.winner == "model_b" and vote.anony and vote.rated
        assert {vote.model_a, vote.model_b} == {"tiny-a", "tiny-b"}
        assert vote.model_a in out[NAME_A] and vote.model_b in out[NAME_B]
        assert vote.conversation_a[0] == {"role": "user", "content": "Say hello in three words."}
        assert vote.judge.startswith("arena_user_") and vote.turn == 2

        out = c.predict(api_name="/battle_vote_a")  # a second click: refused, nothing stored
        assert "already voted" in out[STATUS]
        out = c.predict("And another thing", api_name="/battle_send")
        assert "round is over" in out[STATUS]
        assert len(stack.votes()) == before + 1
        assert sum(1 for log in stack.chats() if log.round_id == vote.battle_id) == 4

        summary, table, win_plot, count_plot = c.predict(api_name="/leaderboard_refresh")
        rows = {row[1]: row for row in table["data"]}
        rated = [v for v in stack.votes() if v.rated]
        assert f"**{len(rated)} rated battles**" in summary
        assert set(rows) == {"tiny-a", "tiny-b"}
        played = sum(1 for v in rated if "tiny-a" in (v.model_a, v.model_b))
        assert rows["tiny-a"][6] == played and "random weights" in rows["tiny-a"][7]
        assert win_plot["type"] == "matplotlib" and count_plot["plot"].startswith("data:image")

        out = c.predict(api_name="/battle_new_round")
        assert texts(out[CHAT_A]) == [] and "New round" in out[STATUS]


def test_bad_input_is_answered_with_a_message_and_stores_nothing(stack: Stack) -> None:
    before_votes, before_chats = len(stack.votes()), len(stack.chats())
    with stack.client() as c:
        out = c.predict(api_name="/battle_vote_tie")
        assert "Ask something first" in out[STATUS]
        out = c.predict("   ", api_name="/battle_send")
        assert "Please type a prompt first" in out[STATUS] and texts(out[CHAT_A]) == []
        out = c.predict("x" * (MAX_PROMPT_CHARS + 1), api_name="/battle_send")
        assert f"the limit is {MAX_PROMPT_CHARS}" in out[STATUS] and texts(out[CHAT_B]) == []
        out = c.predict(api_name="/battle_regenerate")
        assert "Nothing to regenerate" in out[STATUS]
        out = c.predict("hi", "tiny-a", "tiny-a", api_name="/named_send")
        assert "two different models" in out[STATUS]
        assert len(stack.votes()) == before_votes and len(stack.chats()) == before_chats


def test_a_model_that_is_down_fails_its_side_only(stack: Stack) -> None:
    with stack.client() as c:
        out = c.predict("Hello?", "tiny-a", "ghost-model", api_name="/named_send")
        (_, _), (role, answer) = texts(out[CHAT_A])
        assert role == "assistant" and answer and not answer.startswith("⚠️")
        (_, _), (_, error) = texts(out[CHAT_B])
        assert error.startswith("⚠️ **Error:**") and "ghost-model" in error and "(HTTP 4" in error
        assert "An answer failed" in out[STATUS]
        assert "`tiny-a`" in out[NAME_A]  # side-by-side: names always shown
        out = c.predict(api_name="/named_vote_a")
        assert "cannot be voted on" in out[STATUS]
        out = c.predict(api_name="/named_regenerate")  # retries the failed side only
        assert texts(out[CHAT_A])[-1] == ("assistant", answer)
        assert "ghost-model" in texts(out[CHAT_B])[-1][1] and "An answer failed" in out[STATUS]
        failed = [log for log in stack.chats() if log.model == "ghost-model"]
        assert failed and failed[-1].error and failed[-1].finish_reason is None


def test_a_gateway_that_is_down_is_reported_in_the_ui(stack: Stack) -> None:
    with stack.client("arena_down") as c:
        out = c.predict("Anyone there?", api_name="/battle_send")
        assert "Cannot reach the gateway at http://127.0.0.1:" in out[STATUS]
        assert texts(out[CHAT_A]) == [] and texts(out[CHAT_B]) == []
        out = c.predict("Hi", "tiny-a", 0.0, 1.0, 16, api_name="/direct_send")
        (_, _), (_, error) = texts(out[0])
        assert "Cannot reach the gateway" in error


def test_a_rate_limited_side_says_so_and_the_other_answers(stack: Stack) -> None:
    if stack.arena_limited is None:
        skip_or_fail_in_ci(
            "needs the gateway (api_gateway/app.py and `pagedserve gateway`) for API keys"
        )
    with stack.client("arena_limited") as c:
        out = c.predict("Hello both", api_name="/battle_send")
    answers = [texts(out[i])[-1][1] for i in (CHAT_A, CHAT_B)]
    limited = [a for a in answers if a.startswith("⚠️ **Error:** Rate limit reached")]
    answered = [a for a in answers if not a.startswith("⚠️")]
    assert len(limited) == 1 and len(answered) == 1, answers
    assert "(HTTP 429)" in limited[0] and "try again" in limited[0]
    assert "An answer failed" in out[STATUS]


def test_direct_chat_takes_sampling_parameters_and_logs_the_turn(stack: Stack) -> None:
    with stack.client() as c:
        out = c.predict("Hi there", "tiny-b", 0.0, 1.0, 16, api_name="/direct_send")
        (_, q), (role, answer) = texts(out[0])
        assert q == "Hi there" and role == "assistant" and answer
        log = [entry for entry in stack.chats() if entry.mode == "direct"][-1]
        assert log.model == "tiny-b" and log.params == {
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": 16,
        }
        assert (
            log.finish_reason in ("stop", "length")
            and log.messages[-1]["content"].split() == answer.split()
        )
        out = c.predict("And again", "tiny-b", 0.0, 1.0, 16, api_name="/direct_send")
        assert [r for r, _ in texts(out[0])] == ["user", "assistant", "user", "assistant"]


def test_browser_plays_a_battle_and_votes(stack: Stack, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        skip_or_fail_in_ci(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright import sync_api

    before = len(stack.votes())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(stack.arena.url + "/", timeout=30_000)
            expect = sync_api.expect
            page.locator("#battle-prompt textarea").fill("Write a haiku about the sea.")
            page.locator("#battle-send").click()
            expect(page.locator("#battle-status")).to_contain_text(
                "Both answers are in", timeout=60_000
            )
            for side in "ab":
                bot = page.locator(f'#battle-chat-{side} [data-testid="bot"]')
                expect(bot).to_have_count(1)
                assert bot.inner_text().strip()
            expect(page.locator("#battle-name-a")).to_contain_text("hidden until you vote")
            page.locator("#battle-vote_a").click()
            expect(page.locator("#battle-status")).to_contain_text("Thanks for voting")
            expect(page.locator("#battle-name-a")).to_contain_text("random weights")
            expect(page.locator("#battle-vote_b")).to_be_disabled()
            shot = tmp_path / "arena-screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    shutil.copyfile(shot, SCREENSHOT_COPY)
    print(f"screenshot: {shot} (copied to {SCREENSHOT_COPY})", file=sys.stderr)
    votes = stack.votes()
    assert len(votes) == before + 1 and votes[-1].winner == "model_a"
    assert time.time() - votes[-1].tstamp < 120

"""The arena as a Gradio Blocks app, mounted on a FastAPI app with a /health route.

`build_blocks(services)` builds the UI; `create_app(config)` opens the gateway client
and the store and mounts the UI; `serve(config)` runs it under uvicorn. No module-level
state: everything a session owns lives in its `gr.State`, everything shared in `Services`.

Tabs: Arena (battle: two anonymous models), Arena (side-by-side: two named models), Direct
chat, Leaderboard. The rules (what may be sent, voted, regenerated) are in `session.py`;
the handlers here only apply them and show the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from pagedserve.deploy.http_limits import BodyLimit
from pagedserve.web_ui.battle_log import ChatLog
from pagedserve.web_ui.config import ArenaConfig
from pagedserve.web_ui.gateway_client import ChatParams, GatewayClient, GatewayError
from pagedserve.web_ui.leaderboard import (
    COLUMNS,
    battle_count_figure,
    build_board,
    win_fraction_figure,
)
from pagedserve.web_ui.session import Round, Side, chat_log, check_prompt, sample_pair, stream_sides
from pagedserve.web_ui.storage import ArenaStore, StoreError, open_store

# Gradio phones home for analytics and version checks unless told not to; set before import.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

logger = logging.getLogger(__name__)

VOTE_BUTTONS = [
    ("leftvote", "👈 A is better", "vote_a"),
    ("rightvote", "👉 B is better", "vote_b"),
    ("tievote", "🤝 Tie", "vote_tie"),
    ("bothbad_vote", "👎 Both are bad", "vote_bothbad"),
]

BATTLE_RULES = """\
# ⚔️ Chatbot Arena
Two anonymous models answer your prompt side by side. Ask anything (several turns if you
like), then vote for the better answer: the names are revealed after your vote, and only
votes cast while the names were hidden count on the leaderboard. Click **New round** for
two new models.
"""


@dataclass
class Services:
    """What all sessions share: the gateway client, the store, the model list cache."""

    config: ArenaConfig
    client: GatewayClient
    store: ArenaStore
    rng: random.Random = field(default_factory=random.Random)
    _models: list[str] = field(default_factory=list)
    _models_at: float = float("-inf")

    async def models(self) -> list[str]:
        """The models to offer: --models, else the gateway's /v1/models (cached a while)."""
        if self.config.models:
            return list(self.config.models)
        if time.monotonic() - self._models_at > self.config.models_ttl or not self._models:
            self._models = await self.client.list_models()
            self._models_at = time.monotonic()
        return list(self._models)

    @property
    def params(self) -> ChatParams:
        c = self.config
        return ChatParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens)

    async def log_turn(self, log: ChatLog) -> None:
        try:
            await asyncio.to_thread(self.store.add_chat, log)
        except StoreError:
            logger.exception("could not store a conversation log")


def session_id(request: gr.Request | None) -> str:
    """An anonymous id for the browser session: a hash of Gradio's random session hash."""
    raw = getattr(request, "session_hash", None) or uuid.uuid4().hex
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _status(text: str, kind: str = "info") -> str:
    icon = {"info": "ℹ️", "warn": "⚠️", "ok": "✅"}[kind]
    return f"{icon} {text}" if text else ""


# -- the two-model tabs --------------------------------------------------------------------------


class RoundPanel:
    """The chats, names, buttons and handlers of one two-model tab. `anony` panels draw their
    models; named panels take them from two dropdowns."""

    def __init__(self, services: Services, anony: bool) -> None:
        self.s = services
        self.anony = anony
        prefix = "battle" if anony else "named"
        self.prefix = prefix
        self.state = gr.State(None)
        self.pickers: list[gr.Dropdown] = []
        if not anony:
            with gr.Row():
                self.pickers = [
                    gr.Dropdown(
                        choices=services.config.models,
                        label=f"Model {x}",
                        allow_custom_value=True,  # the list comes from the gateway on load
                        elem_id=f"{prefix}-pick-{x.lower()}",
                    )
                    for x in "AB"
                ]
        with gr.Row():
            self.chats = [
                gr.Chatbot(
                    label=f"Model {x}",
                    height=420,
                    elem_id=f"{prefix}-chat-{x.lower()}",
                    buttons=["copy"],
                    feedback_options=None,
                )
                for x in "AB"
            ]
        with gr.Row():
            self.names = [gr.Markdown(elem_id=f"{prefix}-name-{x.lower()}") for x in "AB"]
        with gr.Row():
            self.votes = [
                gr.Button(label, interactive=False, elem_id=f"{prefix}-{api}")
                for _, label, api in VOTE_BUTTONS
            ]
        with gr.Row():
            self.prompt = gr.Textbox(
                show_label=False,
                placeholder="👉 Type your prompt and press Enter",
                scale=8,
                max_lines=8,
                elem_id=f"{prefix}-prompt",
            )
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
        with gr.Row():
            self.regen = gr.Button("🔄 Regenerate", interactive=False, elem_id=f"{prefix}-regen")
            self.new = gr.Button("🎲 New round", elem_id=f"{prefix}-new")
        self.status = gr.Markdown(elem_id=f"{prefix}-status")
        self._wire()

    @property
    def outputs(self) -> list[Any]:
        return [
            self.state, *self.chats, *self.names, self.status, self.prompt, *self.votes,
            self.regen, self.send,
        ]  # fmt: skip

    def render(self, rnd: Round | None, status: str = "", clear_prompt: bool = False) -> tuple:
        busy = rnd is not None and rnd.busy
        voted = rnd is not None and rnd.winner is not None
        can_vote = rnd is not None and rnd.refuse_vote() is None
        chats = [rnd.sides[i].display() if rnd else [] for i in range(2)]
        names = [self._name(rnd, i) for i in range(2)]
        prompt = (
            gr.update(value="", interactive=not voted)
            if clear_prompt
            else gr.update(interactive=not voted)
        )
        return (
            rnd,
            *chats,
            *names,
            status,
            prompt,
            *[gr.update(interactive=can_vote) for _ in self.votes],
            gr.update(interactive=rnd is not None and not busy and not voted and rnd.turns > 0),
            gr.update(interactive=not busy and not voted),
        )

    def _name(self, rnd: Round | None, i: int) -> str:
        if rnd is None:
            return ""
        model = rnd.sides[i].model
        if self.anony and rnd.winner is None:
            return f"**Model {'AB'[i]}**: hidden until you vote"
        return f"### Model {'AB'[i]}: `{model}`\n{self.s.config.describe(model)}"

    # -- handlers -----------------------------------------------------------------------------

    async def _new_round(self, picks: tuple[str | None, ...], request: gr.Request | None) -> Round:
        """Raises ValueError or GatewayError with a message for the person."""
        sid = session_id(request)
        if self.anony:
            models = await self.s.models()
            a, b = sample_pair(models, self.s.config.weight, self.s.rng)
        else:
            a, b = picks
            if not a or not b:
                raise ValueError("Pick a model for each side first.")
            if a == b:
                raise ValueError("Pick two different models.")
        return Round.start(a, b, anony=self.anony, session_id=sid)

    async def _stream(self, rnd: Round, sides: list[int]) -> AsyncIterator[tuple]:
        params = self.s.params
        logs: list[ChatLog] = []

        def finished(i: int, side: Side) -> None:
            logs.append(chat_log(rnd, side, rnd.session_id, params))

        chosen = [rnd.sides[i] for i in sides]
        async with aclosing(stream_sides(self.s.client, chosen, params, finished)) as updates:
            async for _ in updates:
                yield self.render(rnd)
        for log in logs:
            await self.s.log_turn(log)
        if rnd.failed:
            msg = "An answer failed (see the chat). Regenerate to try again, or start a new round."
            yield self.render(rnd, _status(msg, "warn"))
        else:
            yield self.render(rnd, _status("Both answers are in: vote, or keep chatting."))

    async def on_send_battle(
        self, rnd: Round | None, prompt: str, request: gr.Request
    ) -> AsyncIterator[tuple]:
        async with aclosing(self._send(rnd, prompt, (), request)) as updates:
            async for update in updates:
                yield update

    async def on_send_named(
        self, rnd: Round | None, prompt: str, a: str | None, b: str | None, request: gr.Request
    ) -> AsyncIterator[tuple]:
        async with aclosing(self._send(rnd, prompt, (a, b), request)) as updates:
            async for update in updates:
                yield update

    async def _send(
        self,
        rnd: Round | None,
        prompt: str,
        picks: tuple[str | None, ...],
        request: gr.Request | None,
    ) -> AsyncIterator[tuple]:
        c = self.s.config
        refused = check_prompt(prompt, c.max_prompt_chars)
        if refused is None and rnd is None:
            try:
                rnd = await self._new_round(picks, request)
            except (ValueError, GatewayError) as e:
                yield self.render(None, _status(str(e), "warn"))
                return
        if refused is None:
            assert rnd is not None
            refused = rnd.refuse_prompt(prompt, c.max_prompt_chars, c.max_turns)
        if refused:
            yield self.render(rnd, _status(refused, "warn"))
            return
        assert rnd is not None
        sides = rnd.add_prompt(prompt)
        async with aclosing(self._stream(rnd, sides)) as updates:
            first = True
            async for update in updates:
                if first:  # clear the prompt box once, with the first update
                    update = self.render(rnd, "", clear_prompt=True)
                    first = False
                yield update

    async def on_regenerate(self, rnd: Round | None) -> AsyncIterator[tuple]:
        refused = rnd.refuse_regenerate() if rnd else "Nothing to regenerate yet."
        if refused:
            yield self.render(rnd, _status(refused, "warn"))
            return
        assert rnd is not None
        async with aclosing(self._stream(rnd, rnd.rewind())) as updates:
            async for update in updates:
                yield update

    def vote_handler(self, vote_type: str):
        async def on_vote(rnd: Round | None, request: gr.Request) -> tuple:
            try:  # every model's name counts as giving an identity away
                known = await self.s.models()
            except GatewayError:
                known = []
            refused = rnd.refuse_vote() if rnd else "Ask something first, then vote."
            if refused:
                return self.render(rnd, _status(refused, "warn"))
            assert rnd is not None
            # No await between the check above and Round.vote, which closes the round: of two
            # clicks racing, the second is refused.
            battle = rnd.vote(vote_type, judge=f"arena_user_{rnd.session_id}", known_models=known)
            try:
                stored = await asyncio.to_thread(self.s.store.add_vote, battle)
            except StoreError as e:
                rnd.winner, rnd.leaked_identity = None, False  # nothing stored: vote again
                logger.exception("could not store a vote")
                return self.render(rnd, _status(f"Your vote could not be saved ({e}).", "warn"))
            if not stored:
                return self.render(rnd, _status("This vote was already recorded.", "warn"))
            msg = "Thanks for voting! The names are shown above. Click “New round” to play again."
            if rnd.leaked_identity:
                msg += (
                    " An answer named a model, so this vote is logged but not counted on the "
                    "leaderboard."
                )
            elif not rnd.anony:
                msg = (
                    "Thanks for voting! Side-by-side votes are logged; only anonymous battles "
                    "count on the leaderboard."
                )
            return self.render(rnd, _status(msg, "ok"))

        return on_vote

    async def on_new_round(self) -> tuple:
        text = "New round: type a prompt to meet two new anonymous models."
        if not self.anony:
            text = "Cleared: pick two models and type a prompt."
        return self.render(None, _status(text), clear_prompt=True)

    async def on_picked(self, rnd: Round | None) -> tuple:
        if rnd is None:
            return self.render(None)
        if rnd.busy:
            return self.render(rnd, _status("Wait until both answers are complete.", "warn"))
        return self.render(None, _status("Models changed: the conversation starts anew."))

    async def on_clear(self, rnd: Round | None) -> tuple:
        if rnd is not None and rnd.busy:
            return self.render(rnd, _status("Wait until both answers are complete.", "warn"))
        return await self.on_new_round()

    def _wire(self) -> None:
        p = self.prefix
        send_inputs = [self.state, self.prompt, *self.pickers]
        on_send = self.on_send_battle if self.anony else self.on_send_named
        for trigger, api in ((self.send.click, f"{p}_send"), (self.prompt.submit, None)):
            trigger(
                on_send,
                send_inputs,
                self.outputs,
                api_name=api,
                api_visibility="public" if api else "private",
                trigger_mode="once",
            )
        self.regen.click(
            self.on_regenerate,
            [self.state],
            self.outputs,
            api_name=f"{p}_regenerate",
            trigger_mode="once",
        )
        for button, (vote_type, _, api) in zip(self.votes, VOTE_BUTTONS, strict=True):
            button.click(
                self.vote_handler(vote_type),
                [self.state],
                self.outputs,
                api_name=f"{p}_{api}",
                trigger_mode="once",
            )
        self.new.click(self.on_new_round, None, self.outputs, api_name=f"{p}_new_round")
        for chat in self.chats:  # the chat's own trash button
            chat.clear(self.on_clear, [self.state], self.outputs, api_visibility="private")
        for picker in self.pickers:  # another model: another round
            picker.change(self.on_picked, [self.state], self.outputs, api_visibility="private")


# -- direct chat ----------------------------------------------------------------------------------


class DirectChatPanel:
    def __init__(self, services: Services) -> None:
        self.s = services
        c = services.config
        self.state = gr.State(None)
        with gr.Row():
            self.picker = gr.Dropdown(
                choices=c.models,
                label="Model",
                allow_custom_value=True,
                elem_id="direct-pick",
                scale=2,
            )
            self.about = gr.Markdown(elem_id="direct-about")
        self.chat = gr.Chatbot(
            label="Chat", height=420, elem_id="direct-chat", feedback_options=None
        )
        with gr.Row():
            self.prompt = gr.Textbox(
                show_label=False,
                placeholder="👉 Type your message and press Enter",
                scale=8,
                max_lines=8,
                elem_id="direct-prompt",
            )
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id="direct-send")
        with gr.Row():
            self.temperature = gr.Slider(
                0.0, 2.0, value=c.temperature, step=0.05, label="Temperature"
            )
            self.top_p = gr.Slider(0.05, 1.0, value=c.top_p, step=0.05, label="Top-p")
            self.max_tokens = gr.Slider(
                16, max(2048, c.max_tokens), value=c.max_tokens, step=16, label="Max new tokens"
            )
        self.clear = gr.Button("🗑️ Clear", elem_id="direct-clear")
        self.status = gr.Markdown(elem_id="direct-status")
        outputs = [self.state, self.chat, self.status, self.prompt, self.send]
        inputs = [
            self.state,
            self.prompt,
            self.picker,
            self.temperature,
            self.top_p,
            self.max_tokens,
        ]
        self.send.click(self.on_send, inputs, outputs, api_name="direct_send", trigger_mode="once")
        self.prompt.submit(
            self.on_send, inputs, outputs, api_visibility="private", trigger_mode="once"
        )
        self.clear.click(self.on_clear, None, outputs, api_name="direct_clear")
        self.chat.clear(self.on_clear, None, outputs, api_visibility="private")
        self.picker.change(
            self.on_pick, [self.picker], [*outputs, self.about], api_visibility="private"
        )

    def render(self, side: Side | None, status: str = "", clear_prompt: bool = False) -> tuple:
        busy = side is not None and side.streaming
        prompt = gr.update(value="") if clear_prompt else gr.update()
        return side, side.display() if side else [], status, prompt, gr.update(interactive=not busy)

    async def on_pick(self, model: str | None) -> tuple:
        about = f"`{model}`: {self.s.config.describe(model)}" if model else ""
        return (*self.render(None), about)

    async def on_clear(self) -> tuple:
        return self.render(None, clear_prompt=True)

    async def on_send(
        self,
        side: Side | None,
        prompt: str,
        model: str | None,
        temperature: float,
        top_p: float,
        max_tokens: float,
        request: gr.Request,
    ) -> AsyncIterator[tuple]:
        c = self.s.config
        refused = check_prompt(prompt, c.max_prompt_chars)
        if not refused and not model:
            refused = "Pick a model first."
        if not refused and side is not None and side.streaming:
            refused = "Wait until the answer is complete."
        if refused:
            yield self.render(side, _status(refused, "warn"))
            return
        try:
            params = ChatParams(float(temperature), float(top_p), int(max_tokens))
        except ValueError as e:
            yield self.render(side, _status(str(e), "warn"))
            return
        if side is None or side.model != model:
            side = Side(model)
        if side.error:  # the failed turn's prompt is asked again below
            side.error = None
            if side.messages and side.messages[-1]["role"] == "user":
                side.messages.pop()
        side.messages.append({"role": "user", "content": prompt.strip()})
        sid = session_id(request)
        finished: list[Side] = []
        first = True
        updates = stream_sides(self.s.client, [side], params, lambda i, s: finished.append(s))
        async with aclosing(updates) as it:
            async for _ in it:
                yield self.render(side, "", clear_prompt=first)
                first = False
        for s in finished:
            await self.s.log_turn(chat_log("direct", s, sid, params))
        status = _status("The answer failed (see the chat).", "warn") if side.error else ""
        yield self.render(side, status)


# -- leaderboard ----------------------------------------------------------------------------------


class LeaderboardPanel:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.summary = gr.Markdown(elem_id="leaderboard-summary")
        self.table = gr.Dataframe(
            headers=COLUMNS,
            interactive=False,
            wrap=True,
            column_widths=["6%", "18%", "9%", "11%", "8%", "11%", "7%", "30%"],
            elem_id="leaderboard-table",
        )
        with gr.Row():
            self.win_plot = gr.Plot(label="Win fraction", elem_id="leaderboard-win-fraction")
            self.count_plot = gr.Plot(label="Battle counts", elem_id="leaderboard-counts")
        self.refresh = gr.Button("🔄 Refresh", elem_id="leaderboard-refresh")
        self.outputs = [self.summary, self.table, self.win_plot, self.count_plot]
        self.refresh.click(self.on_refresh, None, self.outputs, api_name="leaderboard_refresh")

    def _compute(self) -> tuple:
        c = self.s.config
        board = build_board(
            self.s.store.votes(),
            c.describe,
            rounds=c.bootstrap_rounds,
            prior_sd=c.bt_prior_sd or None,
            seed=c.seed or 0,
        )
        if not board.rows:
            text = "No rated battles yet: play a round in the Arena tab and vote."
            return _status(text), [], None, None
        return (
            board.summary,
            board.table,
            win_fraction_figure(board),
            battle_count_figure(board),
        )

    async def on_refresh(self) -> tuple:
        try:
            return await asyncio.to_thread(self._compute)
        except StoreError as e:
            return _status(f"Could not read the votes: {e}", "warn"), [], None, None


# -- the whole app --------------------------------------------------------------------------------


def build_blocks(services: Services) -> gr.Blocks:
    with gr.Blocks(title="pagedserve Chatbot Arena", analytics_enabled=False) as demo:
        with gr.Tabs():
            with gr.Tab("⚔️ Arena (battle)", id="battle"):
                gr.Markdown(BATTLE_RULES)
                battle = RoundPanel(services, anony=True)
            with gr.Tab("👀 Arena (side-by-side)", id="named"):
                gr.Markdown("# 👀 Side-by-side\nPick two models; their names stay visible.")
                named = RoundPanel(services, anony=False)
            with gr.Tab("💬 Direct chat", id="direct"):
                direct = DirectChatPanel(services)
            with gr.Tab("🏆 Leaderboard", id="leaderboard") as board_tab:
                board = LeaderboardPanel(services)
        board_tab.select(board.on_refresh, None, board.outputs, api_visibility="private")

        async def load_models() -> tuple:
            try:
                models = await services.models()
            except GatewayError as e:
                warn = _status(str(e), "warn")
                return (*(gr.update() for _ in range(3)), warn, warn, warn)
            pick_a = models[0] if models else None
            pick_b = models[1] if len(models) > 1 else pick_a
            return (
                gr.update(choices=models, value=pick_a),
                gr.update(choices=models, value=pick_b),
                gr.update(choices=models, value=pick_a),
                "",
                "",
                "",
            )

        demo.load(
            load_models,
            None,
            [*named.pickers, direct.picker, battle.status, named.status, direct.status],
            api_visibility="private",
        )
    return demo


def create_app(config: ArenaConfig) -> Any:
    """The FastAPI app: /health, and the arena at /."""
    from fastapi import FastAPI

    client = GatewayClient(config.gateway_url, config.api_key, timeout=config.request_timeout)
    store = open_store(config.db_path, config.redis_url, config.redis_prefix)
    services = Services(config, client, store, rng=random.Random(config.seed))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()
            store.close()

    app = FastAPI(title="pagedserve arena", lifespan=lifespan)
    app.state.services = services
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    demo = build_blocks(services)
    demo.queue(default_concurrency_limit=config.concurrency)
    return gr.mount_gradio_app(
        app, demo, path="/", footer_links=["api"], ssr_mode=False, pwa=False, mcp_server=False
    )


def serve(config: ArenaConfig, log_level: str = "info") -> None:
    from pagedserve.deploy import http_limits

    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(config)
    logger.info("arena at http://%s:%s (gateway %s)", config.host, config.port, config.gateway_url)
    # Browsers keep Gradio's event streams open: give them a few seconds on shutdown, no more.
    http_limits.run(
        app,
        config.header_timeout,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=3,
    )

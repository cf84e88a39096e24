"""The leaderboard's table and plots from stored votes (no Gradio: the app shows them).

Only rated votes count: anonymous battles in which no answer gave a model's identity away.
Plots are matplotlib `Figure`s made without pyplot, so concurrent sessions share no state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pagedserve.web_ui.battle_log import Battle
from pagedserve.web_ui.ratings import Row, battle_counts, leaderboard, win_fraction

COLUMNS = [
    "Rank",
    "Model",
    "Bradley-Terry",
    "95% CI",
    "Online Elo",
    "Elo 95% CI",
    "Battles",
    "Description",
]


@dataclass
class Board:
    rows: list[Row]
    table: list[list[object]]
    summary: str
    order: list[str]
    battles: list[Battle]


def build_board(
    votes: Sequence[Battle],
    describe: Callable[[str], str],
    rounds: int = 100,
    prior_sd: float | None = 400.0,
    seed: int = 0,
) -> Board:
    rated = [b for b in votes if b.rated]
    leaked = sum(1 for b in votes if b.anony and b.leaked_identity)
    named = sum(1 for b in votes if not b.anony)
    rows = leaderboard([b.outcome() for b in rated], rounds=rounds, seed=seed, prior_sd=prior_sd)
    table = [
        [
            r.rank,
            r.model,
            round(r.rating),
            f"{r.interval.low:.0f} – {r.interval.high:.0f}",
            round(r.elo),
            f"{r.elo_interval.low:.0f} – {r.elo_interval.high:.0f}",
            r.battles,
            describe(r.model),
        ]
        for r in rows
    ]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    fit = (
        "maximum likelihood"
        if not prior_sd
        else f"maximum likelihood with a weak N(1000, {prior_sd:.0f}²) prior, so that a "
        "handful of one-sided votes stays finite"
    )
    summary = (
        f"**{len(rated)} rated battles** among {len(rows)} models (updated {when}). "
        f"Not counted: {named} side-by-side votes (names were visible) and {leaked} anonymous "
        "votes whose answers named a model. Bradley-Terry: "
        f"{fit}; 95% intervals from {rounds} bootstrap resamples. Online Elo: K=4, scale 400, "
        "start 1000, in vote order. Rank = 1 + the models whose interval lies wholly above."
    )
    return Board(rows, table, summary, [r.model for r in rows], rated)


def _heatmap(
    matrix: np.ndarray,
    order: Sequence[str],
    title: str,
    fmt: str,
    cmap: str,
    vmax: float | None,
    empty: str,
):
    from matplotlib.figure import Figure

    size = max(4.0, 1.0 + 0.9 * len(order))
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=vmax)
    ax.set_xticks(range(len(order)), labels=order, rotation=45, ha="right")
    ax.set_yticks(range(len(order)), labels=order)
    ax.set_xlabel("Model B")
    ax.set_ylabel("Model A")
    ax.set_title(title, fontsize=10)
    top = vmax or max(float(np.nanmax(matrix, initial=0.0)), 1.0)
    for i in range(len(order)):
        for j in range(len(order)):
            value = matrix[i, j]
            if i == j or np.isnan(value):
                continue
            # dark cells (both ends of RdBu, the top of Blues) get white text
            dark = value / top > 0.75 or (cmap == "RdBu" and value / top < 0.25)
            text = f"{value:.0f}" if fmt == "d" else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black")
    if np.all(np.isnan(matrix) | np.eye(len(order), dtype=bool)):
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", color="gray")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def win_fraction_figure(board: Board):
    """Fraction of A's wins over B in their decisive battles (ties left out)."""
    outcomes = [b.outcome() for b in board.battles]
    return _heatmap(
        win_fraction(outcomes, board.order),
        board.order,
        "Share of A's wins over B (ties left out)",
        ".2f",
        "RdBu",
        1.0,
        "no decisive battles yet",
    )


def battle_count_figure(board: Board):
    outcomes = [b.outcome() for b in board.battles]
    return _heatmap(
        battle_counts(outcomes, board.order),
        board.order,
        "Battles per pair (ties included)",
        "d",
        "Blues",
        None,
        "no battles yet",
    )

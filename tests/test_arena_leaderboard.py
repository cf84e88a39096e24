"""The leaderboard built from stored votes: only anonymous votes without a leaked identity
count, the table says what each model is, and the plots draw (matplotlib, no pyplot)."""

from __future__ import annotations

from pagedserve.web_ui.battle_log import Battle
from pagedserve.web_ui.leaderboard import (
    COLUMNS,
    battle_count_figure,
    build_board,
    win_fraction_figure,
)


def vote(a: str, b: str, winner: str, **kw) -> Battle:
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return Battle(a, b, winner, conv, conv, "arena_user_x", **kw)


def test_board_counts_rated_votes_only_and_describes_models() -> None:
    votes = [
        vote("big", "small", "model_a"),
        vote("small", "big", "model_b"),
        vote("big", "small", "tie"),
        vote("small", "big", "model_a", anony=False),  # names were visible
        vote("small", "big", "model_a", leaked_identity=True),  # an answer named a model
    ]
    board = build_board(votes, {"big": "the big one"}.get, rounds=30)
    assert board.order == ["big", "small"]
    assert "**3 rated battles** among 2 models" in board.summary
    assert "1 side-by-side votes" in board.summary and "1 anonymous votes" in board.summary
    assert len(board.table[0]) == len(COLUMNS)
    rank, model, bt, ci, elo, elo_ci, battles, about = board.table[0]
    assert (rank, model, battles, about) == (1, "big", 3, "the big one")
    assert bt > 1000 > board.table[1][2] and elo > 1000
    low, high = (float(x) for x in ci.split(" – "))
    assert low <= bt <= high
    for figure in (win_fraction_figure(board), battle_count_figure(board)):
        assert len(figure.axes) == 2  # the heatmap and its colour bar


def test_empty_board() -> None:
    board = build_board([vote("a", "b", "tie", anony=False)], lambda m: "", rounds=5)
    assert board.rows == [] and board.table == [] and "**0 rated battles**" in board.summary

"""The arena's rating code: online Elo by hand, Bradley-Terry against known strengths,
bootstrap coverage, and agreement with FastChat's published procedures on the same log."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from pagedserve.web_ui.ratings import (
    Outcome,
    battle_counts,
    bootstrap_bradley_terry,
    bradley_terry,
    intervals,
    leaderboard,
    online_elo,
    win_fraction,
)

TRUE = {"alpha": 1200.0, "bravo": 1100.0, "charlie": 1000.0, "delta": 950.0, "echo": 750.0}


def synthetic_battles(
    strengths: dict[str, float], n: int, seed: int, tie_rate: float = 0.1
) -> list[Outcome]:
    """Random pairs; the winner drawn from the Bradley-Terry probability of the true ratings.
    A tie replaces a decisive result with probability tie_rate (a tie is half a win, so the
    true ratings stay the ones the model is fitted to: it is an unbiased coin either way)."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        ma, mb = names[a], names[b]
        p_a = 1.0 / (1.0 + 10 ** ((strengths[mb] - strengths[ma]) / 400))
        if rng.random() < tie_rate:
            # a tie scores 0.5: draw it so its expected score still equals p_a
            winner = "tie"
            if rng.random() < abs(2 * p_a - 1):
                winner = "model_a" if p_a > 0.5 else "model_b"
        else:
            winner = "model_a" if rng.random() < p_a else "model_b"
        out.append(Outcome(ma, mb, winner))
    return out


def centred(ratings: dict[str, float]) -> dict[str, float]:
    mean = sum(ratings.values()) / len(ratings)
    return {k: v - mean + 1000.0 for k, v in ratings.items()}


# -- online Elo ----------------------------------------------------------------------------------


def test_online_elo_matches_a_hand_computed_sequence() -> None:
    battles = [
        Outcome("a", "b", "model_a"),
        Outcome("b", "c", "tie"),
        Outcome("c", "a", "model_a"),
        Outcome("a", "b", "tie (bothbad)"),
    ]
    # 1. a 1000 vs b 1000: expected 0.5, a wins: a 1002, b 998.
    a, b, c = 1002.0, 998.0, 1000.0
    # 2. b 998 vs c 1000, tie.
    eb = 1 / (1 + 10 ** ((c - b) / 400))
    b, c = b + 4 * (0.5 - eb), c + 4 * (0.5 - (1 - eb))
    # 3. c vs a, c wins.
    ec = 1 / (1 + 10 ** ((a - c) / 400))
    c, a = c + 4 * (1 - ec), a + 4 * (0 - (1 - ec))
    # 4. a vs b, both bad: a tie.
    ea = 1 / (1 + 10 ** ((b - a) / 400))
    a, b = a + 4 * (0.5 - ea), b + 4 * (0.5 - (1 - ea))
    got = online_elo(battles)
    assert got == pytest.approx({"a": a, "b": b, "c": c}, abs=1e-12)
    assert sum(got.values()) == pytest.approx(3000.0)  # Elo moves points, it never makes them
    # the first step by the numbers, not by the formula
    assert online_elo(battles[:1]) == {"a": 1002.0, "b": 998.0}


def test_outcome_refuses_unknown_winners_and_self_battles() -> None:
    with pytest.raises(ValueError, match="winner"):
        Outcome("a", "b", "leftvote")
    with pytest.raises(ValueError, match="two different models"):
        Outcome("a", "a", "tie")


# -- Bradley-Terry ------------------------------------------------------------------------------


def test_bradley_terry_recovers_ranking_and_ratings_of_known_strengths() -> None:
    battles = synthetic_battles(TRUE, n=4000, seed=1)
    got = bradley_terry(battles)
    assert sorted(got, key=got.get, reverse=True) == list(TRUE)
    want = centred(TRUE)
    for name, value in got.items():
        assert value == pytest.approx(want[name], abs=30), name
    assert sum(got.values()) / len(got) == pytest.approx(1000.0, abs=1e-6)


def test_bradley_terry_is_invariant_to_side_and_order() -> None:
    battles = synthetic_battles(TRUE, n=500, seed=2)
    swapped = [
        Outcome(
            b.model_b,
            b.model_a,
            {"model_a": "model_b", "model_b": "model_a"}.get(b.winner, b.winner),
        )
        for b in reversed(battles)
    ]
    one, two = bradley_terry(battles), bradley_terry(swapped)
    assert one == pytest.approx(two, abs=1e-6)


def test_prior_keeps_a_clean_sweep_finite() -> None:
    battles = [Outcome("x", "y", "model_a")] * 3
    mle = bradley_terry(battles)  # the MLE runs off towards infinity
    shrunk = bradley_terry(battles, prior_sd=400)
    assert mle["x"] - mle["y"] > 2000
    assert 0 < shrunk["x"] - shrunk["y"] < 600
    assert shrunk["x"] + shrunk["y"] == pytest.approx(2000.0)


def test_bootstrap_intervals_cover_the_true_ratings() -> None:
    """Over independent data sets, the 95% intervals hold the true (centred) rating in most
    cases; a fixed seed keeps the count reproducible."""
    want = centred(TRUE)
    covered = total = 0
    for seed in range(6):
        battles = synthetic_battles(TRUE, n=800, seed=100 + seed)
        models, samples = bootstrap_bradley_terry(battles, rounds=120, seed=seed)
        for name, ci in intervals(models, samples).items():
            total += 1
            covered += ci.covers(want[name])
            assert ci.high - ci.low < 200, (name, ci)
    assert covered / total >= 0.8, f"{covered}/{total} intervals hold the true rating"


def test_leaderboard_rows_rank_counts_and_intervals() -> None:
    battles = synthetic_battles(TRUE, n=1500, seed=3)
    rows = leaderboard(battles, rounds=50, seed=0)
    assert [r.model for r in rows] == list(TRUE)
    assert rows[0].rank == 1 and rows[-1].rank == 5  # echo is far below everyone
    assert sum(r.battles for r in rows) == 2 * len(battles)
    for r in rows:
        assert r.interval.low <= r.rating <= r.interval.high
        assert r.elo_interval.low < r.elo_interval.high
    assert leaderboard([]) == []


def test_win_fraction_and_battle_counts() -> None:
    battles = [
        Outcome("a", "b", "model_a"),
        Outcome("b", "a", "model_a"),
        Outcome("a", "b", "model_a"),
        Outcome("a", "b", "tie"),
        Outcome("a", "c", "tie (bothbad)"),
    ]
    order = ["a", "b", "c"]
    counts = battle_counts(battles, order)
    assert counts.tolist() == [[0, 4, 1], [4, 0, 0], [1, 0, 0]]
    frac = win_fraction(battles, order)
    assert frac[0, 1] == pytest.approx(2 / 3) and frac[1, 0] == pytest.approx(1 / 3)
    assert math.isnan(frac[0, 2]) and math.isnan(frac[0, 0])


# -- FastChat's published procedures on the same log ---------------------------------------------
#
# Re-implemented here from fastchat/serve/monitor/elo_analysis.py: `compute_elo`, the
# logistic-regression `compute_mle_elo` (pivot tables, a win counted twice and a tie once each
# way, no intercept, no penalty; sklearn's lbfgs solver is scipy's L-BFGS-B on the same
# objective), and the newer `compute_elo_mle_with_tie` (distinct matchup rows, ties as 0.5,
# L-BFGS from zero). Plain Python and scipy: no pandas or sklearn needed.


def fastchat_compute_elo(battles, K=4, SCALE=400, BASE=10, INIT_RATING=1000):
    rating: dict[str, float] = {}
    for b in battles:
        ra, rb = rating.get(b.model_a, INIT_RATING), rating.get(b.model_b, INIT_RATING)
        ea = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        eb = 1 / (1 + BASE ** ((ra - rb) / SCALE))
        sa = {"model_a": 1, "model_b": 0, "tie": 0.5, "tie (bothbad)": 0.5}[b.winner]
        rating[b.model_a] = ra + K * (sa - ea)
        rating[b.model_b] = rb + K * (1 - sa - eb)
    return rating


def fastchat_compute_mle_elo(battles, SCALE=400, BASE=10, INIT_RATING=1000):
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    idx = {m: i for i, m in enumerate(models)}
    p = len(models)
    a_win = np.zeros((p, p))
    b_win = np.zeros((p, p))
    tie = np.zeros((p, p))
    for b in battles:
        i, j = idx[b.model_a], idx[b.model_b]
        if b.winner == "model_a":
            a_win[i, j] += 1
        elif b.winner == "model_b":
            b_win[i, j] += 1
        else:
            tie[i, j] += 1
    tie = tie + tie.T
    ptbl_win = a_win * 2 + b_win.T * 2 + tie
    X, Y, w = [], [], []
    for m_a in range(p):
        for m_b in range(p):
            if m_a == m_b:
                continue
            row = np.zeros(p)
            row[m_a], row[m_b] = math.log(BASE), -math.log(BASE)
            X += [row, row]
            Y += [1.0, 0.0]
            w += [ptbl_win[m_a, m_b], ptbl_win[m_b, m_a]]
    X, Y, w = np.array(X), np.array(Y), np.array(w)

    def nll(beta):  # LogisticRegression(fit_intercept=False, penalty=None)
        z = X @ beta
        q = expit(z)
        loss = (w * (np.logaddexp(0, -z) * Y + np.logaddexp(0, z) * (1 - Y))).sum()
        return loss, X.T @ (w * (q - Y))

    beta = minimize(nll, np.zeros(p), jac=True, method="L-BFGS-B", options={"gtol": 1e-9}).x
    scores = SCALE * beta + INIT_RATING
    return dict(zip(models, scores.tolist(), strict=True))


def fastchat_compute_elo_mle_with_tie(battles, SCALE=400, BASE=10, INIT_RATING=1000):
    models = list(dict.fromkeys(m for b in battles for m in (b.model_a, b.model_b)))
    idx = {m: i for i, m in enumerate(models)}
    code = {"model_a": 2, "model_b": 0}
    schedule = np.array([(idx[b.model_a], idx[b.model_b], code.get(b.winner, 1)) for b in battles])
    rows, counts = np.unique(schedule, return_counts=True, axis=0)
    matchups, outcomes, weights = rows[:, :2], rows[:, 2] / 2.0, counts.astype(float)
    alpha = math.log(BASE)

    def bt_loss_and_grad(ratings):
        r = ratings[matchups]
        probs = expit(alpha * (r[:, 0] - r[:, 1]))
        loss = -((np.log(probs) * outcomes + np.log(1 - probs) * (1 - outcomes)) * weights).sum()
        g = -alpha * (outcomes - probs) * weights
        grad = np.zeros_like(ratings)
        np.add.at(grad, matchups, g[:, None] * np.array([1.0, -1.0]))
        return loss, grad

    x = minimize(
        bt_loss_and_grad,
        np.zeros(len(models)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100, "gtol": 1e-6},
    ).x
    return dict(zip(models, (x * SCALE + INIT_RATING).tolist(), strict=True))


def test_agrees_with_fastchat_procedures_on_the_same_battle_log() -> None:
    battles = synthetic_battles(TRUE, n=1200, seed=7, tie_rate=0.25)
    assert fastchat_compute_elo(battles) == pytest.approx(online_elo(battles), abs=1e-9)
    ours = bradley_terry(battles)  # the exact MLE, as FastChat computes it
    old = fastchat_compute_mle_elo(battles)
    new = fastchat_compute_elo_mle_with_tie(battles)
    for name in TRUE:
        # FastChat's two ways differ only in how tightly L-BFGS converges; the logistic
        # regression counts every battle twice, which leaves the maximum where it is.
        assert ours[name] == pytest.approx(old[name], abs=0.05), name
        assert ours[name] == pytest.approx(new[name], abs=0.5), name
    # and the weak prior the leaderboard uses moves nothing by more than a point here
    shrunk = bradley_terry(battles, prior_sd=400)
    assert all(abs(shrunk[n] - ours[n]) < 1.0 for n in TRUE)

"""Ratings from pairwise votes: online Elo, Bradley-Terry maximum likelihood, bootstrap
intervals, and the win-fraction and battle-count matrices. No Gradio, no storage: plain
battles in, numbers out.

Conventions are FastChat's (fastchat/serve/monitor/elo_analysis.py), so the numbers can be
compared with lmarena's published method:

- online Elo: K=4, base 10, scale 400, every model starts at 1000, battles in time order;
  a tie (either kind) scores 0.5.
- Bradley-Terry: P(i beats j) = 1 / (1 + base^((R_j - R_i) / scale)), fitted by maximum
  likelihood; a tie counts as half a win and half a loss. Ratings are reported as
  1000 + scale * r with the natural-scale r centred on 0 (FastChat gets the same centring
  from its L-BFGS start at zero, whose gradient always sums to zero).
- bootstrap: resample the battles with replacement (a multinomial over the distinct
  (model_a, model_b, outcome) rows, as FastChat does), refit, take the 2.5% and 97.5%
  quantiles.

The fit is our own damped Newton method on the aggregated pairwise scores. A pure MLE does
not exist when a model has won (or lost) every battle it played, which is the rule rather
than the exception on a fresh leaderboard; `prior_sd` (in rating points) adds a weak Gaussian
prior centred on 1000 that keeps such ratings finite. `prior_sd=None` is the exact MLE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
ELO_K = 4.0


@dataclass(frozen=True)
class Outcome:
    """One vote: `winner` is one of WINNERS (FastChat's battle-log values)."""

    model_a: str
    model_b: str
    winner: str

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}; got {self.winner!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"a battle needs two different models; got {self.model_a!r} twice")

    @property
    def score_a(self) -> float:
        """Model A's score: 1 for a win, 0 for a loss, 0.5 for either kind of tie."""
        return {"model_a": 1.0, "model_b": 0.0}.get(self.winner, 0.5)


def models_of(battles: Iterable[Outcome]) -> list[str]:
    """Every model that played, in order of first appearance."""
    seen: dict[str, None] = {}
    for b in battles:
        seen.setdefault(b.model_a)
        seen.setdefault(b.model_b)
    return list(seen)


# -- online Elo ----------------------------------------------------------------------------------


def online_elo(
    battles: Iterable[Outcome],
    k: float = ELO_K,
    base: float = BASE,
    scale: float = SCALE,
    init: float = INIT_RATING,
) -> dict[str, float]:
    """Elo updated battle by battle in the given order."""
    rating: dict[str, float] = {}
    for b in battles:
        ra, rb = rating.get(b.model_a, init), rating.get(b.model_b, init)
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        rating[b.model_a] = ra + k * (b.score_a - ea)
        rating[b.model_b] = rb + k * ((1.0 - b.score_a) - (1.0 - ea))
    return rating


# -- Bradley-Terry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matchups:
    """Battles folded into distinct (a, b, score_a) rows with counts, FastChat's layout."""

    models: list[str]
    pairs: np.ndarray  # [R, 2] int: model indices of A and B
    scores: np.ndarray  # [R] float: A's score, 1 / 0.5 / 0
    counts: np.ndarray  # [R] float: how many battles had this row

    @classmethod
    def from_battles(cls, battles: Sequence[Outcome], models: Sequence[str] | None = None):
        models = list(models) if models is not None else models_of(battles)
        index = {m: i for i, m in enumerate(models)}
        rows: dict[tuple[int, int, float], int] = {}
        for b in battles:
            key = (index[b.model_a], index[b.model_b], b.score_a)
            rows[key] = rows.get(key, 0) + 1
        keys = sorted(rows)
        pairs = np.array([k[:2] for k in keys], dtype=np.int64).reshape(-1, 2)
        scores = np.array([k[2] for k in keys], dtype=np.float64)
        counts = np.array([rows[k] for k in keys], dtype=np.float64)
        return cls(models, pairs, scores, counts)


def _fit(
    m: Matchups,
    counts: np.ndarray,
    alpha: float,
    prior_precision: float,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """Natural-scale ratings r minimising the negative log-likelihood
    -sum_rows counts * [s log p + (1 - s) log(1 - p)] + prior_precision / 2 * |r|^2,
    p = sigmoid(alpha * (r_a - r_b)), by Newton steps with backtracking."""
    n = len(m.models)
    a, b = m.pairs[:, 0], m.pairs[:, 1]

    def loss(r: np.ndarray) -> float:
        z = alpha * (r[a] - r[b])
        # -[s log sigmoid(z) + (1 - s) log sigmoid(-z)], written to stay finite for large |z|
        nll = m.scores * np.logaddexp(0.0, -z) + (1.0 - m.scores) * np.logaddexp(0.0, z)
        return float((counts * nll).sum() + 0.5 * prior_precision * (r @ r))

    r = np.zeros(n)
    current = loss(r)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-alpha * (r[a] - r[b])))
        g_row = -alpha * counts * (m.scores - p)
        grad = np.zeros(n)
        np.add.at(grad, a, g_row)
        np.add.at(grad, b, -g_row)
        grad += prior_precision * r
        h_row = alpha * alpha * counts * p * (1.0 - p)
        hess = np.zeros((n, n))
        np.add.at(hess, (a, a), h_row)
        np.add.at(hess, (b, b), h_row)
        np.add.at(hess, (a, b), -h_row)
        np.add.at(hess, (b, a), -h_row)
        hess[np.diag_indices(n)] += prior_precision
        # The likelihood does not change when a connected group of models shifts together; the
        # least-squares solve takes the step with no such shift, so each group stays centred.
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            candidate = r + t * step
            value = loss(candidate)
            if value <= current + 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        else:
            break
        r, current = candidate, value
        if np.max(np.abs(t * step)) < tol:
            break
    return r


def _prior_precision(prior_sd: float | None, scale: float) -> float:
    if prior_sd is None:
        return 0.0
    if prior_sd <= 0:
        raise ValueError(f"prior_sd must be > 0 rating points (or None); got {prior_sd}")
    return (scale / prior_sd) ** 2


def bradley_terry(
    battles: Sequence[Outcome],
    prior_sd: float | None = None,
    base: float = BASE,
    scale: float = SCALE,
    init: float = INIT_RATING,
) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale: maximum likelihood (prior_sd None), or the
    maximum a posteriori ratings under a N(init, prior_sd^2) prior."""
    if not battles:
        return {}
    m = Matchups.from_battles(battles)
    r = _fit(m, m.counts, math.log(base), _prior_precision(prior_sd, scale))
    return dict(zip(m.models, (init + scale * r).tolist(), strict=True))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_bradley_terry(
    battles: Sequence[Outcome],
    rounds: int = 100,
    seed: int = 0,
    prior_sd: float | None = None,
    base: float = BASE,
    scale: float = SCALE,
    init: float = INIT_RATING,
) -> tuple[list[str], np.ndarray]:
    """(models, ratings[rounds, models]) of Bradley-Terry refits on resampled battle sets."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if not battles:
        return [], np.zeros((rounds, 0))
    m = Matchups.from_battles(battles)
    rng = np.random.default_rng(seed)
    total = int(m.counts.sum())
    draws = rng.multinomial(total, m.counts / total, size=rounds).astype(np.float64)
    alpha, precision = math.log(base), _prior_precision(prior_sd, scale)
    samples = np.stack([init + scale * _fit(m, w, alpha, precision) for w in draws])
    return m.models, samples


def bootstrap_online_elo(
    battles: Sequence[Outcome], rounds: int = 100, seed: int = 0, **elo: float
) -> tuple[list[str], np.ndarray]:
    """(models, ratings[rounds, models]) of online Elo on resampled, reshuffled battle lists
    (FastChat's `get_bootstrap_result` with `compute_elo`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    models = models_of(battles)
    if not battles:
        return models, np.zeros((rounds, 0))
    rng = np.random.default_rng(seed)
    init = elo.get("init", INIT_RATING)
    samples = np.empty((rounds, len(models)))
    for i in range(rounds):
        picks = rng.integers(0, len(battles), size=len(battles))
        ratings = online_elo((battles[j] for j in picks), **elo)
        samples[i] = [ratings.get(name, init) for name in models]
    return models, samples


def intervals(
    models: Sequence[str], samples: np.ndarray, level: float = 0.95
) -> dict[str, Interval]:
    """Per model, the central `level` quantile interval of its bootstrap samples."""
    tail = (1.0 - level) / 2.0
    low = np.quantile(samples, tail, axis=0) if len(models) else []
    high = np.quantile(samples, 1.0 - tail, axis=0) if len(models) else []
    return {
        name: Interval(float(lo), float(hi)) for name, lo, hi in zip(models, low, high, strict=True)
    }


# -- matrices for the plots ---------------------------------------------------------------------


def battle_counts(battles: Iterable[Outcome], order: Sequence[str]) -> np.ndarray:
    """counts[i, j]: battles between order[i] and order[j], either side, ties included."""
    index = {m: i for i, m in enumerate(order)}
    counts = np.zeros((len(order), len(order)))
    for b in battles:
        if b.model_a in index and b.model_b in index:
            i, j = index[b.model_a], index[b.model_b]
            counts[i, j] += 1
            counts[j, i] += 1
    return counts


def win_fraction(battles: Iterable[Outcome], order: Sequence[str]) -> np.ndarray:
    """frac[i, j]: share of the decisive (non-tie) battles between order[i] and order[j] that
    order[i] won, NaN where they never had one (FastChat's pairwise win fraction)."""
    index = {m: i for i, m in enumerate(order)}
    wins = np.zeros((len(order), len(order)))
    for b in battles:
        if b.winner not in ("model_a", "model_b"):
            continue
        if b.model_a in index and b.model_b in index:
            i, j = index[b.model_a], index[b.model_b]
            if b.winner == "model_a":
                wins[i, j] += 1
            else:
                wins[j, i] += 1
    played = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(played > 0, wins / np.where(played > 0, played, 1), np.nan)


# -- the leaderboard ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    rank: int  # 1 + how many models are better beyond doubt (their low > this one's high)
    model: str
    rating: float  # Bradley-Terry
    interval: Interval  # its bootstrap 95% interval
    elo: float  # online Elo
    elo_interval: Interval
    battles: int


def leaderboard(
    battles: Sequence[Outcome],
    rounds: int = 100,
    seed: int = 0,
    prior_sd: float | None = SCALE,
) -> list[Row]:
    """One row per model, best Bradley-Terry rating first."""
    if not battles:
        return []
    bt = bradley_terry(battles, prior_sd=prior_sd)
    elo = online_elo(battles)
    names, bt_samples = bootstrap_bradley_terry(battles, rounds, seed, prior_sd=prior_sd)
    bt_ci = intervals(names, bt_samples)
    names, elo_samples = bootstrap_online_elo(battles, rounds, seed + 1)
    elo_ci = intervals(names, elo_samples)
    played = {m: 0 for m in bt}
    for b in battles:
        played[b.model_a] += 1
        played[b.model_b] += 1
    order = sorted(bt, key=lambda name: -bt[name])
    return [
        Row(
            rank=1 + sum(bt_ci[o].low > bt_ci[name].high for o in order if o != name),
            model=name,
            rating=bt[name],
            interval=bt_ci[name],
            elo=elo[name],
            elo_interval=elo_ci[name],
            battles=played[name],
        )
        for name in order
    ]

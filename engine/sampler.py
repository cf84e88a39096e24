"""Token sampling for a whole batch at once: penalties and biases, then greedy, temperature,
top-k, top-p and min-p, plus the log-probabilities requests ask for.

Random rows use the exponential race (argmax of p / q with q ~ Exp(1)), which samples from p
exactly and lets a seeded request draw its own noise from its own generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.engine.sequence import Sequence


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [R], 0 for greedy rows
    top_p: torch.Tensor
    top_k: torch.Tensor  # 0: off
    min_p: torch.Tensor
    banned: list[list[int]]  # per row, tokens masked out (EOS and stop tokens before min_tokens)
    generators: list[torch.Generator | None]
    seqs: list[Sequence]  # the sequence of each row (a row per sample drawn)
    num_logprobs: int  # top-k alternatives to report (the most any row wants)
    all_greedy: bool  # every row's temperature is 0

    @classmethod
    def from_seqs(
        cls,
        seqs: list[Sequence],
        eos_token_ids: list[int],
        device,
        samples: list[int] | None = None,
    ) -> SamplingTensors:
        """`samples[i]` rows for `seqs[i]` (several when a prompt fans out into best_of).

        Until a row has `min_tokens` outputs, every EOS id and stop token id is banned, also
        with ignore_eos, as in vLLM and transformers' `min_new_tokens`."""
        rows = [s for s, k in zip(seqs, samples or [1] * len(seqs), strict=True) for _ in range(k)]

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        params = [s.params for s in rows]
        banned = [
            [*eos_token_ids, *s.params.stop_token_ids]
            if s.num_output_tokens < s.params.min_tokens
            else []
            for s in rows
        ]
        wanted = [
            max(p.logprobs or 0, 2 * p.beam_width if p.use_beam_search else 0) for p in params
        ]
        return cls(
            temperature=col([p.temperature for p in params], torch.float32),
            top_p=col([p.top_p for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.long),
            min_p=col([p.min_p for p in params], torch.float32),
            banned=banned,
            generators=[s.generator for s in rows],
            seqs=rows,
            num_logprobs=max(wanted),
            all_greedy=all(p.temperature == 0 for p in params),
        )


@dataclass
class Sample:
    token: int
    logprob: float  # of `token`, after penalties and biases, before temperature
    top: dict[int, float]  # the most likely tokens and their logprobs, as many as asked for

    def logprobs_entry(self, k: int) -> dict[int, float]:
        """What the output reports for this token: the chosen one first, then the top `k`."""
        entry = {self.token: self.logprob}
        entry.update(list(self.top.items())[:k])
        return entry


def sample(logits: torch.Tensor, t: SamplingTensors, greedy=None) -> list[Sample]:
    """logits [S, V] (one row per sequence) -> a sample per row of `t`. `greedy(logits)`, where
    given (the CPU kernels'), returns each row's argmax and its logprob at once, for batches
    whose every row is greedy and reports no alternatives."""
    if logits.shape[0] != len(t.seqs):  # fan-out: repeat each sequence's row for its samples
        repeats: list[int] = []
        for i, seq in enumerate(t.seqs):
            if i and seq is t.seqs[i - 1]:
                repeats[-1] += 1
            else:
                repeats.append(1)
        logits = logits.repeat_interleave(torch.tensor(repeats, device=logits.device), dim=0)
    logits = apply_penalties(logits.float(), t.seqs)
    vocab = logits.shape[-1]
    # Every banned (row, token) at once; tokens past the vocabulary can never be sampled.
    rows, cols = [], []
    for row, tokens in enumerate(t.banned):
        for token in tokens:
            if token < vocab:
                rows.append(row)
                cols.append(token)
    if rows:
        logits[rows, cols] = -float("inf")
    if greedy is not None and t.all_greedy and not t.num_logprobs:
        tokens, chosen = greedy(logits)
        return [
            Sample(tok, lp, {}) for tok, lp in zip(tokens.tolist(), chosen.tolist(), strict=True)
        ]
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = _choose(logits, t)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    tops: list[dict[int, float]] = [{} for _ in chosen]
    if t.num_logprobs:
        top = logprobs.topk(t.num_logprobs, dim=-1)
        tops = [
            dict(zip(i, v, strict=True))
            for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
    return [
        Sample(tok, lp, top) for tok, lp, top in zip(tokens.tolist(), chosen, tops, strict=True)
    ]


def _choose(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy
    is_greedy = t.temperature == 0
    temperature = torch.where(is_greedy, torch.ones_like(t.temperature), t.temperature)
    probs = _filter(logits / temperature[:, None], t).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)


def skip_draws(generator: torch.Generator, vocab_size: int, steps: int) -> None:
    """Advance a request's generator past `steps` sampling steps, drawing what `_choose`
    draws for its row each step (one Exp(1) row of the vocabulary's width, float32), so that
    a resumed answer samples its next tokens as the uninterrupted one would have."""
    row = torch.empty(vocab_size, dtype=torch.float32, device=generator.device)
    for _ in range(steps):
        row.exponential_(generator=generator)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logit_bias, transformers' repetition penalty (over prompt and generated tokens), then
    OpenAI's frequency and presence penalties (over generated tokens), for the rows that ask:
    vLLM's order, so that combined settings give the same distribution as there."""
    rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    for i in rows:
        p, seq = seqs[i].params, seqs[i]
        row = logits[i]
        for token, bias in p.logit_bias.items():
            if token < vocab:
                row[token] += bias
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            seen = seen[seen < vocab]
            picked = row[seen]
            row[seen] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def _filter(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Mask tokens outside top-k, top-p and min-p; rows with a filter off are left alone."""
    use_k = bool((t.top_k > 0).any())
    use_p = bool((t.top_p < 1).any())
    if use_k or use_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if use_k:
            k = torch.where(t.top_k > 0, t.top_k, vocab).clamp(max=vocab)
            drop |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
        if use_p:
            probs = sorted_logits.masked_fill(drop, -float("inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= t.top_p[:, None]
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    if bool((t.min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * t.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, -float("inf"))
    return logits

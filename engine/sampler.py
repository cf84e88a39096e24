"""Token sampling for a whole batch at once: greedy, temperature, top-k, top-p, min-p.

Random rows use the exponential race (argmax of p / q with q ~ Exp(1)), which samples from p
exactly and lets a seeded request draw its own noise from its own generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.engine.sequence import Sequence


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [S], 0 for greedy rows
    top_p: torch.Tensor
    top_k: torch.Tensor  # 0: off
    min_p: torch.Tensor
    banned: list[list[int]]  # per row, tokens masked out (EOS before min_tokens)
    generators: list[torch.Generator | None]

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], eos_token_ids: list[int], device) -> SamplingTensors:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        params = [s.params for s in seqs]
        banned = []
        for s in seqs:
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                stops = list(p.stop_token_ids)
                if not p.ignore_eos:
                    stops += eos_token_ids
                banned.append(stops)
            else:
                banned.append([])
        return cls(
            temperature=col([p.temperature for p in params], torch.float32),
            top_p=col([p.top_p for p in params], torch.float32),
            top_k=col([p.top_k for p in params], torch.long),
            min_p=col([p.min_p for p in params], torch.float32),
            banned=banned,
            generators=[s.generator for s in seqs],
        )


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [S, V] -> next token ids [S]."""
    logits = logits.float()
    for row, tokens in enumerate(t.banned):
        if tokens:
            logits[row, tokens] = -float("inf")
    greedy = logits.argmax(dim=-1)
    is_greedy = t.temperature == 0
    if bool(is_greedy.all()):
        return greedy
    temperature = torch.where(is_greedy, torch.ones_like(t.temperature), t.temperature)
    probs = _filter(logits / temperature[:, None], t).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)


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

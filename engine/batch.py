"""The flat batch of one engine step: built once by the model runner, read by attention layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] all tokens of the step, flattened
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with -1
    context_lens: torch.Tensor  # [B] int32, tokens in cache per sequence after this step
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    logits_indices: torch.Tensor  # [S] rows of the hidden states that are sampled

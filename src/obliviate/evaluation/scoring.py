"""Batched log-likelihood and greedy generation: the two model calls every metric uses.

Sequences are left-padded so that every continuation ends at the last position; the
model is then asked for logits at the last few positions only (``logits_to_keep``),
which skips the vocabulary projection (262k x d for Gemma) at every context position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..models import LoadedModel

CPU_BATCH_TOKENS = 2048
LOGITS_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Batching:
    """How many tokens go through the model at once. ``tokens=None`` sizes it to the device."""

    tokens: int | None = None

    def budget(self, lm: LoadedModel) -> int:
        if self.tokens is not None:
            return self.tokens
        from ..scale import auto_batch_tokens

        # Sized to the tightest GPU holding the model (device maps span several); the
        # fixed CPU budget when no GPU holds it.
        tokens = auto_batch_tokens(lm.model)
        return CPU_BATCH_TOKENS if tokens is None else tokens


def _batches(lengths: Sequence[int], kept: Sequence[int], vocab: int, budget: int) -> list[list[int]]:
    """Group item indices (sorted by length) so padded tokens and kept logits fit the budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest, most_kept = [], [], 0, 0
    for index in order:
        new_longest, new_kept = max(longest, lengths[index]), max(most_kept, kept[index])
        size = len(current) + 1
        too_big = size * new_longest > budget or size * new_kept * vocab * 4 > LOGITS_BUDGET_BYTES
        if current and too_big:
            batches.append(current)
            current, new_longest, new_kept = [], lengths[index], kept[index]
        current.append(index)
        longest, most_kept = new_longest, new_kept
    if current:
        batches.append(current)
    return batches


def _left_pad(sequences: list[list[int]], pad_id: int, device: torch.device):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _last_logits(lm: LoadedModel, sequences: list[list[int]], keep: int) -> torch.Tensor:
    ids, mask, positions = _left_pad(sequences, lm.tokenizer.pad_token_id, lm.device)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False)
    return out.logits.float()


@torch.no_grad()
def continuation_logprobs(
    lm: LoadedModel,
    items: Sequence[tuple[list[int], list[int]]],
    batching: Batching = Batching(),
) -> torch.Tensor:
    """Sum of log p(continuation | context) for each (context_ids, continuation_ids) pair."""
    if not items:
        return torch.zeros(0, dtype=torch.float64)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    lengths = [len(c) + len(x) for c, x in items]
    kept = [len(x) + 1 for _, x in items]
    totals = torch.zeros(len(items), dtype=torch.float64)
    for batch in _batches(lengths, kept, vocab, batching.budget(lm)):
        keep = max(kept[i] for i in batch)
        logits = _last_logits(lm, [items[i][0] + items[i][1] for i in batch], keep)
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, index in enumerate(batch):
            target = torch.tensor(items[index][1], device=logprobs.device)
            n = len(target)
            # Position T-n-1+t predicts continuation token t; kept index = keep - 1 - n + t.
            picked = logprobs[row, keep - 1 - n : keep - 1].gather(-1, target[:, None])
            totals[index] = picked.sum().double().cpu()
    return totals


@torch.no_grad()
def next_token_logprobs(
    lm: LoadedModel, contexts: Sequence[list[int]], candidates: Sequence[int], batching: Batching = Batching()
) -> torch.Tensor:
    """log p(candidate | context) at the next position, for each context: (n, len(candidates))."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    out = torch.zeros(len(contexts), len(candidates), dtype=torch.float64)
    candidate_ids = torch.tensor(list(candidates))
    for batch in _batches([len(c) for c in contexts], [1] * len(contexts), vocab, batching.budget(lm)):
        logits = _last_logits(lm, [list(contexts[i]) for i in batch], 1)[:, -1]
        logprobs = torch.log_softmax(logits, dim=-1)[:, candidate_ids.to(logits.device)]
        out[batch] = logprobs.double().cpu()
    return out


@torch.no_grad()
def greedy_generate(
    lm: LoadedModel, prompts: Sequence[list[int]], max_new_tokens: int, batching: Batching = Batching()
) -> list[list[int]]:
    """Greedy continuations (new token ids only, cut at EOS) for each tokenized prompt."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    lengths = [len(p) + max_new_tokens for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    eos = lm.tokenizer.eos_token_id
    for batch in _batches(lengths, [1] * len(prompts), vocab, batching.budget(lm)):
        ids, mask, _ = _left_pad([list(prompts[i]) for i in batch], lm.tokenizer.pad_token_id, lm.device)
        generated = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )[:, ids.shape[1]:]
        for row, index in enumerate(batch):
            tokens = generated[row].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            results[index] = [t for t in tokens if t != lm.tokenizer.pad_token_id]
    return results

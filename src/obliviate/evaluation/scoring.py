"""Batched log-likelihood and greedy generation: the two model calls every metric uses.

Sequences are left-padded so that every continuation ends at the last position; the
model is then asked for logits at the last few positions only (``logits_to_keep``),
which skips the vocabulary projection (262k x d for Gemma) at every context position.
Within those, the output layer runs only where a scored token is predicted
(``_output_layer_at``): a batch pads every continuation to its longest, and the padding
was 40-50% of the projection's rows on the benchmark's options. The same pass can keep
what the output layer saw at each scored position (``OutputStates``), which corrects the
scores exactly after an edit of some output rows (output_rows.py) without a second pass.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from obliviate.models.loading import LoadedModel
from obliviate.models.layers import cache_argument, left_pad
from obliviate.models.memory import LOGITS_BUDGET_BYTES, auto_batch_tokens

CPU_BATCH_TOKENS = 2048
# Greedy generation runs the whole output layer (vocabulary x d) at every step of every
# batch: on a CPU a larger batch reads it fewer times (110 prompts x 32 tokens on Gemma 3
# 270M, 2 cores: 38 s at 2048 tokens a batch, 26 s at 8192). Scoring gains nothing from it.
CPU_GENERATION_BATCH_TOKENS = 8192
ROWS_PER_REDUCTION = 8  # rows of logits reduced at once on a CPU (8 x 262k floats: 8 MiB, cache-sized)


@dataclass(frozen=True)
class Batching:
    """How many tokens go through the model at once. ``tokens=None`` sizes it to the device."""

    tokens: int | None = None

    def budget(self, lm: LoadedModel) -> int:
        return self._sized(lm, CPU_BATCH_TOKENS)

    def generation_budget(self, lm: LoadedModel) -> int:
        """Tokens a generation batch may hold (prompts and new tokens)."""
        return self._sized(lm, CPU_GENERATION_BATCH_TOKENS)

    def _sized(self, lm: LoadedModel, on_cpu: int) -> int:
        if self.tokens is not None:
            return self.tokens
        # Sized to the tightest GPU holding the model (device maps span several); the
        # fixed CPU budget when no GPU holds it.
        tokens = auto_batch_tokens(lm.model)
        return on_cpu if tokens is None else tokens


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


def _last_logits(lm: LoadedModel, sequences: list[list[int]], keep: int) -> torch.Tensor:
    ids, mask, positions = left_pad(sequences, lm.tokenizer.pad_token_id, lm.device)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False)
    return out.logits.float()


@dataclass
class OutputStates:
    """The final hidden states entering the output layer and the log-normalizers of the
    logits (after the model's final soft-cap, if any) at the positions that predict one
    continuation's tokens, in order."""

    hidden: torch.Tensor  # (n, d) float32
    log_norm: torch.Tensor  # (n,) float64


@torch.no_grad()
def continuation_logprobs(
    lm: LoadedModel,
    items: Sequence[tuple[list[int], list[int]]],
    batching: Batching = Batching(),
    record: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[OutputStates]]:
    """Sum of log p(continuation | context) for each (context_ids, continuation_ids) pair.

    Items that share a context (a question's options) run the context once and score each
    continuation on a copy of its key/value cache; the others run whole, batched.
    ``record=True`` also returns each item's ``OutputStates`` from the same pass.
    """
    totals = torch.zeros(len(items), dtype=torch.float64)
    states: list[OutputStates | None] = [None] * len(items)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(items):
        groups.setdefault(tuple(context), []).append(index)
    shared = [group for group in groups.values() if len(group) > 1]
    alone = [group[0] for group in groups.values() if len(group) == 1]
    if alone:
        _whole_sequence_logprobs(lm, items, alone, batching, totals, states if record else None)
    if shared:
        _shared_context_logprobs(lm, items, shared, batching, totals, states if record else None)
    return (totals, states) if record else totals  # type: ignore[return-value]


def _vocab(lm: LoadedModel) -> int:
    return lm.model.get_output_embeddings().weight.shape[0]


def _whole_sequence_logprobs(lm: LoadedModel, items: Sequence[tuple[list[int], list[int]]], chosen: list[int],
                             batching: Batching, totals: torch.Tensor, states: list | None) -> None:
    """Score the ``chosen`` items each as one sequence into ``totals`` (and ``states``). A
    continuation's last token is never fed: nothing after it is scored."""
    lengths = [len(items[i][0]) + max(len(items[i][1]) - 1, 0) for i in chosen]
    kept = [max(len(items[i][1]), 1) for i in chosen]
    for batch in _batches(lengths, kept, _vocab(lm), batching.budget(lm)):
        members = [chosen[b] for b in batch]
        keep = max(kept[b] for b in batch)
        ids, mask, positions = left_pad([items[i][0] + items[i][1][:-1] for i in members], lm.tokenizer.pad_token_id,
                                        lm.device)
        # Of the kept positions, the last n predict a row's n continuation tokens.
        n = torch.tensor([len(items[i][1]) for i in members])
        select = torch.arange(keep) >= keep - n[:, None]
        targets = torch.cat([torch.tensor(items[i][1], dtype=torch.long) for i in members])
        sums, seen = _marked_sums(lm, select, targets, input_ids=ids, attention_mask=mask, position_ids=positions,
                                  logits_to_keep=keep, use_cache=False)
        totals[members] = sums
        if states is not None:
            for index, (hidden, log_norm) in zip(members, zip(*seen)):
                states[index] = OutputStates(hidden, log_norm)


def _marked_sums(lm: LoadedModel, select: torch.Tensor, targets: torch.Tensor,
                 **inputs) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per row of ``select``, the sum of log p(target) over its marked positions (``targets``
    in row-major order), from one forward pass whose output layer runs there only; and per
    row, the hidden states and log-normalizers at its marked positions."""
    with _output_layer_at(lm.model, select) as hidden:
        logits = lm.model(**inputs).logits[0]
    picked, log_norm = _token_logprobs(logits, targets.to(logits.device))
    sums = torch.zeros(select.shape[0], dtype=torch.float64).index_add_(0, select.nonzero()[:, 0], picked.double().cpu())
    per_row = select.sum(dim=1).tolist()
    return sums, (list(hidden[0].float().cpu().split(per_row)), list(log_norm.double().cpu().split(per_row)))


@contextmanager
def _output_layer_at(model, select: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """The output layer runs only at the positions ``select`` marks, a (batch, positions)
    mask over its input: the logits come out as (1, marked positions, vocab), row-major.
    Yields a list that receives the layer's input there, (marked positions, d)."""
    seen: list[torch.Tensor] = []

    def marked(_module, args):
        hidden = args[0][select.to(args[0].device)]
        seen.append(hidden.detach())
        return (hidden[None], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(marked)
    try:
        yield seen
    finally:
        handle.remove()


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension of (rows, vocab) logits. On a CPU it runs a few rows
    at a time: over the whole tensor it streams every row through memory four times (max,
    subtract, exp, sum: 63 ms for 110 rows of Gemma's 262k logits, 20 ms in blocks). A block
    never holds one row alone unless the tensor does: a single row is reduced by another
    kernel (split across threads), which rounds differently."""
    if logits.device.type != "cpu" or logits.shape[0] <= ROWS_PER_REDUCTION:
        return torch.logsumexp(logits, dim=-1)
    blocks, rest = divmod(logits.shape[0], ROWS_PER_REDUCTION)
    sizes = [ROWS_PER_REDUCTION] * blocks + ([rest] if rest else [])
    if rest == 1:
        sizes[-2:] = [ROWS_PER_REDUCTION + 1]
    return torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(sizes)])


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), the log-normalizer) at each row of (rows, vocab) logits, in float32
    at least."""
    logits = logits.float()
    log_norm = log_normalizer(logits)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm, log_norm


def _shared_context_logprobs(lm, items, groups: list[list[int]], batching: Batching, totals: torch.Tensor,
                             states: list | None) -> None:
    """Score groups of items with one context each: the left-padded contexts run once with a
    cache, whose last position predicts every option's first token. The cache rows are then
    repeated per option of two tokens or more, and those options run on it without their
    last token (it predicts nothing), right-padded (padding sits after every real token, so
    causality hides it). Splitting them by length cut the padding but not the time: every
    pass reads the whole output layer."""
    fed = [[len(items[i][1]) - 1 for i in group] for group in groups]  # option tokens each option feeds
    lengths = [len(items[group[0]][0]) + sum(max(f, 0) for f in counts) for group, counts in zip(groups, fed)]
    kept = [1 + sum(max(f, 0) for f in counts) for counts in fed]
    cache_name = cache_argument(lm.model)
    for batch in _batches(lengths, kept, _vocab(lm), batching.budget(lm)):
        ids, mask, positions = left_pad([items[groups[g][0]][0] for g in batch], lm.tokenizer.pad_token_id, lm.device)
        every_context = torch.ones(len(batch), 1, dtype=torch.bool)  # the output layer at each one's last position
        with _output_layer_at(lm.model, every_context) as context_hidden:
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        members = [i for g in batch for i in groups[g]]
        # A CPU index works on every device, also on a cache whose layers sit on several GPUs.
        rows = torch.tensor([row for row, g in enumerate(batch) for _ in groups[g]])
        n = torch.tensor([len(items[i][1]) for i in members])
        context_logits = out.logits[0][rows.to(out.logits.device)]
        firsts = torch.tensor([items[i][1][0] if items[i][1] else 0 for i in members])
        first, first_norm = _token_logprobs(context_logits, firsts.to(context_logits.device))
        totals[members] = first.double().cpu() * (n > 0)
        longer = (n > 1).nonzero()[:, 0].tolist()
        tails: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> what the output layer saw after the first
        if longer:
            sums, seen = _option_tails(lm, [items[members[r]][1] for r in longer], getattr(out, cache_name),
                                       rows[longer].tolist(), mask, positions, cache_name)
            totals[[members[r] for r in longer]] += sums
            tails = dict(zip(longer, zip(*seen)))
        if states is not None:
            first_hidden = context_hidden[0][rows.to(context_hidden[0].device)].float().cpu()
            none = (first_hidden[:0], first_norm[:0].double().cpu())
            for row, index in enumerate(members):  # n states: the context's last position, then n - 1
                hidden, log_norm = tails.get(row, none)
                states[index] = OutputStates(torch.cat([first_hidden[row, None], hidden])[: n[row]],
                                             torch.cat([first_norm[row, None].double().cpu(), log_norm])[: n[row]])


def _option_tails(lm, options: list[list[int]], cache, rows: list[int], mask: torch.Tensor, positions: torch.Tensor,
                  cache_name: str) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Log-probabilities of each option's tokens after its first, each option fed but its last
    token on the context ``cache``'s ``rows`` (the cache is consumed), with what the output
    layer saw there."""
    cache.batch_select_indices(torch.tensor(rows))
    width = max(len(option) - 1 for option in options)
    fed = torch.full((len(options), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    fed_mask = torch.zeros((len(options), width), dtype=torch.long)
    for row, option in enumerate(options):
        fed[row, : len(option) - 1] = torch.tensor(option[:-1])
        fed_mask[row, : len(option) - 1] = 1
    targets = torch.cat([torch.tensor(option[1:], dtype=torch.long) for option in options])
    device = mask.device
    return _marked_sums(lm, fed_mask.bool(), targets, input_ids=fed.to(device),
                        attention_mask=torch.cat([mask[rows], fed_mask.to(device)], dim=1),
                        position_ids=positions[rows, -1:] + 1 + torch.arange(width, device=device), use_cache=True,
                        **{cache_name: cache})


@torch.no_grad()
def next_token_logprobs(
    lm: LoadedModel, contexts: Sequence[list[int]], candidates: Sequence[int], batching: Batching = Batching()
) -> torch.Tensor:
    """log p(candidate | context) at the next position, for each context: (n, len(candidates))."""
    vocab = _vocab(lm)
    out = torch.zeros(len(contexts), len(candidates), dtype=torch.float64)
    candidate_ids = torch.tensor(list(candidates))
    for batch in _batches([len(c) for c in contexts], [1] * len(contexts), vocab, batching.budget(lm)):
        logits = _last_logits(lm, [list(contexts[i]) for i in batch], 1)[:, -1]
        logprobs = torch.log_softmax(logits, dim=-1)[:, candidate_ids.to(logits.device)]
        out[batch] = logprobs.double().cpu()
    return out


@dataclass
class GenerationSteps:
    """What the output layer saw at each greedy step of one continuation: its input (the
    final hidden state), the log-normalizer of the logits and the top logit (the chosen
    token's, under greedy decoding), after the model's final soft-cap if it has one."""

    hidden: torch.Tensor  # (steps, d)
    log_norm: torch.Tensor  # (steps,) float64
    top_logit: torch.Tensor  # (steps,) float64

    def mean_loglik(self, length: int) -> float | None:
        """Mean log-probability of the first ``length`` chosen tokens (None when empty)."""
        return float((self.top_logit[:length] - self.log_norm[:length]).mean()) if length else None


@torch.no_grad()
def greedy_generate(
    lm: LoadedModel, prompts: Sequence[list[int]], max_new_tokens: int, batching: Batching = Batching(),
    record: bool = False, per_batch: Callable[[list[int]], AbstractContextManager] | None = None,
) -> list[list[int]] | tuple[list[list[int]], list[GenerationSteps]]:
    """Greedy continuations (new token ids only, cut at EOS) for each tokenized prompt.

    ``record=True`` also returns, per prompt, what the output layer saw at each step (the
    steps of its continuation, plus the one that chose EOS): from the same pass, so the
    original's own continuations need no second pass to be scored. ``per_batch(prompts)``
    is held around each batch's generation, given the indices of its prompts in row order
    (a hook that varies the model per row)."""
    vocab = _vocab(lm)
    lengths = [len(p) + max_new_tokens for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    records: list[GenerationSteps | None] = [None] * len(prompts)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    softcap = getattr(lm.model.config, "final_logit_softcapping", None)

    def keep_step(module, args, output) -> None:
        # float32, as the scoring pass computes it: float64 over the whole vocabulary at every
        # step cost a quarter of the generation's time on a CPU.
        logits = output[:, -1].float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        steps.append((args[0][:, -1].float().cpu(), log_normalizer(logits).double().cpu(),
                      logits.max(-1).values.double().cpu()))

    hook = lm.model.get_output_embeddings().register_forward_hook(keep_step) if record else None
    stops = {lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id}
    try:
        for batch in _batches(lengths, [1] * len(prompts), vocab, batching.generation_budget(lm)):
            steps.clear()
            ids, mask, _ = left_pad([list(prompts[i]) for i in batch], lm.tokenizer.pad_token_id, lm.device)
            with per_batch(batch) if per_batch is not None else nullcontext():
                generated = lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=lm.tokenizer.pad_token_id,
                )[:, ids.shape[1]:]
            for row, index in enumerate(batch):
                tokens = generated[row].tolist()
                cut = next((t for t, token in enumerate(tokens) if token in stops), len(tokens))
                results[index] = tokens[:cut]
                if record:
                    taken = min(cut + 1, len(steps))  # the continuation's steps and the one that ended it
                    records[index] = GenerationSteps(*(torch.stack([s[part][row] for s in steps[:taken]])
                                                       for part in range(3)))
    finally:
        if hook is not None:
            hook.remove()
    return (results, records) if record else results  # type: ignore[return-value]

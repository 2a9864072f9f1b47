"""Coherence without an external judge.

For each prompt, the edited model writes a greedy continuation. The ORIGINAL model then
scores it: its mean per-token log-likelihood, compared with the original model's own
greedy continuation of the same prompt (a fluency ratio, i.e. a perplexity ratio), and
its share of distinct bigrams, compared with the original's (a repetition ratio):

  fluency    = min(1, exp(mean_ll(edited text) - mean_ll(original text)))
  repetition = min(1, distinct2(edited text) / distinct2(original text))
  coherence  = harmonic(fluency, repetition)

This mirrors the reference's "harmonic mean of two ratios to the original, each capped
at 1", with the external LLM's relevance/fluency ratings replaced by the original model's
likelihood and a degeneration measure.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from obliviate.evaluation.cache import pack, unpack
from obliviate.models.loading import LoadedModel
from obliviate.evaluation.scoring import Batching, GenerationSteps, continuation_logprobs, greedy_generate

EMPTY_CONTINUATION_LL = -20.0  # per token: an empty answer counts as worse than any real text


@dataclass
class CoherenceSet:
    """Prompts and the original model's own continuations, computed once."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    original_continuations: list[list[int]]
    original_ll: np.ndarray
    original_distinct: np.ndarray
    max_new_tokens: int
    steps: list[GenerationSteps] | None = None  # what the output layer saw at each original step

    def token_sets(self) -> list[frozenset[int]]:
        return [frozenset(p) | frozenset(c) for p, c in zip(self.prompt_ids, self.original_continuations)]

    def touching(self, token_ids: set[int] | None) -> np.ndarray:
        """Prompts whose greedy path could change: the prompt or the original continuation uses
        an edited token. (With input-embedding-only edits every other path is identical.)"""
        if token_ids is None:
            return np.arange(len(self.prompts))
        return np.array([i for i, ids in enumerate(self.token_sets()) if ids & token_ids], dtype=int)


def distinct_bigrams(tokens: list[int]) -> float:
    if len(tokens) < 2:
        return 0.0
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs)


def mean_loglik(original: LoadedModel, prompt_ids: list[list[int]], continuations: list[list[int]], batching: Batching) -> np.ndarray:
    scored = [i for i, c in enumerate(continuations) if c]
    totals = continuation_logprobs(original, [(prompt_ids[i], continuations[i]) for i in scored], batching).numpy()
    out = np.full(len(continuations), EMPTY_CONTINUATION_LL)
    out[scored] = totals / np.array([len(continuations[i]) for i in scored])
    return out


def build_coherence_set(original: LoadedModel, prompts: list[str], max_new_tokens: int, batching: Batching = Batching()) -> CoherenceSet:
    """The original's continuations, scored from the generation pass itself (greedy: the
    chosen token's log-probability is the top one), with its output-layer inputs kept."""
    prompt_ids = [original.tokenizer(p).input_ids for p in prompts]
    continuations, steps = greedy_generate(original, prompt_ids, max_new_tokens, batching, record=True)
    scored = [record.mean_loglik(len(c)) for record, c in zip(steps, continuations)]
    return CoherenceSet(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        original_continuations=continuations,
        original_ll=np.array([EMPTY_CONTINUATION_LL if ll is None else ll for ll in scored]),
        original_distinct=np.array([distinct_bigrams(c) for c in continuations]),
        max_new_tokens=max_new_tokens,
        steps=steps,
    )


def coherence_rows(edited_ll: np.ndarray, edited_distinct: np.ndarray, reference: CoherenceSet) -> tuple[np.ndarray, ...]:
    """Rows for the bootstrap: one per prompt."""
    return (edited_ll, reference.original_ll, edited_distinct, reference.original_distinct)


def encode_coherence_set(reference: CoherenceSet) -> tuple[dict[str, torch.Tensor], dict]:
    """A coherence set as tensors for the results cache (the prompts are in its key)."""
    tensors = {f"prompt_{k}": v for k, v in pack(reference.prompt_ids).items()}
    tensors.update({f"continuation_{k}": v for k, v in pack(reference.original_continuations).items()})
    tensors["original_ll"] = torch.from_numpy(np.asarray(reference.original_ll, dtype=np.float64))
    tensors["original_distinct"] = torch.from_numpy(np.asarray(reference.original_distinct, dtype=np.float64))
    if reference.steps is not None:
        for part, dtype in (("hidden", torch.float32), ("log_norm", torch.float64), ("top_logit", torch.float64)):
            packed = pack([getattr(s, part) for s in reference.steps], dtype)
            tensors[f"steps_{part}"], tensors["steps_lengths"] = packed["values"], packed["lengths"]
    return tensors, {}


def decode_coherence_set(tensors: dict[str, torch.Tensor], prompts: list[str], max_new_tokens: int) -> CoherenceSet:
    ids = lambda name: [t.tolist() for t in unpack(tensors[f"{name}_values"], tensors[f"{name}_lengths"])]  # noqa: E731
    steps = None
    if "steps_lengths" in tensors:
        parts = [unpack(tensors[f"steps_{part}"], tensors["steps_lengths"]) for part in ("hidden", "log_norm", "top_logit")]
        steps = [GenerationSteps(*record) for record in zip(*parts)]
    prompt_ids = ids("prompt")
    if len(prompt_ids) != len(prompts):
        raise ValueError("cache entry of another prompt set")
    return CoherenceSet(prompts=list(prompts), prompt_ids=prompt_ids, original_continuations=ids("continuation"),
                        original_ll=tensors["original_ll"].numpy(), original_distinct=tensors["original_distinct"].numpy(),
                        max_new_tokens=max_new_tokens, steps=steps)

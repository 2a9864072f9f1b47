"""Exact answers after an edit that also changes some rows of the OUTPUT matrix.

A tied model's erasure edits the shared embedding matrix, so the edited tokens' output
rows change too. For an input that contains none of the edited tokens, the hidden states
are exactly the original's; only the logits of the edited tokens move, and with them the
softmax normalizer at every position. From the original's final hidden state h and its
log-normalizer Z at each position, the edited normalizer is exact in closed form:

    Z' = log( exp(Z) - sum_i exp(l_i(h)) + sum_i exp(l'_i(h)) ),  i over the edited tokens,

with l_i = h . w_i (the original row) and l'_i = h . w'_i (the edited one), through the
model's final logit soft-cap when it has one. So a multiple-choice option's log-probability
moves by -(Z' - Z) summed over its positions, and a greedy continuation stays the same as
long as no edited token overtakes the token the original chose at any step. Inputs where
that cannot be decided safely are run again in full.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from obliviate.models.loading import LoadedModel
from obliviate.evaluation.scoring import Batching, GenerationSteps, OutputStates, _batches, _vocab
from obliviate.models.layers import left_pad

# A greedy step is called unchanged only if the best edited token stays this far (in
# logits) below the token the original chose: hidden states captured in one batched pass
# differ from the generation's cached ones by float noise.
ARGMAX_MARGIN = 1e-3
# Below this share of probability mass outside the edited tokens, the subtraction in Z'
# loses precision: such positions are marked unsafe and their input is run in full.
MIN_REST_MASS = 1e-9


@torch.no_grad()
def capture_output_states(lm: LoadedModel, sequences: Sequence[list[int]], last: Sequence[int],
                          batching: Batching = Batching()) -> list[OutputStates]:
    """Hidden states entering the output layer, and logsumexp of the logits, at the last
    ``last[i]`` positions of each sequence (one batched forward pass, left-padded). For
    inputs that were not scored in a pass that kept them (``continuation_logprobs``)."""
    captured: list[torch.Tensor] = []
    head = lm.model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    out: list[OutputStates | None] = [None] * len(sequences)
    try:
        for batch in _batches([len(s) for s in sequences], list(last), _vocab(lm), batching.budget(lm)):
            keep = max(last[i] for i in batch)
            ids, mask, positions = left_pad([list(sequences[i]) for i in batch], lm.tokenizer.pad_token_id, lm.device)
            captured.clear()
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep,
                              use_cache=False).logits
            hidden = captured[-1][:, -keep:]
            log_norm = torch.logsumexp(logits.double(), dim=-1)
            for row, index in enumerate(batch):
                n = last[index]
                out[index] = OutputStates(hidden[row, keep - n:].float().cpu(), log_norm[row, keep - n:].cpu())
    finally:
        hook.remove()
    return out  # type: ignore[return-value]


def _logits(hidden: torch.Tensor, rows: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = hidden.double() @ rows.double().T
    return softcap * torch.tanh(logits / softcap) if softcap else logits


@dataclass(frozen=True)
class OutputChange:
    """Old and new output rows of the edited tokens (and the model's final soft-cap)."""

    token_ids: torch.Tensor
    old_rows: torch.Tensor
    new_rows: torch.Tensor
    softcap: float | None

    def normalizer_shift(self, states: OutputStates) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z' - Z per position, whether it is numerically safe per position)."""
        old = _logits(states.hidden, self.old_rows, self.softcap)
        new = _logits(states.hidden, self.new_rows, self.softcap)
        z = states.log_norm
        rest = 1.0 - torch.exp(torch.logsumexp(old - z[:, None], dim=1))
        safe = rest > MIN_REST_MASS
        rest_log = z + torch.log(rest.clamp(min=MIN_REST_MASS))
        shifted = torch.logaddexp(rest_log, torch.logsumexp(new, dim=1))
        return shifted - z, safe


def output_change(lm: LoadedModel, token_ids: set[int], old_rows: torch.Tensor) -> OutputChange | None:
    """The change to the output rows of ``token_ids`` (model currently edited), or None
    when those rows did not change (untied embeddings: nothing to correct)."""
    ids = torch.tensor(sorted(token_ids), dtype=torch.long)
    new_rows = lm.model.get_output_embeddings().weight[ids.to(lm.device)].detach().float().cpu()
    if torch.equal(new_rows, old_rows):
        return None
    softcap = getattr(lm.model.config, "final_logit_softcapping", None)
    return OutputChange(ids, old_rows, new_rows, softcap)


def current_output_rows(lm: LoadedModel, token_ids: set[int]) -> torch.Tensor:
    """The output-matrix rows of ``token_ids`` as they are now (float32, on the CPU)."""
    ids = torch.tensor(sorted(token_ids), dtype=torch.long)
    return lm.model.get_output_embeddings().weight[ids.to(lm.device)].detach().float().cpu().clone()


def option_shift(change: OutputChange, states: OutputStates) -> float | None:
    """How much an untouched option's log-probability moves (-(sum of Z' - Z)); None if unsafe."""
    shift, safe = change.normalizer_shift(states)
    return None if not bool(safe.all()) else float(-shift.sum())


def greedy_path_holds(change: OutputChange, steps: GenerationSteps, length: int) -> bool:
    """True when no edited token overtakes the original's choice at any of the first
    ``length`` greedy steps (argmax does not depend on the normalizer: only logits count)."""
    if length == 0:
        return True
    best_edited = _logits(steps.hidden[:length], change.new_rows, change.softcap).max(dim=1).values
    return bool((best_edited < steps.top_logit[:length] - ARGMAX_MARGIN).all())

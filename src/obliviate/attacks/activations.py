"""White-box readouts of the hidden states.

- ``ablate-direction`` (Łucki et al. 2024, "An adversarial perspective on machine
  unlearning for AI safety"): at the input embedding's output and at every decoder
  block's output, the direction that separates the erased model's mean activation from
  the original's on the concept's sentences (difference of means) is projected out of the
  erased model's hidden states; then the TEST questions are scored. An erasure that adds a
  few directions of "noise" on concept text loses it; knowledge that is gone stays gone.
- ``logit-lens``: the TEST questions read at intermediate blocks: the blocks above are
  skipped (each returns its input), so the final norm and the output layer read that
  block's hidden state. Knowledge that an erasure hides only in its last layers shows up
  earlier. The attack's "after" is the best block's accuracy.

Both leave the models as they came (hooks only).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
from torch import nn

from obliviate.attacks.common import (AttackContext, accuracy_interval, cached_for_original,
                                     cached_tensor_for_original, correct_on, each_role)
from obliviate.errors import ObliviateError
from obliviate.models.layers import decoder_layers
from obliviate.models.loading import LoadedModel


# ---- where the residual stream is read and written ------------------------------------

def residual_sites(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the residual stream: the input embedding, then every block."""
    return [model.get_input_embeddings(), *decoder_layers(model)[1]]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def mean_activations(lm: LoadedModel, sentences: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """(n_sites, hidden): each site's output averaged over the sentences' real tokens."""
    sites = residual_sites(lm.model)
    sums: list[torch.Tensor | None] = [None] * len(sites)
    mask_holder: dict[str, torch.Tensor] = {}

    def keep(index: int):
        def hook(_module, _inputs, output):
            hidden = _hidden(output).float()
            total = (hidden * mask_holder["mask"]).sum(dim=(0, 1)).cpu()
            sums[index] = total if sums[index] is None else sums[index] + total
        return hook

    handles = [site.register_forward_hook(keep(i)) for i, site in enumerate(sites)]
    tokens = 0.0
    try:
        for start in range(0, len(sentences), batch_size):
            enc = lm.tokenizer(sentences[start:start + batch_size], return_tensors="pt", padding=True,
                               truncation=True, max_length=max_length).to(lm.device)
            mask_holder["mask"] = enc["attention_mask"].unsqueeze(-1).float()
            tokens += float(enc["attention_mask"].sum())
            lm.model(**enc, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(sums) / max(tokens, 1.0)


def difference_directions(erased: torch.Tensor, original: torch.Tensor, min_norm: float = 1e-6) -> torch.Tensor:
    """Unit difference-of-means direction at each site (a zero row where the two agree)."""
    diff = (erased - original).double()
    norms = diff.norm(dim=1, keepdim=True)
    scale = original.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where(norms / scale > min_norm, diff / norms.clamp_min(1e-12), torch.zeros_like(diff)).float()


def project_out(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``hidden`` without its component along the unit ``direction`` (last axis)."""
    direction = direction.to(device=hidden.device, dtype=hidden.dtype)
    return hidden - (hidden @ direction).unsqueeze(-1) * direction


@contextmanager
def directions_ablated(model: nn.Module, directions: torch.Tensor) -> Iterator[int]:
    """Every residual site's output without its direction, for a block; yields how many sites are ablated."""
    sites = residual_sites(model)
    if len(directions) != len(sites):
        raise ObliviateError(f"{len(directions)} directions for {len(sites)} residual sites.")

    def ablate(direction: torch.Tensor):
        return lambda _module, _inputs, output: _with_hidden(output, project_out(_hidden(output), direction))

    active = [(site, d) for site, d in zip(sites, directions) if d.abs().sum() > 0]
    with ExitStack() as stack:
        for site, direction in active:
            stack.callback(site.register_forward_hook(ablate(direction)).remove)
        yield len(active)


@contextmanager
def read_at_block(model: nn.Module, block: int) -> Iterator[None]:
    """The blocks above ``block`` return their input, so the output layer reads ``block``'s
    output. They are not even run where the family runs only the config's first
    ``num_hidden_layers`` blocks (Gemma, Llama, Mistral, Qwen: the same scores, a reading at
    block 2 of 18 in under half the time); elsewhere they run and their output is dropped."""
    _, blocks = decoder_layers(model)
    config = model.config.get_text_config()
    depth = config.num_hidden_layers

    def skip(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return _with_hidden(output, hidden)

    with ExitStack() as stack:
        for layer in blocks[block + 1:]:
            stack.callback(layer.register_forward_hook(skip, with_kwargs=True).remove)
        config.num_hidden_layers = block + 1
        stack.callback(setattr, config, "num_hidden_layers", depth)
        yield


# ---- ablate-direction ------------------------------------------------------------------

@dataclass(frozen=True)
class AblateConfig:
    sentences: int = 100  # concept sentences whose mean activations give the directions
    max_length: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.sentences < 1 or self.max_length < 2 or self.batch_size < 1:
            raise ObliviateError("ablate-direction needs sentences >= 1, max_length >= 2 and batch_size >= 1.")


def run_ablate(ctx: AttackContext, config: AblateConfig) -> dict:
    """The erased model with the erased-minus-original directions projected out; the
    original is its own reference (no direction separates it from itself)."""
    if "original" not in ctx.models or "erased" not in ctx.models:
        raise ObliviateError("ablate-direction needs both the original and the erased model.")
    sentences = ctx.data.concept_sentences[:config.sentences]
    means = {role: original_means(ctx, lm, sentences, config) if role == "original"
             else mean_activations(lm, sentences, config.max_length, config.batch_size)
             for role, lm in ctx.models.items()}
    directions = difference_directions(means["erased"], means["original"])
    gaps = (means["erased"] - means["original"]).norm(dim=1)

    def measure(role, lm, prepared, before):
        if role == "original":
            return before, {"ablated_sites": 0}
        with directions_ablated(lm.model, directions) as sites:
            return correct_on(lm, prepared, ctx.batching), {"ablated_sites": sites}

    out = {"settings": asdict(config), "sentences_used": len(sentences),
           "mean_gap_by_site": [float(g) for g in gaps]}  # site 0: the embedding output; 1..: blocks
    return each_role(ctx, out, measure)


def original_means(ctx: AttackContext, lm: LoadedModel, sentences: list[str], config: AblateConfig) -> torch.Tensor:
    """The original's mean activations, through the results cache (they depend on nothing erased)."""
    payload = {"sentences": sentences, "max_length": config.max_length, "batch_size": config.batch_size}
    return cached_tensor_for_original(ctx, lm, "ablate_means", payload,
                                      lambda: mean_activations(lm, sentences, config.max_length, config.batch_size))


# ---- logit-lens ------------------------------------------------------------------------

@dataclass(frozen=True)
class LensConfig:
    stride: int = 3  # read every stride-th block (counting from the last, which is the model's own answer)

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ObliviateError(f"logit-lens stride must be >= 1, got {self.stride}.")


def lens_blocks(depth: int, stride: int) -> list[int]:
    """Blocks read, deepest last: depth-1, depth-1-stride, ... (0-based, at least one)."""
    return sorted(range(depth - 1, -1, -stride))


def run_lens(ctx: AttackContext, config: LensConfig) -> dict:
    def measure(role, lm, prepared, before):
        blocks = lens_blocks(len(decoder_layers(lm.model)[1]), config.stride)

        def per_block() -> list[list[int]]:
            out = []
            for block in blocks[:-1]:
                with read_at_block(lm.model, block):
                    out.append(correct_on(lm, prepared, ctx.batching).astype(int).tolist())
            return out + [np.asarray(before).astype(int).tolist()]  # the last block is the model's own answer

        rows = (cached_for_original(ctx, lm, prepared, "logit_lens", asdict(config), per_block) if role == "original"
                else per_block())
        corrects = [np.asarray(r, dtype=bool) for r in rows]
        best = int(np.argmax([c.mean() for c in corrects]))
        return corrects[best], {
            "blocks": blocks, "best_block": blocks[best],
            "by_block": [accuracy_interval(c, ctx.bootstrap, ctx.seed) for c in corrects],
            "by_block_correct": [c.astype(int).tolist() for c in corrects],
        }

    return each_role(ctx, {"settings": asdict(config)}, measure)


ATTACKS = {
    "ablate-direction": SimpleNamespace(Config=AblateConfig, run=run_ablate),
    "logit-lens": SimpleNamespace(Config=LensConfig, run=run_lens),
}

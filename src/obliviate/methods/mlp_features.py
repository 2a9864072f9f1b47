"""What SNMF and PISCES read from a model's MLPs: layer ranges, the projection modules,
activations on text, and the MLP (value) vectors.

Architecture-agnostic: the decoder blocks come from ``models.layers.decoder_layers`` and
the projections are looked up inside a block by their module path (``mlp.up_proj`` and
``mlp.down_proj`` in Gemma, Llama, Mistral and Qwen); nothing here names a family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.models.layers import MLP_DOWN, MLP_UP, decoder_layers, model_device

RANGE = re.compile(r"^\s*([0-9./]+)\s*-\s*([0-9./]+)\s*$")


def _layer_index(endpoint: str, depth: int, spec: str) -> int:
    """An integer is a block index; ``a/b`` or a decimal is a fraction of the depth."""
    try:
        if "/" in endpoint:
            top, bottom = endpoint.split("/")
            return min(depth - 1, int(round(float(top) / float(bottom) * depth)))
        if "." in endpoint:
            return min(depth - 1, int(round(float(endpoint) * depth)))
        return int(endpoint)
    except (ValueError, ZeroDivisionError) as err:
        raise ObliviateError(f"Layer range {spec!r}: {endpoint!r} is not a layer index or a fraction.") from err


def parse_layer_range(spec: str, depth: int) -> list[int]:
    """Blocks of a range ``"A-B"`` (both ends included). ``A``/``B`` are block indices
    (``"0-8"``) or fractions of the depth (``"9/26-17/26"``, ``"0.35-0.65"``): a fraction f
    is block round(f * depth), so a range written for one model scales to another's depth."""
    match = RANGE.match(str(spec))
    if not match:
        raise ObliviateError(f"Layer range {spec!r} must look like 'A-B' (e.g. '0-8' or '9/26-17/26').")
    first, last = (_layer_index(e, depth, spec) for e in match.groups())
    if not 0 <= first <= last < depth:
        raise ObliviateError(f"Layer range {spec!r} gives blocks {first}..{last}; the model has {depth} (0..{depth - 1}).")
    return list(range(first, last + 1))


@dataclass(frozen=True)
class MlpProjections:
    """One block's MLP input and output projections and their parameter names."""

    layer: int
    up: nn.Linear
    down: nn.Linear
    up_name: str  # e.g. model.layers.3.mlp.up_proj.weight
    down_name: str


def mlp_projections(model: nn.Module, layer: int, up_module: str = MLP_UP,
                    down_module: str = MLP_DOWN) -> MlpProjections:
    prefix, stack = decoder_layers(model)
    block = stack[layer]
    found = []
    for path in (up_module, down_module):
        try:
            module = block.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            raise ObliviateError(f"Block {layer} has no linear module {path!r}; its linear modules: {', '.join(linears)}.")
        found.append(module)
    return MlpProjections(layer, found[0], found[1], f"{prefix}.{layer}.{up_module}.weight",
                          f"{prefix}.{layer}.{down_module}.weight")


class _Stop(Exception):
    pass


@dataclass
class MlpActivations:
    """Per block: the MLP input (what up_proj reads, n x d_model) and the hidden
    activations (what down_proj reads, n x d_ff) on content tokens; ``source`` says which
    text set each row came from (an index into the ``texts`` groups given)."""

    inputs: dict[int, torch.Tensor]
    hidden: dict[int, torch.Tensor]
    source: torch.Tensor  # (n,) group index of each token
    token_ids: torch.Tensor  # (n,) the token at each row (to describe features)


def collect_mlp_activations(model: nn.Module, tokenizer, groups: list[list[str]], layers: list[int],
                            up_module: str = MLP_UP, down_module: str = MLP_DOWN,
                            max_length: int = 64, batch_size: int = 16, max_tokens: int = 2000,
                            seed: int = 42) -> MlpActivations:
    """MLP inputs and hidden activations of ``layers`` on every group of texts, at most
    ``max_tokens`` content tokens per group (a seeded sample: the factorization's cost is
    linear in tokens, and 2,000 a side already covers every concept word many times).
    Special tokens and padding are dropped: a BOS activation is the same for every text
    and far larger than any other, it would become a feature of its own."""
    projections = {layer: mlp_projections(model, layer, up_module, down_module) for layer in layers}
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    inputs: dict[int, list] = {layer: [] for layer in layers}
    hidden: dict[int, list] = {layer: [] for layer in layers}
    sources, token_ids = [], []
    generator = torch.Generator().manual_seed(seed)
    for group_index, texts in enumerate(groups):
        group_in, group_hidden, group_ids = _group_activations(model, tokenizer, texts, projections, special, max_length, batch_size)
        count = next(iter(group_in.values())).shape[0] if group_in else 0
        keep = torch.randperm(count, generator=generator)[:max_tokens].sort().values
        for layer in layers:
            inputs[layer].append(group_in[layer][keep])
            hidden[layer].append(group_hidden[layer][keep])
        sources.append(torch.full((len(keep),), group_index, dtype=torch.long))
        token_ids.append(group_ids[keep])
    return MlpActivations({l: torch.cat(v) for l, v in inputs.items()}, {l: torch.cat(v) for l, v in hidden.items()},
                          torch.cat(sources), torch.cat(token_ids))


def _group_activations(model, tokenizer, texts, projections, special, max_length, batch_size):
    device = model_device(model)
    deepest = max(projections)
    inputs = {layer: [] for layer in projections}
    hidden = {layer: [] for layer in projections}
    captured: dict = {}
    ids_kept = []

    def keep(layer: int, kind: str):
        def hook(_module, args):
            captured[(layer, kind)] = args[0].detach()
            if kind == "hidden" and layer == deepest:
                raise _Stop  # nothing above the deepest MLP is needed
        return hook

    handles = []
    for layer, proj in projections.items():
        handles.append(proj.up.register_forward_pre_hook(keep(layer, "input")))
        handles.append(proj.down.register_forward_pre_hook(keep(layer, "hidden")))
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
            content = (mask.bool() & ~torch.isin(ids, special.to(device))).cpu()
            ids_kept.append(ids.cpu()[content])
            for layer in projections:
                inputs[layer].append(captured[(layer, "input")].float().cpu()[content])
                hidden[layer].append(captured[(layer, "hidden")].float().cpu()[content])
    finally:
        for handle in handles:
            handle.remove()
    return ({l: torch.cat(v) for l, v in inputs.items()}, {l: torch.cat(v) for l, v in hidden.items()},
            torch.cat(ids_kept))


def down_vectors(model: nn.Module, layers: list[int], down_module: str = MLP_DOWN) -> dict[int, torch.Tensor]:
    """The MLP (value) vectors of each block: the columns of its down-projection, one per
    hidden neuron, as rows (d_ff x d_model, float32 on the CPU)."""
    return {layer: mlp_projections(model, layer, down_module=down_module).down.weight.detach().float().cpu().T.contiguous()
            for layer in layers}


def sample_texts(texts: list[str], limit: int, seed: int) -> list[str]:
    """At most ``limit`` of ``texts``, a seeded sample in their original order (the other
    concepts' sentences number thousands; a few hundred are enough as negatives)."""
    if len(texts) <= limit:
        return list(texts)
    keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [texts[int(i)] for i in keep]


def orthonormal_basis(vectors: torch.Tensor, tolerance: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (columns) of the span of ``vectors``' columns, float64;
    directions with a negligible singular value are dropped (two features may share one)."""
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    return u[:, s > tolerance * max(float(s.max()), 1e-300)] if s.numel() else u

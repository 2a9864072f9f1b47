"""Where things are inside a model, for every family in one place (no per-family code).

Layer numbers, one convention for the whole package:
- a decoder BLOCK index ``i`` is 0-based: block 0 is the first layer (RMU's ``layer``,
  ELM's ``layer_from``/``layer_to``, the parameter names ``...layers.{i}...``);
- a HIDDEN-STATE index is transformers' ``output_hidden_states`` numbering: 0 is the
  embedding output, ``i + 1`` is block ``i``'s output (the ECO classifier's ``layer`` and
  the probe's per-layer accuracies use it). ``hidden_state_index(i) == i + 1``.
"""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from obliviate.errors import ObliviateError

# Module names inside a decoder block that Gemma, Llama, Mistral and Qwen share; methods take
# them as settings defaults, so another family is one setting away (or one edit here).
MLP_UP = "mlp.up_proj"  # W_in: reads the residual stream
MLP_DOWN = "mlp.down_proj"  # W_out: writes the MLP's value vectors
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_DOWN_WEIGHTS = r"mlp\.down_proj\.weight$"
# Every linear weight of every decoder block (q/k/v/o and gate/up/down projections).
BLOCK_WEIGHTS = r"\.(mlp|self_attn)\.\w+_proj\.weight$"


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embedding (also under a device map)."""
    return model.get_input_embeddings().weight.device


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module name, the stack of decoder blocks): the ModuleList with ``num_hidden_layers``
    blocks, else the longest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ObliviateError("Could not find the model's decoder layers (no nn.ModuleList of layers).")
    count = num_hidden_layers(model)
    exact = [item for item in lists if len(item[1]) == count]
    return exact[0] if exact else max(lists, key=lambda item: len(item[1]))


def num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is None and hasattr(config, "get_text_config"):
        count = config.get_text_config().num_hidden_layers
    return count


def depth(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


def hidden_state_index(block: int) -> int:
    return block + 1


def resolve_layer(layer: int | None, fraction: float, depth: int, what: str = "layer") -> int:
    """A 0-based block index, from ``layer`` when given, else round(fraction * depth)."""
    index = int(round(fraction * depth)) if layer is None else int(layer)
    if not 0 <= index < depth:
        raise ObliviateError(f"{what} {index} is beyond the model's depth: it has {depth} layers (0..{depth - 1}).")
    return index


def select_parameters(model: nn.Module, pattern: str, layers: list[int] | None = None) -> dict[str, nn.Parameter]:
    """Parameters whose name matches ``pattern`` (a regex), restricted to blocks ``layers`` if given."""
    prefix, _ = decoder_layers(model)
    regex = re.compile(pattern)
    chosen = {}
    for name, param in model.named_parameters():
        if not regex.search(name):
            continue
        if layers is not None:
            match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
            if not match or int(match.group(1)) not in layers:
                continue
        chosen[name] = param
    if not chosen:
        raise ObliviateError(
            f"No parameter of the model matches {pattern!r}" + (f" in layers {layers}" if layers else "")
            + f". Example parameter names: {', '.join(n for n, _ in list(model.named_parameters())[1:6])}."
        )
    return chosen


class _StopForward(Exception):
    """Raised once the deepest requested block has run: the rest of the model is skipped."""


def block_outputs(model: nn.Module, blocks: Sequence[int], **inputs) -> dict[int, torch.Tensor]:
    """The output hidden states (B, T, D) of decoder blocks ``blocks`` (0-based); the forward
    pass stops after the deepest one, so the layers above and the (large) vocabulary head
    never run. ``inputs`` go to the model (input_ids, attention_mask, position_ids)."""
    _, stack = decoder_layers(model)
    for block in blocks:
        if not 0 <= block < len(stack):
            raise ObliviateError(f"Layer {block} is beyond the model's depth: it has {len(stack)} layers (0..{len(stack) - 1}).")
    deepest = max(blocks)
    captured: dict[int, torch.Tensor] = {}

    def keep(block: int):
        def hook(_module, _inputs, output):
            captured[block] = output[0] if isinstance(output, tuple) else output
            if block == deepest:
                raise _StopForward
        return hook

    handles = [stack[block].register_forward_hook(keep(block)) for block in set(blocks)]
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for left-padded token lists: the last
    token of every row sits at the same position, and positions count real tokens only."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def cache_argument(model) -> str:
    """The key/value cache's name in forward() and its output: "cache" from transformers 5
    on ("past_key_values" is a deprecated alias there), "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def input_rows_per_sequence(model: nn.Module, token_ids: torch.Tensor, embedded: torch.Tensor,
                            owner: Sequence[int]) -> Iterator[None]:
    """While held, the input embedding module gives batch row ``b``'s tokens ``token_ids`` the
    vectors ``embedded[owner[b]]`` ((variants, len(token_ids), d), as the module outputs them:
    scaled where it scales): several versions of those rows run in one batch."""
    module = model.get_input_embeddings()
    slot = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
    slot[token_ids.cpu()] = torch.arange(len(token_ids))
    owners = torch.tensor(list(owner), dtype=torch.long)

    def swap(_module, args, output):
        ids = args[0].cpu()
        found = slot[ids]
        hit = found >= 0
        if not hit.any():
            return output
        variant = owners[:, None].expand_as(ids)
        output[hit.to(output.device)] = embedded[variant[hit], found[hit]].to(output.device, output.dtype)
        return output

    handle = module.register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()

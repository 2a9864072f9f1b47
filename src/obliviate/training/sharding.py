"""Training over several processes: the model sharded with PyTorch's FSDP2 (``fully_shard``).

No home-made parallelism: the processes are started by ``accelerate launch`` (or torchrun),
accelerate opens the process group, and ``torch.distributed.fsdp.fully_shard`` shards every
decoder layer and the root module, the recipe accelerate's own FSDP2 plugin applies. Here
only what the training loop needs around it:

- which process this is (``world``), and which micro-batches it runs (``my_micro_batches``);
- sharding a model once, and pointing the caller's ``{name: parameter}`` dict at the sharded
  parameters (FSDP2 replaces the module's ``nn.Parameter`` objects; the methods' closures hold
  the dict, so it is updated in place);
- reading a sharded parameter whole (``full``) and writing a whole value into it (``assign``),
  so snapshots, restores and the frozen-original swaps work the same sharded or not.

accelerate refuses its FSDP plugin on the CPU (its FSDP state is for GPUs only), so this
module calls ``fully_shard`` directly; with the gloo backend it runs on the CPU, which is how
tests/test_training_scale.py checks two processes against one.
"""
from __future__ import annotations

import torch
from torch import nn

from obliviate.models.layers import decoder_layers


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group. Under ``accelerate
    launch`` or torchrun (WORLD_SIZE > 1) the process group is opened by accelerate here if
    nothing opened it yet (nccl on GPUs, gloo on the CPU)."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_micro_batches(total: int) -> list[int]:
    """The micro-batches of one optimizer step this process computes: split over the
    processes when they divide ``total`` evenly (data parallel), else all of them on every
    process (the shards still divide the memory; the gradients are the same on each)."""
    rank, size = world()
    if size == 1 or total % size:
        return list(range(total))
    return list(range(rank, total, size))


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter (all-gathered when sharded: every process must call)."""
    return p.detach().full_tensor() if is_dtensor(p) else p.detach()


def assign(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole ``value`` into ``p`` (this process's shard of it when sharded)."""
    with torch.no_grad():
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            target = p.detach()
            local = distribute_tensor(value.to(target.to_local().device, target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            p.copy_(value.to(p.device, p.dtype))


def shard(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Shard ``model`` over the process group with FSDP2 (each decoder layer, then the
    root) unless it is already; re-point ``params`` (in place) at the sharded parameters.
    A model sharded by an earlier stage keeps its sharding: parameters selected from it are
    the sharded ones already."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    where = {id(p): (module, key) for module in model.modules() for key, p in module._parameters.items() if p is not None}
    missing = [name for name, p in params.items() if id(p) not in where]
    if missing:
        raise ValueError(f"parameters not found in the model: {missing[:3]}")
    places = {name: where[id(p)] for name, p in params.items()}
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for name, (module, key) in places.items():
        params[name] = module._parameters[key]

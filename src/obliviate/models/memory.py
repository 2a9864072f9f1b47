"""Scale helpers: where a model's weights live, device maps over several GPUs, batch sizes
from free memory, memory estimates, and peak-memory measurement.

No home-made parallelism: several GPUs are used through accelerate's device maps (the
layers are split across devices and run one after another); this module only plans and
measures. Every function works on the CPU and on "meta" tensors, so it is tested without
a GPU.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

# Evaluation batch limits (tokens per forward pass). The upper cap keeps one batch's MLP
# activations (tokens x intermediate x 3 x 2 bytes) to a few GB on an 8B model.
LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits kept at once by the scorer
MIN_BATCH_TOKENS = 512
MAX_BATCH_TOKENS = 65536
FREE_MEMORY_FRACTION = 0.5  # headroom for the allocator, logits and attention buffers


def text_config(config):
    """The language model's config (multimodal configs nest it; text configs return self)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_devices(model: nn.Module) -> set[torch.device]:
    """Every device that holds a parameter or buffer of ``model``."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.device for t in tensors}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, tied weights counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def per_token_activation_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """A conservative estimate of the activation bytes one token needs in a no-grad forward.

    Kept as the formula evaluation has always used (12 x hidden x layers values per token):
    several times what a no-grad forward holds at once, which leaves room for attention
    buffers of eager implementations (Gemma-2's soft-capping) and the allocator's slack.
    """
    text = text_config(config)
    element = torch.empty(0, dtype=dtype).element_size()
    return 12 * text.hidden_size * text.num_hidden_layers * element


def batch_tokens_for(config, free_bytes: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Tokens per evaluation batch that fit ``free_bytes`` of device memory, within limits."""
    tokens = int(free_bytes * FREE_MEMORY_FRACTION // per_token_activation_bytes(config, dtype))
    return max(MIN_BATCH_TOKENS, min(MAX_BATCH_TOKENS, tokens))


def free_cuda_bytes(model: nn.Module) -> int | None:
    """The smallest free memory among the GPUs that hold ``model`` (None: no GPU holds it).

    With a device map every GPU runs some layers on the whole batch, so the tightest GPU
    bounds the batch size.
    """
    gpus = {d for d in model_devices(model) if d.type == "cuda"}
    if not gpus:
        return None
    return min(torch.cuda.mem_get_info(d)[0] for d in gpus)


def auto_batch_tokens(model: nn.Module) -> int | None:
    """Batch tokens sized to the model's GPUs, or None when the model is not on a GPU."""
    free = free_cuda_bytes(model)
    if free is None:
        return None
    dtype = next(model.parameters()).dtype
    return batch_tokens_for(model.config, free, dtype)


def plan_device_map(
    model: nn.Module,
    max_memory: dict,
    dtype: torch.dtype | None = None,
    balanced: bool = True,
) -> dict[str, int | str]:
    """The device map accelerate would use to spread ``model`` over the devices in
    ``max_memory`` (e.g. {0: "40GiB", 1: "40GiB", "cpu": "64GiB"}).

    The same planning as ``from_pretrained(device_map="auto")``, callable on a model built
    on the "meta" device, so a layout can be checked before anything is downloaded.
    Decoder layers are never split (the model's ``_no_split_modules``), tied weights stay
    on one device, and ``balanced`` spreads layers evenly over the GPUs instead of filling
    the first one.
    """
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])

    def plan(memory: dict) -> dict:
        return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)

    packed = plan(max_memory)
    if not balanced or sum(1 for key in max_memory if key not in ("cpu", "disk")) < 2:
        return packed
    spread = plan(get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))
    # accelerate's balancing reserves room per GPU for its largest layer; when the GPUs are
    # nearly full that can push layers to the CPU that packing would keep on a GPU.
    offloaded = lambda device_map: any(d in ("cpu", "disk") for d in device_map.values())  # noqa: E731
    return packed if offloaded(spread) and not offloaded(packed) else spread


@dataclass(frozen=True)
class EraseMemoryEstimate:
    """Peak device memory of an EMBER erase, by part (bytes)."""

    weights: int
    untied_output: int  # the copy of a tied output matrix (0 when untied already)
    evaluation: int  # one evaluation batch at the auto-sized budget
    logits: int  # kept logits, bounded by LOGITS_BUDGET_BYTES
    fingerprints: int  # float64 copy of the largest parameter while verifying the edit

    @property
    def total(self) -> int:
        return self.weights + self.untied_output + self.evaluation + self.logits + self.fingerprints


def erase_memory_estimate(model: nn.Module, free_bytes: int, dtype: torch.dtype = torch.bfloat16) -> EraseMemoryEstimate:
    """What an EMBER erase keeps on one device: the weights once (the edit is applied and
    reverted in place, never a second copy of the model), plus the transient buffers.

    ``model`` may live on "meta": only shapes are read. Parameters are counted in ``dtype``.
    """

    element = torch.empty(0, dtype=dtype).element_size()
    params = list(model.parameters())
    weights = sum(p.numel() for p in params) * element
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    untied = output.weight.numel() * element if tied else 0
    tokens = batch_tokens_for(model.config, free_bytes - weights - untied, dtype)
    evaluation = tokens * per_token_activation_bytes(model.config, dtype)
    largest = max(p.numel() for p in params) * 8
    return EraseMemoryEstimate(weights, untied, evaluation, LOGITS_BUDGET_BYTES, largest)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak memory of a stage: GPU bytes allocated by torch on cuda, process RSS on the CPU.

    ``peak`` is the highest value seen during the stage, ``start`` the value when it began,
    so ``peak - start`` is what the stage added.
    """

    device: torch.device
    start: int = 0
    peak: int = 0
    seconds: float = 0.0

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


@contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Time a block and record its peak memory on ``device`` (see ``PeakMemory``)."""
    device = torch.device(device)
    record = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        record.start = torch.cuda.memory_allocated(device)
    else:
        _reset_cpu_peak()
        record.start = _rss_bytes()
    began = time.perf_counter()
    try:
        yield record
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            record.peak = torch.cuda.max_memory_allocated(device)
        else:
            record.peak = max(_cpu_peak_bytes() or 0, _rss_bytes())
        record.seconds = time.perf_counter() - began


def matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """This device's measured dense matmul rate (FLOP/s) in ``dtype``: the practical peak."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    fastest = float("inf")
    for _ in range(repeats):  # the fastest repeat: other processes sharing the device only slow it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - began)
    return 2 * n**3 / fastest


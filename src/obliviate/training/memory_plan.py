"""The memory plan of a training stage: what the weights, gradients, optimizer
state, activations and logits of a trained method or the relearning attack take on each
device, computed before the first step from shapes only (the model may live on "meta"), and
a refusal that names the settings that would fit. training/loop.py prints it before every
training stage. Lives in training/ because it depends on the optimizer choices
(training/optim.py); models/memory.py keeps the lower-level sizing and measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.models.memory import text_config
from obliviate.training.optim import LOW_PRECISION, SPECS, spec

# Values saved for the backward pass per token and decoder layer, in units of the compute
# dtype: the block's inputs, normalised inputs, q/k/v and attention output, o_proj input
# (~10 x hidden with SDPA, which keeps no T x T scores), and the MLP's gate, up, activation
# and product (4 x intermediate).
ACTIVATION_HIDDEN_FACTOR = 10
ACTIVATION_INTERMEDIATE_FACTOR = 4
# Per logit position: the logits (compute dtype) and up to four fp32 copies (the loss's upcast,
# its gradient, Gemma's soft-capping). On an H200 the plan came within -3% to +6% of torch's
# measured peak for one relearning step of Llama-3.1-8B and Gemma-2-2B (bench/bench_scale.py).
LOGIT_BYTES = 2 + 4 * 4
DEVICE_HEADROOM = 0.92  # the allocator's fragmentation and CUDA context


@dataclass(frozen=True)
class TrainingPlan:
    """What one training stage keeps on each device (bytes), before it starts."""

    optimizer: str
    devices: int
    sharded: bool  # FSDP: weights, grads and optimizer state divided over the devices
    batch: int
    length: int
    sequences: int  # batch-sized passes whose activations are alive at backward
    gradient_checkpointing: bool
    trained_params: int
    weights: int
    grads: int
    optimizer_state: int
    gather_buffer: int  # FSDP: the unsharded layers in flight
    optimizer_transient: int  # the optimizer step's temporaries (8-bit states dequantized)
    activations: int
    logits: int
    budget: int | None  # usable bytes per device (None: not checked, e.g. the CPU)

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer_state + self.gather_buffer + self.optimizer_transient
                + self.activations + self.logits)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {**out, "total": self.total, "fits": self.fits}

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        where = f"{self.devices} device(s), FSDP-sharded" if self.sharded else f"{self.devices} device"
        parts = [f"weights {gib(self.weights)}", f"grads {gib(self.grads)}", f"optimizer {gib(self.optimizer_state)}"]
        if self.gather_buffer:
            parts.append(f"FSDP gather {gib(self.gather_buffer)}")
        if self.optimizer_transient:
            parts.append(f"optimizer step {gib(self.optimizer_transient)}")
        parts += [f"activations {gib(self.activations)}", f"logits {gib(self.logits)}"]
        budget = "not checked" if self.budget is None else f"of {gib(self.budget)} usable"
        checkpointing = "on" if self.gradient_checkpointing else "off"
        return (f"memory plan ({self.optimizer}, {where}, batch {self.batch} x {self.length} tokens x {self.sequences} "
                f"pass(es), gradient checkpointing {checkpointing}, {self.trained_params / 1e6:.1f}M trained params): "
                f"{', '.join(parts)} = {gib(self.total)} per device, {budget}")


def _element(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def plan_training(
    model: nn.Module,
    trained: list[nn.Parameter] | None,
    optimizer: str,
    batch: int,
    length: int,
    sequences: int = 1,
    gradient_checkpointing: bool = False,
    devices: int = 1,
    sharded: bool = False,
    budget: int | None = None,
    dtype: torch.dtype | None = None,
    head: bool = True,
) -> TrainingPlan:
    """Plan a training stage's memory per device. ``model`` may live on "meta" (shapes only);
    ``trained`` is the list of trained parameters (None: every parameter); ``dtype``
    overrides the weights' dtype (e.g. bf16 for a meta model built in fp32). ``head``: the
    loss goes through the vocabulary head (False for RMU, which stops at a layer)."""
    chosen = spec(optimizer)
    params = list(dict.fromkeys(model.parameters()))
    trained = params if trained is None else list(dict.fromkeys(trained))
    element = _element(dtype) if dtype is not None else max((p.element_size() for p in params), default=4)
    compute = element
    if chosen.master_fp32 and (dtype or params[0].dtype) not in LOW_PRECISION:
        chosen = spec("adamw")  # fp32 weights: master copies are the weights themselves
    n_trained = sum(p.numel() for p in trained)
    n_all = sum(p.numel() for p in params)
    held, grad, state = chosen.bytes_per_param(element)
    weights = (n_all - n_trained) * element + n_trained * held
    grads, optimizer_state = n_trained * grad, int(n_trained * state)
    gather = 0
    if sharded and devices > 1:
        weights, grads, optimizer_state = (-(-x // devices) for x in (weights, grads, optimizer_state))
        text = text_config(model.config)
        layer = sum(p.numel() for p in params) // max(1, text.num_hidden_layers)  # a decoder layer, roughly
        gather = 2 * layer * element  # the layer in use and the one prefetched
    text = text_config(model.config)
    tokens = batch * length * sequences
    per_layer = ACTIVATION_HIDDEN_FACTOR * text.hidden_size + ACTIVATION_INTERMEDIATE_FACTOR * text.intermediate_size
    if gradient_checkpointing:  # each layer's input kept, one layer's activations recomputed at a time
        activations = tokens * (text.num_hidden_layers * text.hidden_size + per_layer) * compute
    else:
        activations = tokens * text.num_hidden_layers * per_layer * compute
    logits = tokens * text.vocab_size * LOGIT_BYTES if head else 0
    largest = max((p.numel() for p in trained), default=0) // (devices if sharded and devices > 1 else 1)
    transient = int(largest * chosen.transient_bytes)
    return TrainingPlan(optimizer, devices, sharded, batch, length, sequences, gradient_checkpointing, n_trained,
                        weights, grads, optimizer_state, gather, transient, activations, logits, budget)


def device_budget(model: nn.Module) -> int | None:
    """Usable bytes on the tightest GPU that holds ``model``: its free memory plus what the
    model's own parameters take there (the plan counts them), less headroom. None off GPUs."""
    gpus = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if not gpus:
        return None
    budgets = []
    for device in gpus:
        resident = sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()) if p.device == device)
        # torch's cache (reserved, not allocated) is free to this process though the driver counts it used
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budgets.append(int((torch.cuda.mem_get_info(device)[0] + cached + resident) * DEVICE_HEADROOM))
    return min(budgets)


def plan_options(plan: TrainingPlan, model: nn.Module, trained, dtype=None, head: bool = True) -> list[str]:
    """Settings under which ``plan`` would fit its budget, most faithful first (for a refusal)."""
    def fits(**change) -> bool:
        values = dict(optimizer=plan.optimizer, batch=plan.batch, length=plan.length, sequences=plan.sequences,
                      gradient_checkpointing=plan.gradient_checkpointing, devices=plan.devices,
                      sharded=plan.sharded, budget=plan.budget)
        values.update(change)
        return plan_training(model, trained, dtype=dtype, head=head, **values).fits

    options = []
    for name in ("adamw-sr", "adamw8bit", "adamw8bit-bnb"):
        if name != plan.optimizer and SPECS[name].available() and fits(optimizer=name):
            options.append(f"optimizer={name}")
    if not plan.gradient_checkpointing and fits(gradient_checkpointing=True):
        options.append("gradient_checkpointing=true")
    if not plan.gradient_checkpointing and fits(gradient_checkpointing=True, optimizer="adamw8bit"):
        options.append("gradient_checkpointing=true with optimizer=adamw8bit")
    for length in (plan.length // 2, plan.length // 4):
        if length >= 16 and fits(length=length):
            options.append(f"max_length={length}")
            break
    for devices in (2, 4, 8):
        if devices > plan.devices and fits(devices=devices, sharded=True):
            options.append(f"{devices} GPUs under accelerate launch --config_file configs/accelerate/fsdp.yaml "
                           f"--num_processes {devices}")
            break
    return options


def check_plan(plan: TrainingPlan, model: nn.Module, trained, what: str, dtype=None, head: bool = True) -> None:
    """Refuse (ObliviateError) a plan that does not fit, naming the settings that would."""
    if plan.fits:
        return
    options = plan_options(plan, model, trained, dtype, head)
    hint = ("; it would fit with: " + "; or ".join(options)) if options else "; nothing tried fits (fewer trained parameters, a smaller model)"
    raise ObliviateError(f"{what} does not fit: {plan.describe()}{hint} (set with --set NAME=VALUE).")

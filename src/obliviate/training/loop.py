"""The one forget/retain training loop that every trained method uses.

A method supplies the parameters to train and a ``step_loss(forget, retain) -> (loss,
parts)`` closure; this module does the rest: batches of forget text (concept sentences)
and retain text (neutral sentences), AdamW, gradient accumulation, progress with an ETA,
checkpoints every few steps so an interrupted run resumes where it stopped, and seeding
so the same seed gives the same weights. Device placement goes through ``accelerate``
(batches are put where the model's input embedding lives, so CPU, one GPU and a model
spread with ``device_map="auto"`` run the same code).

Also here, because every trained method needs them: reading a layer's activations on a
batch, and running the frozen original model by swapping the trained tensors back for a
moment. Finding layers and parameters is models/layers.py's job.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, get_args

import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.progress import progress_bar, write_line
from obliviate.io import atomic_path
from obliviate.models.layers import block_outputs, model_device
from obliviate.training import sharding
from obliviate.training.optim import check_choice, make_optimizer, resolve_optimizer, training_precision, weights_dtype
from obliviate.training import memory_plan as memory


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ObliviateError(f"{name} must be > 0, got {value}.")


def checkpointing_choice(value) -> str:
    """auto | on | off (booleans accepted: True = on, False = off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    value = str(value).lower()
    if value in ("true", "yes", "1"):
        return "on"
    if value in ("false", "no", "0"):
        return "off"
    if value not in ("auto", "on", "off"):
        raise ObliviateError(f"gradient_checkpointing must be auto, on or off, got {value!r}.")
    return value


# What the forget side trains on: the concept sentences, or also each one with its key words
# respelled (methods/forget_text.py), so the concept is lost beyond its usual tokens.
ForgetText = Literal["plain", "respelled"]


@dataclass(frozen=True)
class LoopConfig:
    """The training-loop fields every trained method's Config shares (each method's
    Config subclasses this and sets its own reference defaults)."""

    lr: tuple[float, ...] = (1e-4,)  # a grid axis: each value is a candidate
    steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_length: int = 64
    checkpoint_every: int = 25
    # training/optim.py: auto | adamw | adamw-fp32 | adamw-sr | adamw8bit | adamw8bit-bnb.
    # auto: adamw for fp32 weights (unchanged), for bf16 the most faithful one the memory plan fits.
    optimizer: str = "auto"
    gradient_checkpointing: str = "auto"  # auto (on when the plan needs it) | on | off
    # Forward passes in bfloat16 over float32 weights (torch.autocast); not in the references,
    # which train in bf16 weights on GPUs. Off: every product in the weights' own dtype.
    bf16_autocast: bool = False
    # Not in the references (plain): respelled adds the respelled concept sentences
    # (docs/results/erasure-that-holds.md measures it against the respell attack).
    forget_text: ForgetText = "plain"

    def __post_init__(self) -> None:
        check_choice(self.optimizer)
        if self.forget_text not in get_args(ForgetText):
            raise ObliviateError(f"forget_text must be one of {', '.join(get_args(ForgetText))}, "
                                 f"got {self.forget_text!r}.")
        object.__setattr__(self, "gradient_checkpointing", checkpointing_choice(self.gradient_checkpointing))
        for lr in self.lr:
            check_positive("lr", lr)
        for name in ("steps", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ObliviateError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def settings(self, lr: float, seed: int) -> "TrainSettings":
        return TrainSettings(self, lr, seed)


@dataclass(frozen=True)
class TrainSettings:
    """One candidate's training run: its method's loop settings with one lr of the grid."""

    loop: LoopConfig
    lr: float
    seed: int = 42


@dataclass
class Batch:
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


# A method's loss for one optimizer step on a forget and a retain batch: (loss, named parts to log).
StepLoss = Callable[[Batch, Batch], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class TrainingJob:
    """What one run of the forget/retain loop trains: ``params`` of ``model`` under
    ``step_loss``, on batches of ``forget`` and ``retain`` texts, with ``settings``."""

    model: nn.Module
    tokenizer: object
    params: dict[str, nn.Parameter]
    step_loss: StepLoss
    forget: list[str]
    retain: list[str]
    settings: TrainSettings


@dataclass
class TrainLog:
    losses: list[dict] = field(default_factory=list)  # one {name: value} per optimizer step
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    cached: bool = False
    optimizer: str = ""  # the resolved choice (training/optim.py)
    memory_plan: str = ""  # what the plan said before training

    def as_dict(self) -> dict:
        first, last = (self.losses[0], self.losses[-1]) if self.losses else ({}, {})
        return {"steps": self.steps, "seconds": round(self.seconds, 2),
                "seconds_per_step": round(self.seconds / max(1, self.steps - self.resumed_from), 3),
                "resumed_from": self.resumed_from, "cached": self.cached, "first_loss": first, "last_loss": last,
                "losses": self.losses, "optimizer": self.optimizer, "memory_plan": self.memory_plan}


def content_mask(batch: Batch, special_ids: set[int]) -> torch.Tensor:
    """The attention mask with special tokens (BOS, EOS) zeroed. A BOS activation is the
    same for every text and, in Gemma-style models, 10x the norm of any other (an
    attention sink): a loss over it would pull forget and retain terms against each other."""
    special = torch.tensor(sorted(special_ids), device=batch.input_ids.device)
    return batch.attention_mask * ~torch.isin(batch.input_ids, special)


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> Batch:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return Batch(texts, encoded["input_ids"].to(device), encoded["attention_mask"].to(device))


class TextStream:
    """Endless seeded shuffled batches of texts (each pass over the texts reshuffled)."""

    def __init__(self, texts: list[str], batch_size: int, seed: int):
        if not texts:
            raise ObliviateError("Training needs at least one text on each side (forget and retain).")
        self.texts, self.batch_size = list(texts), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[str]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.texts), generator=self.generator).tolist()
            out.append(self.texts[self.order.pop()])
        return out

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            self.next()


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The parameters' values on the CPU (whole, also when FSDP shards them)."""
    return {name: sharding.full(p).to("cpu", copy=True) for name, p in params.items()}


@contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]):
    """Hold ``values`` in ``params`` for a block (the frozen original model, without a copy).
    The parameters are looked up in the dict when the block starts, so a dict that training
    re-pointed at sharded parameters is followed."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    for name, p in params.items():
        sharding.assign(p, values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.detach().copy_(saved[name])


@contextmanager
def restored(params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor]):
    """Train inside the block; afterwards the parameters hold ``originals`` again."""
    try:
        yield
    finally:
        for name, p in params.items():
            sharding.assign(p, originals[name])


def layer_activations(model: nn.Module, layer: int, batch: Batch) -> torch.Tensor:
    """The output hidden states (B, T, D) of decoder block ``layer`` (0-based); the forward
    pass stops there."""
    return block_outputs(model, [layer], input_ids=batch.input_ids, attention_mask=batch.attention_mask)[layer]


def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


@contextmanager
def trainable(model: nn.Module, params: dict[str, nn.Parameter]):
    """Only ``params`` require gradients (and the model is in train mode) inside the block."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        model.train(was_training)


def _accelerator(device: torch.device):
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


def plan_stage(model: nn.Module, trained: list[nn.Parameter], optimizer: str, checkpointing: str, batch: int,
               length: int, sequences: int, what: str, head: bool = True):
    """Resolve ``optimizer`` and ``checkpointing`` ("auto") with the memory plan
    (training/memory_plan.py) and refuse, naming the settings that would fit, when nothing does.
    Returns (optimizer, gradient checkpointing on, plan)."""

    budget = memory.device_budget(model)
    _, processes = sharding.world()
    dtype = weights_dtype(trained)

    def plan(name: str, on: bool):
        return memory.plan_training(model, trained, name, batch, length, sequences, on, processes, processes > 1,
                                    budget, head=head)

    ons = {"on": (True,), "off": (False,), "auto": (False, True)}[checkpointing]
    fits = lambda name: any(plan(name, on).fits for on in ons)  # noqa: E731
    name = resolve_optimizer(optimizer, dtype, fits)
    on = next((on for on in ons if plan(name, on).fits), ons[-1])
    chosen = plan(name, on)
    memory.check_plan(chosen, model, trained, what, head=head)
    return name, on, chosen


@contextmanager
def checkpointing(model: nn.Module, on: bool):
    """Gradient checkpointing (transformers' own) inside the block when ``on``. transformers
    5.2x calls it activation checkpointing; older releases, gradient checkpointing."""
    new = hasattr(type(model), "activation_checkpointing_enable")
    prefix = "activation_checkpointing" if new else "gradient_checkpointing"
    supported = getattr(model, "supports_gradient_checkpointing", False) or getattr(model, "supports_activation_checkpointing", False)
    if not on or not supported:
        yield
        return
    was = getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False)
    getattr(model, f"{prefix}_enable")(**{f"{prefix}_kwargs": {"use_reentrant": False}})
    try:
        yield
    finally:
        if not was:
            getattr(model, f"{prefix}_disable")()


def train(job: TrainingJob, checkpoint: Path | None = None, progress: bool = True, desc: str = "training") -> TrainLog:
    """Minimise the job's ``step_loss`` over ``settings.loop.steps`` optimizer steps of its
    ``params``.

    Each optimizer step accumulates ``grad_accum`` micro-batches of ``batch_size`` forget
    and retain texts. With ``checkpoint`` (a folder), the trained tensors, optimizer state
    and step are saved every ``checkpoint_every`` steps and picked up on the next call.
    """
    model, tokenizer, params, step_loss, settings = job.model, job.tokenizer, job.params, job.step_loss, job.settings
    forget, retain = job.forget, job.retain
    loop = settings.loop
    device = model_device(model)
    torch.manual_seed(settings.seed)
    forget_stream = TextStream(forget, loop.batch_size, settings.seed)
    retain_stream = TextStream(retain, loop.batch_size, settings.seed + 1)
    name, on, plan = plan_stage(model, list(params.values()), loop.optimizer, loop.gradient_checkpointing,
                                loop.batch_size, loop.max_length, 2, desc)
    log = TrainLog(optimizer=name, memory_plan=plan.describe())
    if progress:
        write_line(f"{desc}: {log.memory_plan}")
    rank, processes = sharding.world()
    if processes > 1:  # FSDP2 over the process group (training/sharding.py)
        sharding.shard(model, params)
        checkpoint = None  # mid-training state is per shard: a candidate restarts rather than resumes
    mine = sharding.my_micro_batches(loop.grad_accum)
    share = len(mine) / loop.grad_accum * processes  # each process's part of the step's mean
    accelerator = _accelerator(device)
    with training_precision(name, params.values(), loop.bf16_autocast) as autocast, checkpointing(model, on):
        optimizer = make_optimizer(name, params.values(), settings.lr, loop.weight_decay)
        if processes == 1:
            optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
        start_step = _resume(checkpoint, params, optimizer, log)
        forget_stream.skip(start_step * loop.grad_accum)
        retain_stream.skip(start_step * loop.grad_accum)
        clock = time.perf_counter()
        bar = progress_bar(total=loop.steps, initial=start_step, desc=desc, unit="step",
                           disable=not (progress and rank == 0))
        with trainable(model, params):
            for step in range(start_step, loop.steps):
                parts_sum: dict[str, float] = {}
                for micro in range(loop.grad_accum):
                    forget_texts, retain_texts = forget_stream.next(), retain_stream.next()
                    if micro not in mine:
                        continue  # another process's micro-batch
                    f = tokenize(tokenizer, forget_texts, loop.max_length, device)
                    r = tokenize(tokenizer, retain_texts, loop.max_length, device)
                    with autocast():
                        loss, parts = step_loss(f, r)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate.")
                    (loss / loop.grad_accum * (processes / share if processes > 1 else 1)).backward()
                    for key, value in {"loss": loss, **parts}.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + float(torch.as_tensor(value).detach()) / loop.grad_accum
                parts_sum = _mean_over_processes(parts_sum, share)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.losses.append({k: round(v, 6) for k, v in parts_sum.items()})
                bar.update(1)
                bar.set_postfix(loss=f"{parts_sum['loss']:.4g}")
                if checkpoint is not None and (step + 1) % loop.checkpoint_every == 0 and step + 1 < loop.steps:
                    _save(checkpoint, params, optimizer, step + 1, log)
        bar.close()
    log.steps = loop.steps
    log.seconds = time.perf_counter() - clock
    return log


def _mean_over_processes(parts: dict[str, float], share: float) -> dict[str, float]:
    """The step's loss parts averaged over every micro-batch of every process."""
    _, processes = sharding.world()
    if processes == 1:
        return parts
    import torch.distributed as dist

    keys = sorted(parts)
    values = torch.tensor([parts[k] / share for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) for k, v in zip(keys, values)}


def _save(folder: Path, params, optimizer, step: int, log: TrainLog) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": {n: p.detach().cpu() for n, p in params.items()},
             "optimizer": optimizer.state_dict(), "losses": log.losses}
    with atomic_path(folder / "train_state.pt") as tmp:
        torch.save(state, tmp)


def _resume(folder: Path | None, params, optimizer, log: TrainLog) -> int:
    path = folder / "train_state.pt" if folder is not None else None
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    log.losses = list(state["losses"])
    log.resumed_from = int(state["step"])
    return log.resumed_from


def finished(folder: Path | None, log: TrainLog) -> None:
    """Record a finished candidate's log and drop its mid-training state."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_state.pt").unlink(missing_ok=True)
    with atomic_path(folder / "log.json") as tmp:
        Path(tmp).write_text(json.dumps(log.as_dict()), encoding="utf-8")


def cached_log(folder: Path | None) -> TrainLog | None:
    if folder is None or not (folder / "log.json").is_file():
        return None
    payload = json.loads((folder / "log.json").read_text(encoding="utf-8"))
    return TrainLog(losses=payload["losses"], steps=payload["steps"], seconds=payload["seconds"],
                    resumed_from=payload["resumed_from"], cached=True, optimizer=payload.get("optimizer", ""),
                    memory_plan=payload.get("memory_plan", ""))  # what it was trained with, as when it was

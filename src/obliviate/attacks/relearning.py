"""Relearning attack (METHOD.md section 4): fine-tune on the concept's own text and see
how much of the erased knowledge comes back.

Reference protocol: full-parameter fine-tuning on the first 100 relearning paragraphs,
2 epochs, AdamW lr 1e-5, weight decay 0.01, batch 1, max length 256 with padding masked
from the loss, paragraphs shuffled each epoch; test QA accuracy after each epoch. The same
attack on the original model is the reference line.

No second copy of the model: the caller has scored the model before the attack (its
answers are kept), the attack fine-tunes the model's own weights in place, and the
original weights come back from a copy in host memory when it ends (also on an error), so
the caller's model leaves as it came. The optimizer (``optimizer``, training/optim.py) and
gradient checkpointing are chosen by the memory plan (training/memory_plan.py), printed before
training; a plan that cannot fit is refused with the settings that would. Two exact
shortcuts keep the step cheap on a CPU: an untied input embedding's rows are updated
lazily (training/sparse_rows.py) and the output layer's gradient goes into a buffer kept
across steps (training/kept_head_grad.py); the weights are the plain loop's.

Resumable per epoch: after each finished epoch (but the last) the weights and AdamW state
go to ``checkpoints/relearn/<role>/epoch-N`` (written as ``.partial`` and renamed); the
shuffle of epoch e depends only on (seed, e), so a resumed run gives the same numbers as
an uninterrupted one.
"""
from __future__ import annotations

import gc
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.progress import progress_bar, write_line
from obliviate.io import fingerprint as run_fingerprint, read_json, write_json
from obliviate.models.loading import LoadedModel
from obliviate.training import sharding
from obliviate.training.kept_head_grad import kept_head_gradient
from obliviate.training.loop import checkpointing, checkpointing_choice, plan_stage, trainable
from obliviate.training.optim import check_choice, training_precision
from obliviate.training.sparse_rows import optimizer_for, settle
from obliviate.attacks.common import (TEXT_SOURCES, AttackContext, accuracy_interval, attack_text, cached_for_original,
                                      correct_on, prepared_test, recovered_fraction)

NAME = "relearn"


@dataclass(frozen=True)
class Config:
    paragraphs: int = 100  # the reference attack uses the first 100
    epochs: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 1
    max_length: int = 256  # tokens per paragraph, longer ones are truncated
    # auto (on when the memory plan needs it) | on | off; booleans accepted (True = on)
    gradient_checkpointing: str = "auto"
    # auto | adamw | adamw-fp32 | adamw-sr | adamw8bit | adamw8bit-bnb (training/optim.py);
    # auto: adamw for fp32 weights (unchanged), for bf16 the most faithful one that fits.
    optimizer: str = "auto"
    # Forward passes in bfloat16 over float32 weights; not the reference attack's arithmetic,
    # and on the CPU no faster than the exact default step (the kept head gradient does not
    # apply under autocast: bench/bench_attacks.py --steps). For GPUs with fast bf16.
    bf16_autocast: bool = False
    # What the attacker trains on (common.attack_text): concept (the reference attack),
    # unrelated (other concepts' text) or retain (the neutral sentences).
    text: str = "concept"

    def __post_init__(self) -> None:
        check_choice(self.optimizer)
        if self.text not in TEXT_SOURCES:
            raise ObliviateError(f"relearn text must be one of {', '.join(TEXT_SOURCES)}, got {self.text!r}.")
        object.__setattr__(self, "gradient_checkpointing", checkpointing_choice(self.gradient_checkpointing))
        for name in ("paragraphs", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"relearn {name} must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ObliviateError(f"relearn lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}.")


def _batches(encoded: list[list[int]], order: list[int], size: int, pad_id: int):
    """Right-padded batches; labels are -100 on padding so it never enters the loss."""
    for start in range(0, len(order), size):
        rows = [encoded[i] for i in order[start:start + size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, seq in enumerate(rows):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of one epoch, a function of (seed, epoch) only (so resume is exact)."""
    generator = torch.Generator().manual_seed(seed * 1009 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _latest_checkpoint(folder: Path | None, fingerprint: str) -> tuple[Path | None, dict]:
    if folder is None or not (folder / "state.json").exists():
        return None, {"fingerprint": fingerprint, "epochs": []}
    state = read_json(folder / "state.json")
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(folder)  # another attack's settings: start over rather than mix
        return None, {"fingerprint": fingerprint, "epochs": []}
    weights = folder / f"epoch-{len(state['epochs'])}"
    return (weights if weights.is_dir() else None), state


def _save_weights(folder: Path, epoch: int, model: torch.nn.Module, optimizer) -> None:
    from safetensors.torch import save_model

    final, staging = folder / f"epoch-{epoch}", folder / f"epoch-{epoch}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    shutil.rmtree(final, ignore_errors=True)  # a run killed after this rename but before its state.json
    staging.rename(final)


def relearn(
    lm: LoadedModel,
    paragraphs: list[str],
    config: Config,
    evaluate: Callable[[LoadedModel], np.ndarray],
    seed: int = 42,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    role: str = "model",
) -> list[dict]:
    """Fine-tune ``lm``'s own weights on ``paragraphs``; ``evaluate`` after every epoch; the
    original weights are back in ``lm`` when this returns.

    Returns one record per epoch: {epoch, correct (per question), loss, seconds}.
    """
    if sharding.world()[1] > 1:
        checkpoint_dir = None  # per-epoch resume is single-process only (the state is per shard)
    fingerprint = run_fingerprint([asdict(config), paragraphs, seed, role])
    weights, state = _latest_checkpoint(checkpoint_dir, fingerprint)
    if len(state["epochs"]) >= config.epochs:
        return state["epochs"]
    model = lm.model
    params = dict(model.named_parameters())
    name, on, plan = plan_stage(model, list(params.values()), config.optimizer, config.gradient_checkpointing,
                                config.batch_size, config.max_length, 1, f"relearn ({role})")
    if progress:
        write_line(f"relearn ({role}): {plan.describe()}")
    originals = {n: sharding.full(p).to("cpu", copy=True) for n, p in params.items()}  # host memory, not the GPU
    if sharding.world()[1] > 1:  # FSDP2 over the processes; each runs every batch (the protocol's batch 1)
        sharding.shard(model, params)
    encoded = tokenized(lm, paragraphs, config.max_length)
    start = len(state["epochs"])
    bar = progress_bar(total=config.epochs * len(encoded), initial=start * len(encoded), desc=f"relearn ({role})",
                       unit="paragraph", disable=not progress)
    try:
        with trainable(model, params), training_precision(name, params.values(), config.bf16_autocast) as autocast, \
                checkpointing(model, on), kept_head_gradient(model), \
                optimizer_for(name, model, params.values(), config.lr, config.weight_decay) as optimizer:
            if weights is not None:
                from safetensors.torch import load_model

                load_model(model, str(weights / "model.safetensors"))
                optimizer.load_state_dict(torch.load(weights / "optimizer.pt", weights_only=False))
            elif state["epochs"]:  # state without its weights: cannot resume, start over
                state["epochs"] = []
            for epoch in range(start, config.epochs):
                clock = time.perf_counter()
                torch.manual_seed(seed * 1009 + epoch)  # dropout and stochastic rounding
                model.train()
                losses = []
                for ids, mask, labels in _batches(encoded, epoch_order(len(encoded), seed, epoch), config.batch_size,
                                                  lm.tokenizer.pad_token_id):
                    device = lm.device
                    with autocast():
                        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    bar.update(len(ids))
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
                model.eval()
                settle(optimizer)  # rows without a gradient so far get their weight decay now
                train_seconds = time.perf_counter() - clock
                with (nullcontext() if config.bf16_autocast else autocast()):  # score as the model was scored before
                    correct = np.asarray(evaluate(lm), dtype=float)
                state["epochs"].append({"epoch": epoch + 1, "correct": correct.tolist(), "loss": float(np.mean(losses)),
                                        "train_seconds": train_seconds, "seconds": time.perf_counter() - clock,
                                        "optimizer": name, "gradient_checkpointing": on})
                if checkpoint_dir is not None:
                    if epoch + 1 < config.epochs:
                        _save_weights(checkpoint_dir, epoch + 1, model, optimizer)
                    write_json(checkpoint_dir / "state.json", state)
                    shutil.rmtree(checkpoint_dir / f"epoch-{epoch}", ignore_errors=True)
            if checkpoint_dir is not None:  # finished: the weights are no longer needed
                for old in checkpoint_dir.glob("epoch-*"):
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        bar.close()
        for n, p in params.items():
            sharding.assign(p, originals[n])
        model.eval()
        optimizer = None
        del originals
        gc.collect()
    return state["epochs"]


def run(ctx: AttackContext, config: Config, name: str = NAME) -> dict:
    """Relearn on both models; accuracy before and after each epoch, and how much of the
    original model's knowledge the erased model gets back (``recovered_frac``)."""
    paragraphs, source = attack_text(ctx, config.text, config.paragraphs)
    out = {"settings": {**asdict(config), "paragraphs_used": len(paragraphs), "text_source": source,
                        "trained": "all parameters"}}
    curves = {}
    for role, lm in ctx.models.items():
        clock = time.perf_counter()
        prepared = prepared_test(ctx, lm)

        def attack(lm=lm, prepared=prepared, role=role) -> tuple:
            before = correct_on(lm, prepared, ctx.batching)
            return before, relearn(lm, paragraphs, config, lambda m: correct_on(m, prepared, ctx.batching), ctx.seed,
                                   ctx.checkpoint_dir(name, role), ctx.progress, role=role)

        before, epochs = _original_curve(ctx, lm, prepared, paragraphs, config, attack) if role == "original" else attack()
        curves[role] = [before] + [np.asarray(e["correct"]) for e in epochs]  # epoch 0 = before
        out[role] = {
            "before": accuracy_interval(curves[role][0], ctx.bootstrap, ctx.seed),
            "after": accuracy_interval(curves[role][-1], ctx.bootstrap, ctx.seed),
            "curve": [accuracy_interval(c, ctx.bootstrap, ctx.seed) for c in curves[role]],
            "curve_correct": [c.tolist() for c in curves[role]],  # per question, for pooled statistics
            "losses": [e["loss"] for e in epochs],
            "train_seconds": [e["train_seconds"] for e in epochs],
            "optimizer": epochs[-1].get("optimizer", "adamw") if epochs else None,
            "seconds": time.perf_counter() - clock,
        }
    if "original" in curves and "erased" in curves:
        out["recovered_frac"] = recovered_fraction(curves["original"][0], curves["erased"][-1], ctx.bootstrap, ctx.seed,
                                                   ctx.chance)
    return out


def _original_curve(ctx: AttackContext, lm: LoadedModel, prepared, paragraphs: list[str], config: Config,
                    attack: Callable[[], tuple]) -> tuple:
    """The ORIGINAL model's (before, epochs), from the results cache when it ran before."""
    settings = {"paragraphs": tokenized(lm, paragraphs, config.max_length), "config": asdict(config)}

    def run_and_keep() -> list:
        before, epochs = attack()
        return [np.asarray(before).tolist(), epochs]

    before, epochs = cached_for_original(ctx, lm, prepared, "relearn_curve", settings, run_and_keep)
    return np.asarray(before), epochs


def tokenized(lm: LoadedModel, paragraphs: list[str], max_length: int) -> list[list[int]]:
    return [lm.tokenizer(p, truncation=True, max_length=max_length).input_ids for p in paragraphs]


@dataclass(frozen=True)
class StrongConfig(Config):
    """``relearn-strong``: on the embedded model the reference lr 1e-5 lowers even the
    ORIGINAL model's accuracy, so it says little about what an erasure hides; ten times
    the learning rate and one more epoch is an attacker that actually relearns."""
    epochs: int = 3
    lr: float = 1e-4


@dataclass(frozen=True)
class UnrelatedConfig(Config):
    """``finetune-unrelated``: the same training on text that never names the concept
    (Łucki et al. 2024: a few unrelated examples bring back much of RMU's erased capability)."""
    text: str = "unrelated"


@dataclass(frozen=True)
class RetainConfig(Config):
    """``finetune-retain``: the same training on the retain (neutral) text only: relearning
    with zero forget examples."""
    text: str = "retain"


@dataclass(frozen=True)
class SweepConfig(Config):
    """``relearn-sweep``: the relearning attack at each learning rate, scored after every
    epoch: len(lrs) x epochs cells, the reference (1e-5, 2 epochs) among them; the worst
    cell (the most knowledge back on the erased model) is the attack's result."""
    lrs: tuple[float, ...] = (1e-5, 1e-4)
    epochs: int = 3

    def __post_init__(self) -> None:
        lrs = (self.lrs,) if isinstance(self.lrs, (int, float)) else tuple(float(lr) for lr in self.lrs)
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ObliviateError(f"relearn-sweep lrs must be positive, got {self.lrs}.")
        object.__setattr__(self, "lrs", lrs)
        super().__post_init__()

    def cells(self) -> list[Config]:
        base = {f.name: getattr(self, f.name) for f in fields(Config)}
        return [Config(**{**base, "lr": lr}) for lr in self.lrs]


def run_sweep(ctx: AttackContext, config: SweepConfig) -> dict:
    """One relearning run a learning rate; every (lr, epoch) cell's recovered fraction; the worst."""
    runs = {lr: run(ctx, cell, f"relearn-sweep/lr-{lr:g}") for lr, cell in zip(config.lrs, config.cells())}
    grid, worst = [], None
    for lr, result in runs.items():
        base = np.asarray(result["original"]["curve_correct"][0], dtype=float)
        for epoch in range(1, config.epochs + 1):
            erased = np.asarray(result["erased"]["curve_correct"][epoch], dtype=float)
            recovered = recovered_fraction(base, erased, ctx.bootstrap, ctx.seed, ctx.chance)
            grid.append({"lr": lr, "epoch": epoch, "recovered_frac": recovered,
                         "original": result["original"]["curve"][epoch], "erased": result["erased"]["curve"][epoch]})
            if worst is None or recovered["value"] > worst["recovered_frac"]["value"]:
                worst = grid[-1]
    out = {"settings": asdict(config), "grid": grid, "worst_cell": {"lr": worst["lr"], "epoch": worst["epoch"]},
           "recovered_frac": worst["recovered_frac"]}
    for role in ("original", "erased"):
        curve = runs[worst["lr"]][role]["curve_correct"]
        out[role] = {"before": runs[worst["lr"]][role]["before"], "after": worst[role],
                     "correct_before": curve[0], "correct_after": curve[worst["epoch"]]}
    return out


ATTACKS = {  # the same training, each with its own checkpoint folder
    "relearn-strong": SimpleNamespace(Config=StrongConfig, run=partial(run, name="relearn-strong")),
    "finetune-unrelated": SimpleNamespace(Config=UnrelatedConfig, run=partial(run, name="finetune-unrelated")),
    "finetune-retain": SimpleNamespace(Config=RetainConfig, run=partial(run, name="finetune-retain")),
    "relearn-sweep": SimpleNamespace(Config=SweepConfig, run=run_sweep),
}

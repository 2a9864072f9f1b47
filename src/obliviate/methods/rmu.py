"""RMU, representation misdirection for unlearning (WMDP, Li et al., arXiv 2403.03218).

Layer-L activations on concept text are pushed towards a fixed random direction c*u; an
alpha-weighted MSE keeps layer-L activations on neutral text where the frozen model has
them. Only the MLP down-projections of layers L-2..L train. The frozen model is the same
model with the trained tensors swapped back for a moment (no second copy in memory), so
with ``--ember`` the frozen reference carries the EMBER edit too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.training import losses
from obliviate.data.concepts import ConceptData
from obliviate.errors import ObliviateError
from obliviate.io import fingerprint
from obliviate.models.loading import LoadedModel
from obliviate.training.loop import (LoopConfig, StepLoss, TrainingJob, content_mask, layer_activations, snapshot,
                                     swapped, tokenize)
from obliviate.training.grid import TrainedGrid, grid_points, model_fingerprint, train_delta
from obliviate.models.layers import MLP_DOWN_WEIGHTS, decoder_layers, model_device, resolve_layer, select_parameters
from obliviate.methods import MethodContext
from obliviate.methods.forget_text import forget_sentences

FITS_BEFORE_PLUG_IN = False  # fitted on the model with EMBER's edit applied (methods/__init__.py)


STEERING_UNITS = ("norm", "absolute")
NORM_SAMPLE = 32  # concept sentences the activation norm is measured on


@dataclass(frozen=True)
class Config(LoopConfig):
    # Grid axes (a tuple is a grid, its first value tried first). EMBER's Gemma-2-2B grid
    # is lr {1e-5,1e-4,3e-4} x alpha {10,30,50,100} x c {30,100,300,1000} x L {7,8,6}
    # (configs/methods/rmu-gemma-2-2b-it.yaml); the CPU default keeps 2 points.
    # WMDP Zephyr recipe 5e-5; EMBER grid {1e-5, 1e-4, 3e-4}. The CPU default trains 30
    # steps, not 150, so it needs the larger rates: on Gemma 3 270M (Gambling, train
    # questions) 1e-4 left QA where it was, 3e-4 and 1e-3 lowered it 0.48 -> 0.44 / 0.30.
    lr: tuple[float, ...] = (3e-4, 1e-3)
    alpha: tuple[float, ...] = (100.0,)  # retain weight; WMDP Zephyr 1200, EMBER grid {10..100}
    # c; WMDP Zephyr 6.5, EMBER grid {30..1000}. With steering_unit "norm" each value is a
    # multiple of the frozen model's mean layer-L activation norm on concept tokens
    # (Adaptive RMU, Dang et al., arXiv 2408.06223), so one default fits models whose
    # residual streams differ 100x in scale; "absolute" takes c as it is (the papers' grids).
    steering: tuple[float, ...] = (1.0,)
    steering_unit: str = "norm"
    # Layer L as absolute indices (a grid); empty: round(layer_fraction * depth).
    layer: tuple[int, ...] = ()
    layer_fraction: float = 7 / 26  # EMBER's L=7 of Gemma-2-2B's 26 layers -> 5 of Gemma 3 270M's 18
    trained_below: int = 2  # train layers L-2..L (WMDP reference)
    param_pattern: str = MLP_DOWN_WEIGHTS  # WMDP reference: MLP down-projections
    steps: int = 30  # WMDP reference 150 batches; CPU-scale default (about 1 s a step on Gemma 3 270M, bench/bench_methods.py)
    batch_size: int = 4  # WMDP reference
    max_length: int = 64  # concept sentences are 20-40 tokens (reference truncates at 512)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "steering"):
            for value in getattr(self, name):
                if value < 0:
                    raise ObliviateError(f"{name} must be >= 0, got {value}.")
        if self.steering_unit not in STEERING_UNITS:
            raise ObliviateError(f"steering_unit must be one of {', '.join(STEERING_UNITS)}, got {self.steering_unit!r}.")
        if not 0 <= self.layer_fraction < 1:
            raise ObliviateError(f"layer_fraction must be in [0, 1), got {self.layer_fraction}.")
        if self.trained_below < 0:
            raise ObliviateError(f"trained_below must be >= 0, got {self.trained_below}.")


def fit(lm: LoadedModel, data: ConceptData, config: Config,
        seed: int = 42, context: MethodContext | None = None) -> TrainedGrid:
    context = context or MethodContext()
    forget = forget_sentences(lm.tokenizer, data, config.forget_text, seed)
    depth = len(decoder_layers(lm.model)[1])
    layers = config.layer or (resolve_layer(None, config.layer_fraction, depth),)
    for layer in layers:
        resolve_layer(layer, 0, depth)
    points = grid_points(layer=layers, lr=config.lr, alpha=config.alpha, steering=config.steering)
    progress = context.progress
    folder = context.checkpoint_dir
    special = set(lm.tokenizer.all_special_ids)
    norms: dict[int, float] = {}

    def steering_coefficient(point: dict) -> float:
        if config.steering_unit == "absolute":
            return point["steering"]
        layer = point["layer"]
        if layer not in norms:
            norms[layer] = mean_activation_norm(lm, layer, data.concept_sentences[:NORM_SAMPLE], config.max_length, special)
        return point["steering"] * norms[layer]

    def run_point(point: dict):
        layer = point["layer"]
        trained = list(range(max(0, layer - config.trained_below), layer + 1))
        params = select_parameters(lm.model, config.param_pattern, trained)
        generator = torch.Generator().manual_seed(seed)
        hidden = lm.model.get_input_embeddings().weight.shape[1]
        control = losses.rmu_control_vector(hidden, steering_coefficient(point), generator).to(lm.device)
        step_loss = make_step_loss(lm.model, params, layer, control, point["alpha"], special)

        settings = config.settings(point["lr"], seed)
        key = fingerprint(["rmu", point, config.__dict__, seed, model_fingerprint(lm.model)])
        where = folder / "rmu" / key if folder is not None else None
        job = TrainingJob(lm.model, lm.tokenizer, params, step_loss, forget, data.neutral_sentences, settings)
        return train_delta(job, where, progress, f"rmu {point}", {"method": "rmu", **point})

    return TrainedGrid("rmu", points, run_point, info={
        "depth": depth, "trained_layers_below": config.trained_below, "steering_unit": config.steering_unit,
        "activation_norm": norms})


def make_step_loss(model, params: dict, layer: int, control: torch.Tensor, alpha: float,
                   special: set[int]) -> StepLoss:
    """One training step's loss: layer ``layer``'s activations on forget content tokens pushed
    to ``control``, and on retain ones held where the model had them when this was made
    (``params`` swapped back to a snapshot), weighted by ``alpha``."""
    originals = snapshot(params)

    def step_loss(forget, retain):
        with torch.no_grad(), swapped(params, originals):
            frozen = layer_activations(model, layer, retain)
        forget_term = losses.rmu_forget_loss(layer_activations(model, layer, forget), control,
                                             content_mask(forget, special))
        retain_term = losses.rmu_retain_loss(layer_activations(model, layer, retain), frozen,
                                             content_mask(retain, special), alpha)
        return forget_term + retain_term, {"forget": forget_term.detach(), "retain": retain_term.detach()}

    return step_loss


def mean_activation_norm(lm: LoadedModel, layer: int, texts: list[str], max_length: int, special: set[int]) -> float:
    """Mean L2 norm of layer ``layer``'s output over the content tokens of ``texts``."""
    batch = tokenize(lm.tokenizer, texts, max_length, model_device(lm.model))
    with torch.no_grad():
        norms = layer_activations(lm.model, layer, batch).float().norm(dim=-1)
    mask = content_mask(batch, special).bool()
    if not mask.any():
        raise ObliviateError("The concept sentences have no content tokens to measure the activation norm on.")
    return float(norms[mask].mean())

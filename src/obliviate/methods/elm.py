"""ELM, Erasure of Language Memory (Gandikota et al., arXiv 2410.02760), with LoRA via peft.

Three losses, each weight 1 in the reference:
  erase: on concept text, the adapted model's next-token distribution matches
      log P'(x) = log P(x) + eta * (log P(x | novice prefix) - log P(x | expert prefix)),
      computed with the adapter off; eta ramps 1 -> 1000 over positions, the original
      model's top-50 tokens kept, temperature 1.2, soft cross-entropy (losses.py);
  retain: on neutral text, cross-entropy to the original model's argmax tokens;
  consistency: on a concept prompt followed by a change-of-topic phrase, cross-entropy
      to the text the original model writes under erase guidance (gamma 3), generated
      once per run and cached beside the checkpoints.
The trained adapter is saved as a normal peft adapter folder (``PeftModel.from_pretrained``
loads it); the edit merges it into the base weights.

The erase target can teach ignorance only where the model, told it is a novice, knows
less than when told it is an expert. Before training, ``fit`` measures that on the
concept's TRAIN questions (``persona_accuracy``) and says so where the difference is not
shown: on the embedded base model it is +0.007 [-0.015, +0.033] pooled over four concepts,
and ELM there moves accuracy only with damage (README, "ELM on the CPU").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from obliviate.training import losses
from obliviate.data.concepts import ConceptData, MCQuestion
from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import Interval, bootstrap
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare
from obliviate.io import fingerprint, read_json, write_json
from obliviate.models.loading import LoadedModel
from obliviate.training.loop import (
    LoopConfig, StepLoss, TextStream, TrainingJob, cached_log, check_positive, finished, tokenize, train,
)
from obliviate.training.grid import TrainedGrid, grid_points, model_fingerprint
from obliviate.models.layers import PROJECTIONS, cache_argument, decoder_layers, model_device, resolve_layer
from obliviate.edits.weights import LoraAdapter, base_weights
from obliviate.settings import setting
from obliviate.methods import MethodContext
from obliviate.methods.forget_text import forget_sentences

FITS_BEFORE_PLUG_IN = False  # fitted on the model with EMBER's edit applied (methods/__init__.py)

EXPERT = (  # "expert" / "novice" prefixes, ten templates each (reference style)
    "As an expert in {c}:", "Written by a leading authority on {c}:", "From an encyclopedia entry on {c}:",
    "A specialist in {c} explains:", "Here is what a {c} scholar knows:", "Speaking as someone who knows {c} well:",
    "An expert on {c} writes:", "From a textbook about {c}:", "A historian of {c} notes:", "In-depth facts about {c}:",
)
NOVICE = (
    "As a novice in {c}:", "Written by someone who knows nothing about {c}:", "From a person unfamiliar with {c}:",
    "Someone who has never heard of {c} says:", "A beginner with no knowledge of {c} writes:",
    "Speaking as someone who knows nothing of {c}:", "A newcomer confused about {c} writes:",
    "From a person who never learned about {c}:", "Someone ignorant of {c} guesses:", "With no idea what {c} is:",
)
TOPIC_CHANGE = (" Anyway, let's talk about something else.", " On a completely different subject,",
                " Changing the topic entirely,", " Let me tell you about something unrelated:")


@dataclass(frozen=True)
class Config(LoopConfig):
    lr: tuple[float, ...] = (2e-4, 1e-3)  # reference 5e-5 over ~750 steps; larger for the short CPU run
    rank: int = 256  # reference LoRA rank
    lora_alpha: float = 16.0  # reference
    lora_dropout: float = 0.05  # reference
    target_modules: tuple[str, ...] = PROJECTIONS  # attention and MLP projections (reference)
    layers: tuple[int, ...] = ()  # absolute layers; empty: the layer_from..layer_to fractions of depth
    layer_from: float = 4 / 32  # reference layers 4-7 of 32 -> 2..4 of Gemma 3 270M's 18
    layer_to: float = 7 / 32
    eta_start: float = 1.0  # eta ramp over positions (reference 1 -> 1000)
    eta_end: float = 1000.0
    temperature: float = 1.2  # reference
    top_k: int = 50  # reference
    erase_weight: float = 1.0  # reference loss scales
    retain_weight: float = 1.0
    consistency_weight: float = 1.0
    guidance_gamma: float = 3.0  # guidance when generating the consistency text (reference)
    consistency_prompts: int = 8  # CPU-scale (the reference generates hundreds)
    consistency_tokens: int = 24
    steps: int = 20  # reference ~3000 samples / (batch 1 x accumulation 4) = 750; CPU-scale default
    batch_size: int = 4
    grad_accum: int = 1  # reference 4
    guidance_templates: int = setting(2, "expert and novice prefixes (each) under which the TRAIN questions are "
                                         "scored before training, to measure whether the guidance carries a "
                                         "knowledge difference on this model (0: skip)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.guidance_templates <= len(EXPERT):
            raise ObliviateError(f"guidance_templates must be 0..{len(EXPERT)}, got {self.guidance_templates}.")
        for name in ("rank", "top_k"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"{name} must be >= 1, got {getattr(self, name)}.")
        check_positive("temperature", self.temperature)
        if not 0 <= self.layer_from <= self.layer_to < 1:
            raise ObliviateError(f"Need 0 <= layer_from <= layer_to < 1, got {self.layer_from}, {self.layer_to}.")


def check_target_modules(model, targets: tuple[str, ...], layers: list[int]) -> None:
    """Every LoRA target must name Linear modules of the chosen layers; list the model's
    Linear module names that match when one does not."""
    prefix, _ = decoder_layers(model)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.match(re.escape(prefix) + r"\.(\d+)\.", name)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ObliviateError(
            f"LoRA target module(s) {', '.join(missing)} do not exist in this model. Its decoder layers' linear "
            f"modules are: {', '.join(sorted(present))}."
        )


def _prefixed(tokenizer, batch, prefix: str):
    """The batch with ``prefix`` inserted after BOS (or prepended); returns (ids, mask, offset)."""
    ids = torch.tensor(tokenizer(prefix, add_special_tokens=False)["input_ids"], device=batch.input_ids.device)
    ids = ids[None].expand(batch.input_ids.shape[0], -1)
    ones = torch.ones_like(ids)
    has_bos = tokenizer.bos_token_id is not None and bool((batch.input_ids[:, 0] == tokenizer.bos_token_id).all())
    cut = 1 if has_bos else 0
    new_ids = torch.cat([batch.input_ids[:, :cut], ids, batch.input_ids[:, cut:]], dim=1)
    new_mask = torch.cat([batch.attention_mask[:, :cut], ones, batch.attention_mask[:, cut:]], dim=1)
    return new_ids, new_mask, ids.shape[1]


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def guided_generate(lm: LoadedModel, prompt: str, concept: str, tokens: int, gamma: float, top_k: int, seed: int) -> list[int]:
    """Greedy continuation under erase guidance: argmax over the original model's top-k of
    log P + gamma (log P(. | novice) - log P(. | expert)).

    The plain, expert and novice streams each keep their own key-value cache, so a new
    token costs three one-token passes instead of three passes over the whole text (this
    one-off generation took 339 s of ELM's set-up on the embedded model without them)."""
    rng = torch.Generator().manual_seed(seed)
    expert = EXPERT[int(torch.randint(len(EXPERT), (1,), generator=rng))].format(c=concept)
    novice = NOVICE[int(torch.randint(len(NOVICE), (1,), generator=rng))].format(c=concept)
    batch = tokenize(lm.tokenizer, [prompt], 10_000, model_device(lm.model))
    inputs = [batch.input_ids, _prefixed(lm.tokenizer, batch, expert + " ")[0], _prefixed(lm.tokenizer, batch, novice + " ")[0]]
    caches: list = [None, None, None]
    cache_name = cache_argument(lm.model)
    generated: list[int] = []
    for _ in range(tokens):
        last = []
        for i, ids in enumerate(inputs):
            out = lm.model(input_ids=ids, use_cache=True, **{cache_name: caches[i]})
            caches[i] = getattr(out, cache_name)
            last.append(out.logits[:, -1:])
        kept, probs = losses.elm_erase_target(last[0], last[1], last[2], torch.tensor([gamma]), 1.0, top_k)
        token = int(kept[0, -1, probs[0, -1].argmax()])
        generated.append(token)
        if token == lm.tokenizer.eos_token_id:
            break
        inputs = [torch.tensor([[token]], device=batch.input_ids.device)] * 3
    return generated


def consistency_prompts(data: ConceptData, count: int) -> list[str]:
    """The first half of a concept sentence, then a change of topic."""
    prompts = []
    for i, sentence in enumerate(data.concept_sentences[:count]):
        words = sentence.split()
        prompts.append(" ".join(words[: max(4, len(words) // 2)]) + TOPIC_CHANGE[i % len(TOPIC_CHANGE)])
    return prompts


def consistency_examples(lm: LoadedModel, data: ConceptData, config: Config, seed: int, folder) -> list[dict]:
    """(prompt ids, continuation ids) pairs, generated once and cached as JSON under a key
    of exactly what they depend on (the prompts, the concept, the generation settings, the
    seed and the model), so changing the learning rate or rank reuses them and changing
    any of those inputs does not."""
    prompts = consistency_prompts(data, config.consistency_prompts)
    key = fingerprint(["elm-consistency", prompts, data.concept, config.consistency_tokens, config.guidance_gamma,
                       config.top_k, seed, model_fingerprint(lm.model)])
    path = folder / "elm" / "consistency" / f"{key}.json" if folder is not None else None
    if path is not None and path.is_file():
        return read_json(path)
    examples = [{"prompt": lm.tokenizer(prompt)["input_ids"],
                 "continuation": guided_generate(lm, prompt, data.concept, config.consistency_tokens,
                                                 config.guidance_gamma, config.top_k, seed + i)}
                for i, prompt in enumerate(prompts)]
    if path is not None:
        write_json(path, examples)
    return examples


def _consistency_batch(examples: list[dict], pad_id: int, device):
    rows = [e["prompt"] + e["continuation"] for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target_mask = torch.zeros_like(ids)
    for i, (row, e) in enumerate(zip(rows, examples)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        target_mask[i, len(e["prompt"]): len(row)] = 1
    return ids.to(device), mask.to(device), target_mask.to(device)


def _base_weight_name(peft_name: str) -> str:
    # base_model.model.<module path>.lora_A.default.weight -> <module path>.weight
    path = peft_name.split(".lora_")[0]
    return path.removeprefix("base_model.model.") + ".weight"


def _adapter_weights(named: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, dict] = {}
    for name, tensor in named.items():
        if ".lora_A." in name or ".lora_B." in name:
            pairs.setdefault(_base_weight_name(name), {})["A" if ".lora_A." in name else "B"] = tensor.detach().cpu().clone()
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}


def accuracy_under(lm: LoadedModel, questions: list[MCQuestion], prefix: str) -> np.ndarray:
    """Per-question correctness with ``prefix`` before each question, scored by option
    log-likelihood (option order does not matter to it, so only the context changes)."""
    asked = [MCQuestion(f"{prefix} {q.question}".strip(), q.options, q.answer) for q in questions]
    prepared = prepare(lm, asked, "loglik", 0)
    return correct_from_scores(prepared, option_scores(lm, prepared)).astype(float)


def persona_accuracy(lm: LoadedModel, questions: list[MCQuestion], concept: str,
                     templates: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-question accuracy under ``templates`` expert prefixes and as many novice ones
    (spread over the ten of each), averaged over the templates."""
    picks = np.linspace(0, len(EXPERT) - 1, templates).round().astype(int)
    expert = np.mean([accuracy_under(lm, questions, EXPERT[i].format(c=concept)) for i in picks], axis=0)
    novice = np.mean([accuracy_under(lm, questions, NOVICE[i].format(c=concept)) for i in picks], axis=0)
    return expert, novice


def guidance_difference(expert: np.ndarray, novice: np.ndarray) -> Interval:
    """Mean novice minus expert accuracy, paired over questions, with its 95% bootstrap interval."""
    return bootstrap(lambda s: {"d": float(s["d"][0].mean())}, {"d": (novice - expert,)}, 2000, 0)["d"]


def guidance_check(lm: LoadedModel, data: ConceptData, templates: int, log) -> dict:
    """Novice minus expert accuracy on the TRAIN questions, paired over questions (95%
    bootstrap); logs why ELM will not erase where that difference is not below 0."""
    questions = data.questions.get("qa_train") or []
    if not templates or not questions:
        return {}
    expert, novice = persona_accuracy(lm, questions, data.concept, templates)
    d = guidance_difference(expert, novice)
    found = {"questions": len(questions), "expert_accuracy": float(expert.mean()),
             "novice_accuracy": float(novice.mean()), "novice_minus_expert": d.as_dict()}
    if d.high >= 0:
        log(f"ELM's guidance shows no knowledge difference on this model: TRAIN accuracy as a novice minus as an "
            f"expert is {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (95%), so its erase target points at nothing "
            f"the model knows less of; expect it to lower accuracy only with damage to neighbouring knowledge.")
    return found


def fit(lm: LoadedModel, data: ConceptData, config: Config,
        seed: int = 42, context: MethodContext | None = None) -> TrainedGrid:
    context = context or MethodContext()
    from peft import LoraConfig

    depth = len(decoder_layers(lm.model)[1])
    layers = list(config.layers) or list(range(resolve_layer(None, config.layer_from, depth, "layer_from"),
                                               resolve_layer(None, config.layer_to, depth, "layer_to") + 1))
    for layer in layers:
        resolve_layer(layer, 0, depth)
    check_target_modules(lm.model, config.target_modules, layers)
    guidance = guidance_check(lm, data, config.guidance_templates, context.log)
    folder = context.checkpoint_dir
    trained_by = {k: v for k, v in config.__dict__.items() if k != "guidance_templates"}  # the check trains nothing
    base_folder = folder / "elm" / fingerprint(["elm", trained_by, seed, model_fingerprint(lm.model)]) if folder else None
    examples = consistency_examples(lm, data, config, seed, folder)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), layers_to_transform=layers, bias="none")

    base: dict[str, torch.Tensor] = {}  # the weights the adapters merge into: one copy for the grid

    def run_point(point: dict):
        where = base_folder / f"lr{point['lr']:g}" if base_folder else None
        return train_adapter(lm, data, config, lora, examples, point, seed, where, context.progress, base)

    return TrainedGrid("elm", grid_points(lr=config.lr), run_point,
                       info={"layers": layers, "consistency_examples": len(examples), "guidance": guidance})


def train_adapter(lm, data, config: Config, lora, examples, point, seed, where, progress, base):
    """The grid point's adapter (trained, or read back from ``where``) and its training log."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    def adapter(weights: dict) -> LoraAdapter:
        return LoraAdapter(weights, config.lora_alpha / config.rank, base_weights(lm.model, weights, base),
                           where / "adapter" if where else None, {"method": "elm", **point})

    done = cached_log(where)
    if done is not None and (where / "adapter" / "adapter_model.safetensors").is_file():
        saved = load_file(str(where / "adapter" / "adapter_model.safetensors"))
        # peft writes "base_model.model.<module path>.lora_A.weight": the adapter's name dropped
        named = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
                 for k, v in saved.items()}
        return adapter(_adapter_weights(named)), done
    flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    torch.manual_seed(seed)  # LoRA A's init
    peft_model = get_peft_model(lm.model, lora)
    try:
        params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
        step_loss = make_step_loss(lm.model, lm.tokenizer, peft_model, data.concept, config, examples, seed)
        forget = forget_sentences(lm.tokenizer, data, config.forget_text, seed)
        job = TrainingJob(lm.model, lm.tokenizer, params, step_loss, forget, data.neutral_sentences,
                          config.settings(point["lr"], seed))
        log = train(job, where, progress, f"elm {point}")
        weights = _adapter_weights(params)
        if where is not None:
            peft_model.save_pretrained(str(where / "adapter"))
            finished(where, log)
    finally:
        peft_model.unload()
        for name, p in lm.model.named_parameters():
            p.requires_grad_(flags.get(name, False))
    return adapter(weights), log  # after unload: the base weights under their own names


def make_step_loss(model, tokenizer, peft_model, concept: str, config: Config, examples: list[dict],
                   seed: int) -> StepLoss:
    """ELM's loss on a (forget, retain) batch pair: the adapter-on model's forget logits
    pulled toward the erase target built with the adapter off (plain, expert- and
    novice-prefixed passes), its retain logits toward the adapter-off argmax, and the
    consistency examples' continuations kept likely. ``model`` is the base model that
    ``peft_model`` wraps (the adapter's off switch); returns (total, detached parts)."""
    rng = torch.Generator().manual_seed(seed + 7)
    stream = TextStream(list(range(len(examples))), config.batch_size, seed + 2) if examples else None
    pad = tokenizer.pad_token_id

    def step_loss(forget, retain):
        expert = EXPERT[int(torch.randint(len(EXPERT), (1,), generator=rng))].format(c=concept) + " "
        novice = NOVICE[int(torch.randint(len(NOVICE), (1,), generator=rng))].format(c=concept) + " "
        with torch.no_grad(), peft_model.disable_adapter():
            base = _logits(model, forget.input_ids, forget.attention_mask)
            e_ids, e_mask, offset = _prefixed(tokenizer, forget, expert)
            expert_logits = _logits(model, e_ids, e_mask)[:, offset: offset + base.shape[1]]
            n_ids, n_mask, n_offset = _prefixed(tokenizer, forget, novice)
            novice_logits = _logits(model, n_ids, n_mask)[:, n_offset: n_offset + base.shape[1]]
            eta = losses.eta_ramp(base.shape[1] - 1, config.eta_start, config.eta_end).to(base.device)
            target = losses.elm_erase_target(base[:, :-1], expert_logits[:, :-1], novice_logits[:, :-1], eta,
                                             config.temperature, config.top_k)
            del expert_logits, novice_logits
            retain_targets = _logits(model, retain.input_ids, retain.attention_mask).argmax(-1)
        student = _logits(model, forget.input_ids, forget.attention_mask)[:, :-1]
        erase = losses.soft_cross_entropy(student, *target, forget.attention_mask[:, 1:])
        retain_logits = _logits(model, retain.input_ids, retain.attention_mask)
        retain_term = losses.hard_cross_entropy(retain_logits[:, :-1], retain_targets[:, :-1], retain.attention_mask[:, 1:])
        total = config.erase_weight * erase + config.retain_weight * retain_term
        parts = {"erase": erase.detach(), "retain": retain_term.detach()}
        if stream is not None and config.consistency_weight > 0:
            ids, mask, target_mask = _consistency_batch([examples[i] for i in stream.next()], pad, base.device)
            consistency = losses.causal_lm_loss(_logits(model, ids, mask), ids, target_mask)
            total = total + config.consistency_weight * consistency
            parts["consistency"] = consistency.detach()
        return total, parts

    return step_loss

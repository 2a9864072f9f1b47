"""One typed configuration for the API, YAML files and the CLI.

A run is a ``RunConfig`` of sections (model, data, evaluation, and one per method).
YAML files use the same section and field names; unknown keys are errors. CLI flags
override single fields (``--k 200``, ``--delta-grid 1,5,10``) and are generated from the
dataclass fields, so every setting is reachable without a file.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


import yaml

from obliviate.data import benchmark_dir
from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import GateOn
from obliviate.settings import build_section, coerce, setting
from obliviate import methods as method_registry
from obliviate.methods.ember import Config as EmberConfig


@dataclass(frozen=True)
class ModelConfig:
    name: str = "embedded"  # embedded Gemma 3 270M, a hub id, a folder, or a .gguf file
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str | None = setting(None, "float32 | bfloat16 | float16 (default: float32 on the CPU, bfloat16 on a GPU)")
    device_map: str | None = setting(None, "auto: spread the model over every GPU (through accelerate)")
    # Pickle weights (.bin/.pt/.pth) can run code when loaded: only safetensors unless asked.
    allow_pickle: bool = setting(
        False, "also load pickle weights (.bin/.pt/.pth), which can run code: trusted folders only")


@dataclass(frozen=True)
class DataConfig:
    # None (not the packaged folder's path) so that a run's fingerprint, results and YAML do not
    # depend on where obliviate is installed; ``data_dir()`` resolves it.
    data: str | None = setting(
        None, "a benchmark folder in the EMBER format (default: the EMBER benchmark shipped with obliviate)")
    concept_sentences: str | None = None  # a custom concept: one sentence a line or a JSON list
    neutral_sentences: str | None = setting(None, "a custom concept's neutral sentences (one a line or a JSON list)")
    questions: str | None = None  # MC questions in the benchmark's schema
    concept_prompts: str | None = setting(
        None, "a custom concept's own prompts, the benchmark's coherency prompts (for fluency on concept text)")
    general_questions_file: str | None = None  # an MMLU-style file, if the user has one
    general_questions: int = setting(100, "other concepts' questions per split that measure general knowledge")
    # General prompts for coherence (METHOD.md section 4: Alpaca in the reference, not
    # available offline): Alpaca-style JSON, a JSON list or one prompt a line. Default: the
    # other concepts' open questions ("Question: {q}\nAnswer:") plus neutral openings.
    coherence_prompts: str | None = setting(
        None, "general prompts for coherence: Alpaca-style JSON, a JSON list or one a line (default: other concepts' open questions)")

    def data_dir(self) -> Path | None:
        """The benchmark folder a run reads: ``data``, else the one shipped with obliviate; None
        for a concept of the user's own without ``data`` (only its own files are read, as before)."""
        if self.data:
            return Path(self.data)
        return None if self.concept_sentences else benchmark_dir()


@dataclass(frozen=True)
class EvalConfig:
    scoring: str = "auto"  # auto | loglik | letter (auto: letter when a chat template exists)
    batch_tokens: int | None = setting(None, "tokens through the model at once (default: sized to the device)")
    coherence_new_tokens: int = 32  # greedy tokens per coherence prompt (reference: 200 on GPUs)
    # Coherence is judged on GENERAL prompts (METHOD.md section 4): this many of the other
    # concepts' open questions per split (100 = the reference's Alpaca sample size) ...
    general_prompts: int = setting(
        100, "general prompts per split for coherence, from the other concepts' open questions")
    neutral_coherence_prompts: int = setting(10, "neutral sentence openings per split added to the general prompts")
    # The concept's coherency prompts are reported as "fluency on concept text" (the paper's
    # localized cost); gating on them (at coherence_gate) is an opt-in, never the default.
    gate_concept_fluency: bool = setting(
        False, "also score 0 a candidate whose fluency on concept text is below the coherence gate")
    # Off by default (ours; the reference's grid has no such column): the chosen candidate's
    # concept fluency is always measured on TEST, and regenerating the concept prompts for
    # every candidate was half of EMBER's grid time on the embedded model (124 s -> 62 s).
    grid_concept_fluency: bool = setting(
        False, "also measure fluency on concept text for every EMBER grid candidate (the grid table's diagnostic column)")
    # EMBER's own grid (reference): reject general-knowledge fraction < 0.9, score 0 below
    # coherence 0.9, rank by harmonic(efficacy, specificity, coherence).
    general_gate: float = setting(0.9, "EMBER: reject a delta whose general-knowledge fraction is below this")
    coherence_gate: float = setting(0.9, "EMBER: a delta whose coherence on general prompts is below this scores 0")
    # Ours (the reference gates the point value): 110 TRAIN prompts leave a candidate's
    # coherence uncertain by about +/-0.05, and a point just over the gate can fall well under
    # it on new prompts; "low" gates the low end of the candidate's 95% interval instead
    # (docs/results/coherence-gate.md).
    coherence_gate_on: GateOn = setting(
        "low", "judge the coherence gates on the low end of a candidate's 95% interval (low) or on its point "
               "value (value, the reference)")
    # EMBER's delta grid is monotone: stop after this many candidates in a row fail the
    # coherence gate (they score 0 and cannot be chosen). 0 = run the whole grid (reference).
    stop_after_incoherent: int = setting(
        2, "EMBER: stop the delta grid after this many incoherent deltas in a row (0: run it all)")
    # Base methods' grids (reference grid_eval_kwargs): discard a cell whose general-knowledge
    # fraction is < min_mmlu = 0.7 or whose QA fraction stays > max_qa_acc = 0.6, rank by
    # harmonic(efficacy, specificity), then measure coherence on the top candidates only.
    method_general_gate: float = setting(
        0.7, "base methods: discard a cell whose general-knowledge fraction is below this")
    method_max_qa_frac: float = setting(
        0.6, "base methods: discard a cell whose QA fraction stays above this (too little erased)")
    method_coherence_top: int = setting(3, "base methods: measure coherence on this many best cells")
    method_coherence_gate: float | None = setting(
        None, "base methods: a cell whose coherence is below this scores 0 (default: off, as the reference)")
    # Which candidate wins: "best" (the reference: the highest score; ties to the larger drop
    # of the correct option's probability, ours, then to the smaller delta / earlier cell) or
    # "one-se" (the first within one bootstrap standard error of the best: more conservative
    # with 50 noisy questions, at the cost of weaker edits).
    choice: str = setting(
        "best", "which candidate wins: best (the reference) or one-se (the first within one standard error of the best)")
    bootstrap: int = 1000  # resamples for 95% intervals
    # Ours (the reference sweeps regardless): where neither the original's TRAIN QA accuracy
    # nor its probability of the correct option shows knowledge, no candidate can win
    # (selection.py), so the method is neither fitted nor swept and nothing is applied; on the
    # embedded model that is 4 of the 13 concepts (docs/results/knowledge-evidence.md).
    fit_at_chance: bool = setting(
        False, "fit and sweep the grid even when the original's TRAIN QA is at chance (no candidate can win; "
               "to inspect the grid, or on a random test model)")
    cache: bool = setting(
        True, "keep the ORIGINAL model's answers, continuations and relearning curve in the user's cache folder "
              "and reuse them (--no-cache: recompute, write nothing)")

    def __post_init__(self) -> None:
        if self.scoring not in ("auto", "loglik", "letter"):
            raise ObliviateError(f"scoring must be auto, loglik or letter, got {self.scoring!r}.")
        if self.batch_tokens is not None and self.batch_tokens < 16:
            raise ObliviateError(f"batch_tokens must be >= 16, got {self.batch_tokens}.")
        for name in ("general_gate", "coherence_gate", "method_general_gate", "method_max_qa_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ObliviateError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.coherence_gate_on not in typing.get_args(GateOn):
            raise ObliviateError(f"coherence_gate_on must be value or low, got {self.coherence_gate_on!r}.")
        if self.choice not in ("best", "one-se"):
            raise ObliviateError(f"choice must be best or one-se, got {self.choice!r}.")
        if self.method_coherence_gate is not None and not 0 <= self.method_coherence_gate <= 1:
            raise ObliviateError(f"method_coherence_gate must be in [0, 1] or empty, got {self.method_coherence_gate}.")
        for name in ("general_prompts", "neutral_coherence_prompts", "method_coherence_top"):
            if getattr(self, name) < 0:
                raise ObliviateError(f"{name} must be >= 0, got {getattr(self, name)}.")


@dataclass(frozen=True)
class RunConfig:
    concept: str = ""
    # More concepts erased from the same model, after ``concept`` (`--concept A --concept B`):
    # EMBER's edits compose concept by concept; a trained method forgets their union.
    concepts: tuple[str, ...] = ()
    out: str = "runs/erase"
    method: str = "ember"
    with_ember: bool = False  # apply EMBER first, then the base method
    seed: int = 42
    overwrite: bool = False
    save_model: bool = True  # write model/ (a full copy); the patch and results are always written
    # A patch WITH the original rows (it can undo the erasure), written only when asked and
    # never inside --out: whoever receives it with the model could restore the concept.
    revertible_patch: str | None = None
    # Upload the output folder (model/ with its model card, or the edit files) to this Hub
    # repository when the run ends; never without a passed leak check.
    push_to_hub: str | None = None
    private: bool = False  # create the pushed repository as private
    # Train the method's grid into out/checkpoints and stop: the step that runs on several
    # GPUs (`accelerate launch ... -m obliviate erase --train-only`); the same command without
    # it then evaluates, chooses and saves in one process, reusing every trained candidate.
    train_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    ember: EmberConfig = field(default_factory=EmberConfig)
    # Settings of the trained methods by method name, validated by each method's Config.
    methods: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every method's settings are checked now, before any model loads.
        method_registry.get(self.method)
        for name, settings in self.methods.items():
            self.method_config(name, settings)

    def all_concepts(self) -> list[str]:
        """Every concept the run erases, in order, without repeats."""
        return list(dict.fromkeys(c for c in (self.concept, *self.concepts) if c))

    def method_config(self, name: str | None = None, settings: dict | None = None):
        """The Config of method ``name`` (default: the run's method) from its settings."""
        name = name or self.method
        if name == "ember":
            return self.ember
        module = method_registry.get(name)
        values = self.methods.get(name, {}) if settings is None else settings
        return build_section(module.Config, values, f"methods.{name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "evaluation": EvalConfig, "ember": EmberConfig}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ObliviateError(f"Config file {path} does not exist.")
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ObliviateError(f"Config file {path} is not valid YAML: {err}") from err
    if not isinstance(payload, dict):
        raise ObliviateError(f"Config file {path} must hold a mapping of sections at the top level.")
    return payload


def run_config_from_dict(payload: dict, where: str = "config") -> RunConfig:
    top = {f.name for f in fields(RunConfig)}
    unknown = set(payload) - top
    if unknown:
        raise ObliviateError(f"Unknown section(s) {', '.join(sorted(unknown))} in {where}. Known: {', '.join(sorted(top))}.")
    kwargs = {}
    hints = typing.get_type_hints(RunConfig)
    for name, value in plug_in_settings_as_section(payload).items():
        if name in SECTIONS:
            kwargs[name] = build_section(SECTIONS[name], value, f"{where}.{name}")
        elif name == "methods":
            kwargs[name] = dict(value or {})
        else:
            kwargs[name] = coerce(value, hints[name], f"{where}.{name}")
    return RunConfig(**kwargs)


def plug_in_settings_as_section(overrides: dict) -> dict:
    """EMBER's settings given among the methods' (``--set ember.KEY=VALUE``, or ``methods:
    ember:`` in YAML) moved to its own section, which is where the run reads them."""
    plug_in = method_registry.PLUG_IN
    if plug_in not in (overrides.get("methods") or {}):
        return overrides
    methods = dict(overrides["methods"])
    settings = methods.pop(plug_in)
    return {**overrides, "methods": methods, plug_in: {**(overrides.get(plug_in) or {}), **settings}}


def merge(base: RunConfig, overrides: dict) -> RunConfig:
    """Apply {section: {field: value}} and {field: value} overrides on top of ``base``."""
    overrides = plug_in_settings_as_section(overrides)
    kwargs = {}
    hints = typing.get_type_hints(RunConfig)
    for name, value in overrides.items():
        if name in SECTIONS:
            section = getattr(base, name)
            current = {f.name: getattr(section, f.name) for f in fields(section)}
            current.update(value)
            kwargs[name] = build_section(SECTIONS[name], current, name)
        elif name == "methods":
            merged = {k: dict(v) for k, v in base.methods.items()}
            for method, settings in value.items():
                merged.setdefault(method, {}).update(settings)
            kwargs[name] = merged
        else:
            kwargs[name] = coerce(value, hints[name], name)
    return replace(base, **kwargs)

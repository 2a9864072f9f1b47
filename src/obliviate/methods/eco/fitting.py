"""`eco fit`: train the prompt classifier, calibrate its threshold, learn sigma.

Examples (each question both raw and as the scoring prompt "Question: q\\nAnswer:"):
  positives: the concept's sentences and its TRAIN questions;
  negatives: neutral sentences, other concepts' sentences and questions, and the
             similar-domain (SimDom) TRAIN questions, the hardest negatives.
Sources (a sentence, a question) are split 60/20/20 into fit / calibration / held-out
with a fixed seed, both formats of a question going to the same part. The threshold is
set on the calibration negatives; FPR/FNR are reported on the held-out part.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from obliviate.data.concepts import ConceptData, MCQuestion
from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.methods.eco.artifact import EcoArtifact
from obliviate.methods.eco.artifact import model_identity
from obliviate.methods.eco.artifact import probe_rows
from obliviate.methods.eco.classifier import calibrate_threshold
from obliviate.methods.eco.classifier import candidate_layers
from obliviate.methods.eco.classifier import pooled_hidden_layers
from obliviate.methods.eco.classifier import rates
from obliviate.methods.eco.classifier import train_logistic
from obliviate.methods.eco.config import EcoConfig
from obliviate.methods.eco.corruption import Corruption
from obliviate.methods.eco.hook import EcoEdit, EcoHook
from obliviate.methods.eco.sigma import SigmaTrace
from obliviate.methods.eco.sigma import ZerothOrderConfig
from obliviate.methods.eco.sigma import learn_sigma
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare

MIN_POSITIVES = 30  # sentences + train questions: about 6 held out and 6 to calibrate on
CONTRAST_SENTENCES = 300
SPLITS = ("fit", "calibration", "heldout")


def scoring_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@dataclass
class Example:
    text: str
    label: int
    group: str
    split: str


def _sources(data: ConceptData, seed: int) -> list[tuple[list[str], int, str]]:
    """(texts of one source, label, group) for every source."""
    def questions(items: list[MCQuestion]) -> list[list[str]]:
        return [[q.question, scoring_prompt(q.question)] for q in items]

    contrast = list(data.contrast_sentences)
    random.Random(seed).shuffle(contrast)
    groups = [
        ([[s] for s in data.concept_sentences], 1, "concept_sentences"),
        (questions(data.questions.get("qa_train", [])), 1, "concept_questions"),
        ([[s] for s in data.neutral_sentences], 0, "neutral_sentences"),
        ([[s] for s in contrast[:CONTRAST_SENTENCES]], 0, "other_concept_sentences"),
        (questions(data.general.get("train", [])), 0, "other_questions"),
        (questions(data.questions.get("simdom_train", [])), 0, "simdom_questions"),
    ]
    seen: set[str] = set()
    out = []
    for items, label, group in groups:
        for texts in items:
            # The data repeats some sentences; one copy each keeps held-out text unseen.
            if texts[0] not in seen:
                seen.add(texts[0])
                out.append((texts, label, group))
    return out


def build_examples(data: ConceptData, seed: int = 42) -> list[Example]:
    sources = _sources(data, seed)
    positives = sum(1 for _, label, _ in sources if label == 1)
    if positives < MIN_POSITIVES:
        raise ObliviateError(
            f"Concept {data.concept!r} has {positives} positive examples (concept sentences + train questions); "
            f"the prompt classifier needs at least {MIN_POSITIVES} (the benchmark has about 350). "
            "Add sentences with --concept-sentences FILE or questions with --questions FILE."
        )
    rng = random.Random(seed)
    examples = []
    for group in dict.fromkeys(g for _, _, g in sources):
        members = [s for s in sources if s[2] == group]
        rng.shuffle(members)
        cut1, cut2 = int(0.6 * len(members)), int(0.8 * len(members))
        for index, (texts, label, _) in enumerate(members):
            split = SPLITS[0] if index < cut1 else SPLITS[1] if index < cut2 else SPLITS[2]
            examples.extend(Example(text, label, group, split) for text in texts)
    return examples


def encode(lm: LoadedModel, texts: list[str]) -> list[list[int]]:
    """Token ids as the model gets them (special tokens included)."""
    return [lm.tokenizer(t).input_ids for t in texts]


def group_rates(scores: np.ndarray, examples: list[Example], threshold: float) -> dict[str, dict]:
    out = {}
    for group in dict.fromkeys(e.group for e in examples):
        rows = [i for i, e in enumerate(examples) if e.group == group]
        flagged = float((scores[rows] >= threshold).mean())
        out[group] = {"n": len(rows), "flagged": flagged}
    return out


def group_weights(examples: list[Example]) -> np.ndarray:
    """Each class weighs the same, and so does each group within its class: the 50 train
    questions count as much as the 300 concept sentences, SimDom as much as neutral text."""
    weights = np.zeros(len(examples))
    for label in (0, 1):
        groups = {e.group for e in examples if e.label == label}
        for group in groups:
            rows = [i for i, e in enumerate(examples) if e.group == group and e.label == label]
            weights[rows] = len(examples) / (2 * len(groups) * len(rows))
    return weights


def _threshold(classifier, scores: np.ndarray, negatives: np.ndarray, config: EcoConfig) -> tuple[float, str]:
    if config.threshold is not None:
        return config.threshold, "fixed"
    if config.conformal_alpha is not None:
        return calibrate_threshold(scores[negatives], alpha=config.conformal_alpha), \
            f"split-conformal alpha={config.conformal_alpha}"
    return calibrate_threshold(scores[negatives], target_fpr=config.target_fpr), f"target FPR {config.target_fpr}"


def fit_classifier(lm: LoadedModel, data: ConceptData, config: EcoConfig):
    """Train one classifier per candidate layer on the fit part; keep the layer with the
    best recall on the calibration part at its calibrated threshold (ties: the earlier,
    cheaper layer). The held-out part is only used for the reported rates."""
    examples = build_examples(data, config.seed)
    layers = [config.layer] if config.layer else candidate_layers(lm.model)
    features = pooled_hidden_layers(lm.model, encode(lm, [e.text for e in examples]), layers)
    labels = np.array([e.label for e in examples])
    part = {s: np.array([e.split == s for e in examples]) for s in SPLITS}
    calibration_negatives = part["calibration"] & (labels == 0)
    calibration_positives = part["calibration"] & (labels == 1)
    best, layer_report = None, {}
    for layer in layers:
        classifier = train_logistic(features[layer][part["fit"]], labels[part["fit"]], layer, config.regularization,
                                    config.seed, group_weights([e for e, f in zip(examples, part["fit"]) if f]))
        scores = classifier.probabilities(features[layer]).numpy()
        classifier.threshold, method = _threshold(classifier, scores, calibration_negatives, config)
        recall = float((scores[calibration_positives] >= classifier.threshold).mean())
        layer_report[layer] = {"calibration_recall": recall, "threshold": classifier.threshold}
        if best is None or recall > best[0]:
            best = (recall, classifier, scores, method)
    _, classifier, scores, method = best
    held = part["heldout"]
    held_examples = [e for e, h in zip(examples, held) if h]
    report = {
        "layer": classifier.layer, "threshold": classifier.threshold, "calibration": method, "layers": layer_report,
        "examples": {s: int(part[s].sum()) for s in SPLITS},
        "heldout": rates(scores[held], labels[held], classifier.threshold),
        "calibration_set": rates(scores[part["calibration"]], labels[part["calibration"]], classifier.threshold),
        "heldout_groups": group_rates(scores[held], held_examples, classifier.threshold),
    }
    return classifier, report, (scores[held], labels[held])


def forget_accuracy(lm: LoadedModel, hook: EcoHook, questions: list[MCQuestion], scoring: str, seed: int) -> Callable[[float], float]:
    """S(sigma): accuracy on ``questions`` with every prompt corrupted at strength sigma."""
    prepared = prepare(lm, questions, scoring, seed)

    def objective(sigma: float) -> float:
        hook.corruption = hook.corruption.with_strength(sigma)
        hook.install(lm.model)
        try:
            return float(correct_from_scores(prepared, option_scores(lm, prepared)).mean())
        finally:
            hook.remove()

    return objective


def fit_sigma(lm: LoadedModel, data: ConceptData, hook: EcoHook, config: EcoConfig, progress=None) -> SigmaTrace:
    """Zeroth-order sigma on the surrogate forget set: the concept's TRAIN questions."""
    questions = data.questions.get("qa_train", [])
    if config.corruption != "gaussian" or config.sigma is not None or not questions:
        why = "fixed by --sigma" if config.sigma is not None else (
            "no train questions" if not questions else f"{config.corruption} has no sigma")
        strength = config.sigma if config.sigma is not None else hook.corruption.strength
        return SigmaTrace(strength, float("nan"), f"not learned: {why}")
    saved = hook.force
    hook.force = True
    try:
        objective = forget_accuracy(lm, hook, questions, config.scoring, config.seed)
        zo = ZerothOrderConfig(s0=config.zo_s0, lr=config.zo_lr, steps=config.zo_steps)
        trace = learn_sigma(objective, zo, progress)
        trace_base = objective(0.0)
    finally:
        hook.force = saved
    trace.steps.insert(0, {"sigma": 0.0, "objective": trace_base, "note": "no corruption"})
    return trace


@dataclass
class FittedEco:
    """ECO's ``Fitted``: one candidate, the learned corruption behind the calibrated classifier."""

    artifact: EcoArtifact
    heldout: tuple[np.ndarray, np.ndarray]  # held-out classifier scores and labels (calibration figure)
    trace: SigmaTrace

    def candidates(self) -> Iterator[tuple[dict, EcoEdit]]:
        yield {"sigma": self.artifact.corruption.strength}, EcoEdit(self.artifact.hook(), self.artifact)

    def report(self) -> dict:
        return dict(self.artifact.info)


def fit(lm: LoadedModel, data: ConceptData, config: EcoConfig = EcoConfig(),
        progress: Callable[[str], None] | None = None) -> FittedEco:
    """Fit ECO for one concept on ``lm``: train the classifier, calibrate its threshold, learn sigma."""
    say = progress or (lambda _m: None)
    say(f"classifier: {data.concept!r} on {lm.name}")
    classifier, report, heldout = fit_classifier(lm, data, config)
    say(f"threshold {classifier.threshold:.4f}; held-out FPR {report['heldout']['fpr']:.3f}, "
        f"FNR {report['heldout']['fnr']:.3f}")
    marker = tuple(lm.tokenizer(config.prompt_marker, add_special_tokens=False).input_ids) if config.prompt_marker else ()
    corruption = Corruption(config.corruption, config.dims, config.sigma if config.sigma is not None else config.zo_s0,
                            config.seed)
    hook = EcoHook(classifier, corruption, marker, lm.tokenizer.pad_token_id)
    trace = fit_sigma(lm, data, hook, config, say)
    say(f"sigma {trace.sigma:.4g} (train forget accuracy {trace.objective:.3f}, {trace.stopped})")
    artifact = EcoArtifact(
        classifier=classifier, corruption=corruption.with_strength(trace.sigma), model_name=lm.name,
        model_source=lm.source, identity=model_identity(lm.model), probe=probe_rows(lm.model),
        marker_ids=marker, pad_token_id=lm.tokenizer.pad_token_id,
        info={"concept": data.concept, "prompt_marker": config.prompt_marker, "classifier_report": report,
              "sigma_search": trace.as_dict(), "fit_config": config.__dict__},
    )
    return FittedEco(artifact, heldout, trace)

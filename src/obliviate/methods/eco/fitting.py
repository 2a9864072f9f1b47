"""`eco fit`: train the prompt classifier, calibrate its threshold, learn sigma.

Examples (each question raw, as the scoring prompt "Question: q\\nAnswer:", and in
``forms_per_question`` wrapped forms of forms.py):
  positives: the concept's sentences, its TRAIN questions and its open TRAIN questions
             (where the benchmark has them); not its coherency prompts, which the
             evaluation's fluency on concept text is measured on;
  negatives: neutral sentences, other concepts' sentences and questions, and the
             similar-domain (SimDom) TRAIN questions and open questions, the hardest
             negatives (wrapped only in forms that do not name the concept, so that
             neither a wrapper nor the concept's name alone decides).
Sources (a sentence, a question with its forms) are split 60/20/20 into fit /
calibration / held-out with a fixed seed, all texts of a source going to the same part.
The threshold is set on the calibration negatives; FPR/FNR are reported on the held-out
part. Forms in ``held_out_forms`` are never trained on: recall is measured on the TEST
questions plain, in those forms and in the trained ones, with 95% intervals (recall.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from obliviate.data.concepts import ConceptData, MCQuestion, load_open_questions
from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.methods.eco.artifact import EcoArtifact
from obliviate.methods.eco.artifact import model_identity
from obliviate.methods.eco.artifact import probe_rows
from obliviate.methods.eco.classifier import PromptClassifier
from obliviate.methods.eco.classifier import calibrate_threshold
from obliviate.methods.eco.classifier import candidate_layers
from obliviate.methods.eco.classifier import pooled_hidden_layers
from obliviate.methods.eco.classifier import rates
from obliviate.methods.eco.classifier import train_logistic
from obliviate.methods.eco.config import EcoConfig
from obliviate.methods.eco.corruption import Corruption
from obliviate.methods.eco.forms import FORMS, Wrapped, every_form, scoring_prompt, usable_forms, wrap
from obliviate.methods.eco.hook import EcoEdit, EcoHook, prompt_length
from obliviate.methods.eco.recall import describe, rate_interval, split_units
from obliviate.methods.eco.sigma import Objective, SigmaTrace
from obliviate.methods.eco.sigma import learn_sigma
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare

MIN_POSITIVES = 30  # sentences + train questions: about 6 held out and 6 to calibrate on
CONTRAST_SENTENCES = 300
SPLITS = ("fit", "calibration", "heldout")
PLAIN = "plain"  # the form of an unwrapped text

@dataclass
class Example:
    text: str
    label: int
    group: str
    split: str
    form: str = PLAIN
    source: int = 0  # texts of one source (a question and its forms) share it


@dataclass(frozen=True)
class Augmentation:
    """Which wrapped forms the training questions get (forms.py)."""

    templates: Mapping[str, str]
    held_out: tuple[str, ...] = ()
    per_question: int = 2

    @classmethod
    def of(cls, config: EcoConfig) -> "Augmentation":
        return cls(FORMS, config.held_out_forms, config.forms_per_question)


def open_questions(data: ConceptData) -> dict[str, list[str]]:
    """The concept's open-ended questions by split ({} for a concept without them)."""
    if data.data_dir is None:
        return {}
    try:
        return {split: [q.question for q in items] for split, items in load_open_questions(data.data_dir, data.concept).items()}
    except ObliviateError:  # a custom concept, or a benchmark folder without open_questions.json
        return {}


Source = tuple[list[Wrapped], int, str]  # (texts, label, group)


def _question_sources(questions: list[str], label: int, group: str, data: ConceptData, augmentation: Augmentation,
                      rng: random.Random) -> list[Source]:
    """Each question raw, as the scoring prompt, and in wrapped forms (negatives: only the
    forms that do not name the concept)."""
    forms = usable_forms(augmentation.templates, augmentation.held_out, concept_free=label == 0)
    wrapped = wrap(questions, data.concept, forms, rng, augmentation.per_question)
    return [([Wrapped(q, PLAIN), Wrapped(scoring_prompt(q), PLAIN), *extra], label, group)
            for q, extra in zip(questions, wrapped)]


def _sentence_sources(sentences: list[str], label: int, group: str) -> list[Source]:
    return [([Wrapped(s, PLAIN)], label, group) for s in sentences]


def _sources(data: ConceptData, seed: int, augmentation: Augmentation) -> list[Source]:
    """Every source of the classifier's examples, each text once."""
    contrast = list(data.contrast_sentences)
    random.Random(seed).shuffle(contrast)
    rng = random.Random(seed + 1)
    opened = open_questions(data)

    def mc(items: list[MCQuestion]) -> list[str]:
        return [q.question for q in items]

    groups = [
        _sentence_sources(data.concept_sentences, 1, "concept_sentences"),
        _question_sources(mc(data.questions.get("qa_train", [])), 1, "concept_questions", data, augmentation, rng),
        _question_sources(opened.get("qa_train", []), 1, "concept_open_questions", data, augmentation, rng),
        _sentence_sources(data.neutral_sentences, 0, "neutral_sentences"),
        _sentence_sources(contrast[:CONTRAST_SENTENCES], 0, "other_concept_sentences"),
        _question_sources(mc(data.general.get("train", [])), 0, "other_questions", data, augmentation, rng),
        _question_sources(mc(data.questions.get("simdom_train", [])), 0, "simdom_questions", data, augmentation, rng),
        _question_sources(opened.get("simdom_train", []), 0, "simdom_open_questions", data, augmentation, rng),
    ]
    seen: set[str] = set()
    out = []
    for group in groups:
        for texts, label, name in group:
            # The data repeats some sentences; one copy each keeps held-out text unseen.
            if texts[0].text not in seen:
                seen.add(texts[0].text)
                out.append((texts, label, name))
    return out


def build_examples(data: ConceptData, seed: int = 42, augmentation: Augmentation = Augmentation(FORMS)) -> list[Example]:
    sources = _sources(data, seed, augmentation)
    positives = sum(1 for _, label, _ in sources if label == 1)
    if positives < MIN_POSITIVES:
        raise ObliviateError(
            f"Concept {data.concept!r} has {positives} positive examples (concept sentences, questions and prompts); "
            f"the prompt classifier needs at least {MIN_POSITIVES} (the benchmark has about 400). "
            "Add sentences with --concept-sentences FILE or questions with --questions FILE."
        )
    rng = random.Random(seed)
    examples = []
    for group in dict.fromkeys(g for _, _, g in sources):
        members = [(index, s) for index, s in enumerate(sources) if s[2] == group]
        rng.shuffle(members)
        cut1, cut2 = int(0.6 * len(members)), int(0.8 * len(members))
        for rank, (index, (texts, label, _)) in enumerate(members):
            split = SPLITS[0] if rank < cut1 else SPLITS[1] if rank < cut2 else SPLITS[2]
            examples.extend(Example(t.text, label, group, split, t.form, index) for t in texts)
    return examples


def encode(lm: LoadedModel, texts: list[str]) -> list[list[int]]:
    """Token ids as the model gets them (special tokens included)."""
    return [lm.tokenizer(t).input_ids for t in texts]


def prompt_ids(lm: LoadedModel, texts: list[str], marker: tuple[int, ...]) -> list[tuple[int, ...]]:
    """What the hook's classifier sees of each text: its tokens through the prompt marker."""
    return [tuple(ids[: prompt_length(ids, marker)]) for ids in encode(lm, texts)]


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


def source_units(flags: np.ndarray, examples: list[Example]) -> list[np.ndarray]:
    """``flags`` (one per example) grouped by source."""
    by_source: dict[int, list[bool]] = {}
    for flag, example in zip(flags, examples):
        by_source.setdefault(example.source, []).append(bool(flag))
    return [np.array(v) for v in by_source.values()]


def heldout_fpr(flags: np.ndarray, examples: list[Example], seed: int) -> dict:
    """False-positive rate on the held-out negatives with a 95% interval over sources, in
    all and per group."""
    negatives = [i for i, e in enumerate(examples) if e.label == 0]
    groups = dict.fromkeys(examples[i].group for i in negatives)
    per_group = {g: rate_interval(source_units(flags[[i for i in negatives if examples[i].group == g]],
                                               [examples[i] for i in negatives if examples[i].group == g]), seed)
                 for g in groups}
    return {"all": rate_interval(source_units(flags[negatives], [examples[i] for i in negatives]), seed),
            "groups": per_group}


def fit_classifier(lm: LoadedModel, data: ConceptData, config: EcoConfig, marker: tuple[int, ...] = ()):
    """Train one classifier per candidate layer on the fit part; keep the layer with the
    best recall on the calibration part at its calibrated threshold (ties: the earlier,
    cheaper layer). The held-out part is only used for the reported rates."""
    examples = build_examples(data, config.seed, Augmentation.of(config))
    layers = [config.layer] if config.layer else candidate_layers(lm.model)
    features = pooled_hidden_layers(lm.model, prompt_ids(lm, [e.text for e in examples], marker), layers,
                                    pooling=config.pooling)
    labels = np.array([e.label for e in examples])
    part = {s: np.array([e.split == s for e in examples]) for s in SPLITS}
    calibration_negatives = part["calibration"] & (labels == 0)
    calibration_positives = part["calibration"] & (labels == 1)
    best, layer_report = None, {}
    for layer in layers:
        classifier = train_logistic(features[layer][part["fit"]], labels[part["fit"]], layer, config.regularization,
                                    config.seed, group_weights([e for e, f in zip(examples, part["fit"]) if f]),
                                    config.pooling)
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
        "trained_forms": sorted(dict.fromkeys(e.form for e in examples if e.form != PLAIN)),
        "heldout": rates(scores[held], labels[held], classifier.threshold),
        "heldout_fpr": heldout_fpr(scores[held] >= classifier.threshold, held_examples, config.seed),
        "calibration_set": rates(scores[part["calibration"]], labels[part["calibration"]], classifier.threshold),
        "heldout_groups": group_rates(scores[held], held_examples, classifier.threshold),
    }
    return classifier, report, (scores[held], labels[held])


def _test_units(data: ConceptData, config: EcoConfig) -> dict[str, list[list[str]]]:
    """TEST prompts to measure recall on, one list of texts per question."""
    questions = [q.question for q in data.questions.get("qa_test", [])]
    held_out = {name: FORMS[name] for name in config.held_out_forms}
    trained = usable_forms(FORMS, config.held_out_forms) if config.forms_per_question else {}
    units = {
        "test_questions": [[scoring_prompt(q)] for q in questions],
        "test_questions_raw": [[q] for q in questions],
        "test_open_questions": [[scoring_prompt(q)] for q in open_questions(data).get("qa_test", [])],
        **{f"held_out_form:{name}": [[w.text for w in unit] for unit in every_form(questions, data.concept, {name: t})]
           for name, t in held_out.items()},
        "test_trained_forms": [[w.text for w in unit] for unit in every_form(questions, data.concept, trained)],
    }
    return {name: unit_list for name, unit_list in units.items() if unit_list and all(unit_list)}


def recall_report(lm: LoadedModel, classifier: PromptClassifier, data: ConceptData, config: EcoConfig,
                  marker: tuple[int, ...] = ()) -> dict[str, dict]:
    """The classifier's recall on TEST questions (plain, raw, open, in each held-out form,
    all held-out forms together, and in the trained forms) with 95% intervals over
    questions. Measured only: nothing is chosen on TEST."""
    units = _test_units(data, config)
    texts = [t for unit_list in units.values() for unit in unit_list for t in unit]
    flags = classifier.flags(lm.model, prompt_ids(lm, texts, marker)) if texts else np.array([], dtype=bool)
    sizes = [len(unit) for unit_list in units.values() for unit in unit_list]
    per_unit = iter(split_units(flags, sizes))
    flagged = {name: [next(per_unit) for _ in unit_list] for name, unit_list in units.items()}
    held_out = [name for name in flagged if name.startswith("held_out_form:")]
    if held_out:
        flagged["test_held_out_forms"] = [np.concatenate(parts) for parts in zip(*(flagged[n] for n in held_out))]
    return {name: rate_interval(unit_flags, config.seed) for name, unit_flags in flagged.items()}


def forget_accuracy(lm: LoadedModel, hook: EcoHook, questions: list[MCQuestion], scoring: str, seed: int) -> Objective:
    """S(sigma, draw): per-question correctness on ``questions`` with every prompt corrupted
    at strength sigma, by the noise of seed ``hook.corruption.seed + draw``."""
    prepared = prepare(lm, questions, scoring, seed)
    corruption = hook.corruption

    def objective(sigma: float, draw: int = 0) -> np.ndarray:
        hook.corruption = replace(corruption, strength=float(sigma), seed=corruption.seed + draw)
        hook.install(lm.model)
        try:
            return correct_from_scores(prepared, option_scores(lm, prepared)).astype(float)
        finally:
            hook.remove()

    return objective


@torch.no_grad()
def prompt_embedding_rms(lm: LoadedModel, texts: list[str]) -> float:
    """Root mean square of the prompt tokens' embeddings as the model uses them (after any
    scale): the size a corruption's sigma is measured against."""
    embed = lm.model.get_input_embeddings()
    device = embed.weight.device
    squares = [embed(torch.tensor([ids], device=device)).float().pow(2).mean() for ids in encode(lm, texts)]
    return float(torch.stack(squares).mean().sqrt())


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
        rms = prompt_embedding_rms(lm, [scoring_prompt(q.question) for q in questions])
        trace = learn_sigma(objective, config.zeroth_order(), progress, near_chance_sigma=config.near_chance_ratio * rms)
    finally:
        hook.force = saved
    trace.steps[0]["embedding_rms"] = rms
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
    """Fit ECO for one concept on ``lm``: train the classifier, calibrate its threshold,
    measure its recall on TEST questions, learn sigma."""
    say = progress or (lambda _m: None)
    say(f"classifier: {data.concept!r} on {lm.name}")
    marker = tuple(lm.tokenizer(config.prompt_marker, add_special_tokens=False).input_ids) if config.prompt_marker else ()
    classifier, report, heldout = fit_classifier(lm, data, config, marker)
    report["recall"] = recall_report(lm, classifier, data, config, marker)
    say(f"threshold {classifier.threshold:.4f}; held-out FPR {describe(report['heldout_fpr']['all'])}")
    for name in ("test_questions", "test_held_out_forms", "test_trained_forms"):
        if name in report["recall"]:
            say(f"recall {name}: {describe(report['recall'][name])}")
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

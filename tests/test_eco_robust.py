"""ECO on concepts it was not developed on (issue 16): augmented classifier positives,
recall with intervals, the robust sigma stop and the near-chance-base rule."""
from __future__ import annotations

import numpy as np
import pytest

from obliviate.attacks.adversarial import TEMPLATES
from obliviate.errors import ObliviateError
from obliviate.methods.eco.config import EcoConfig
from obliviate.methods.eco.fitting import PLAIN, Augmentation, build_examples, fit_classifier, recall_report
from obliviate.methods.eco.forms import FORMS, HELD_OUT_FORMS, fill, scoring_prompt
from obliviate.methods.eco.recall import rate_interval
from obliviate.methods.eco.sigma import ZerothOrderConfig, learn_sigma

from test_eco import answers

HELD = ("expert-roleplay", "fiction-framing")


def test_augmented_positives_hold_the_attack_forms_but_not_the_held_out_ones(small_concept):
    examples = build_examples(small_concept, augmentation=Augmentation(TEMPLATES, HELD, per_question=3))
    positives = [e for e in examples if e.label == 1]
    forms = {e.form for e in positives}
    assert forms - {PLAIN} == set(TEMPLATES) - set(HELD), "every trained attack form, no held-out one"
    question = small_concept.questions["qa_train"][0].question
    concept = small_concept.concept
    texts = {e.text for e in positives}
    wrapped = [e for e in positives if e.form != PLAIN and e.group == "concept_questions" and question in e.text]
    assert len(wrapped) == 3, "each training question gets per_question forms"
    for e in wrapped:
        assert e.text in {scoring_prompt(fill(TEMPLATES[e.form], question, concept)),
                          fill(TEMPLATES[e.form], scoring_prompt(question), concept)}
    for name in HELD:
        prefix = TEMPLATES[name].format(concept=concept)
        assert not any(prefix in t for t in texts), f"held-out template {name} leaked into training"
    # the open TRAIN questions are positives; TEST questions and the coherency prompts (what
    # fluency on concept text is measured on) are not
    groups = {e.group for e in positives}
    assert {"concept_open_questions", "concept_questions"} <= groups
    assert not any(q.question in t for q in small_concept.questions["qa_test"] for t in texts)
    assert small_concept.coherency_prompts and not set(small_concept.coherency_prompts) & {e.text for e in examples}
    # a source's texts (a question and its forms) all fall in one split
    splits: dict[int, set[str]] = {}
    for e in examples:
        splits.setdefault(e.source, set()).add(e.split)
    assert all(len(s) == 1 for s in splits.values())


def test_negatives_get_only_forms_that_do_not_name_the_concept(small_concept):
    examples = build_examples(small_concept, augmentation=Augmentation(TEMPLATES, (), per_question=5))
    negative_forms = {e.form for e in examples if e.label == 0} - {PLAIN}
    assert negative_forms == {n for n, t in TEMPLATES.items() if "{concept}" not in t}
    naming = [t.format(concept=small_concept.concept) for t in TEMPLATES.values() if "{concept}" in t]
    assert not any(prefix in e.text for prefix in naming for e in examples if e.label == 0)


def test_held_out_forms_are_validated_and_default_to_one_of_each_kind():
    assert set(HELD_OUT_FORMS) < set(FORMS)
    with pytest.raises(ObliviateError, match="--held-out-forms"):
        EcoConfig(held_out_forms=("no-such-form",))
    with pytest.raises(ObliviateError, match="stop rule"):
        EcoConfig(sigma_stop="sometimes")


def test_rate_interval_contains_its_point_and_counts_units():
    rng = np.random.default_rng(0)
    units = [rng.random(4) < 0.7 for _ in range(50)]
    r = rate_interval(units, seed=1)
    assert r["n"] == 50 and r["texts"] == 200
    assert r["low"] <= r["value"] <= r["high"] and r["high"] - r["low"] > 0.05
    assert r["value"] == pytest.approx(np.mean([u.mean() for u in units]))
    all_flagged = rate_interval([np.ones(2, bool)] * 10)
    assert (all_flagged["value"], all_flagged["low"], all_flagged["high"]) == (1.0, 1.0, 1.0)


def test_recall_report_on_a_tiny_model_has_intervals_around_the_point(tiny_lm, small_concept):
    config = EcoConfig(layer=2, forms_per_question=1, held_out_forms=("override", "curious"))
    classifier, report, _ = fit_classifier(tiny_lm, small_concept, config)
    assert set(report["trained_forms"]) == set(FORMS) - {"override", "curious"}
    fpr = report["heldout_fpr"]["all"]
    assert fpr["low"] <= fpr["value"] <= fpr["high"] and fpr["n"] > 0
    recall = recall_report(tiny_lm, classifier, small_concept, config)
    questions = len(small_concept.questions["qa_test"])
    assert {"test_questions", "test_questions_raw", "test_open_questions", "held_out_form:override",
            "held_out_form:curious", "test_held_out_forms", "test_trained_forms"} <= set(recall)
    for name, r in recall.items():
        assert r["low"] <= r["value"] <= r["high"], name
    assert recall["test_questions"]["n"] == questions and recall["test_questions"]["texts"] == questions
    assert recall["held_out_form:override"]["texts"] == 2 * questions, "both positions of the form"
    assert recall["test_held_out_forms"]["texts"] == 4 * questions
    plain = classifier.flags(tiny_lm.model, [tiny_lm.tokenizer(scoring_prompt(q.question)).input_ids
                                             for q in small_concept.questions["qa_test"]])
    assert recall["test_questions"]["value"] == pytest.approx(plain.mean())


def noisy(means: dict[float, tuple[float, ...]], default: float):
    """A synthetic S(sigma, draw): the accuracy of draw d at sigma is means[sigma][d]."""
    return lambda s, draw: answers(means[s][draw] if s in means else default)


def test_a_single_noisy_touch_of_chance_does_not_stop_the_search():
    config = ZerothOrderConfig(s0=1.0, steps=1)
    # at sigma 1 the first draw touches 0.22 but fresh noise gives 0.40 twice: not near chance
    objective = noisy({0.0: (0.6,) * 3, 1.0: (0.22, 0.40, 0.40)}, default=0.5)
    trace = learn_sigma(objective, config)
    check = next(step["check"] for step in trace.steps if "check" in step)
    assert check["draws"] == [0.22, 0.40, 0.40] and check["upper95"] > config.chance + config.bound_tolerance
    assert trace.stopped == "steps" and trace.sigma != 1.0, "the search went on past the touch"
    touch = learn_sigma(objective, ZerothOrderConfig(s0=1.0, steps=1, stop_rule="touch"))
    assert touch.stopped == "near_chance" and touch.sigma == 1.0, "the reference rule stops on the touch"


def test_the_search_stops_when_the_pooled_upper_bound_is_below_the_limit():
    objective = noisy({0.0: (0.6,) * 3, 1.0: (0.26, 0.24, 0.26)}, default=0.5)
    trace = learn_sigma(objective, ZerothOrderConfig(s0=1.0, steps=3))
    assert trace.stopped == "near_chance" and trace.sigma == 1.0
    check = trace.steps[-1]["check"]
    assert check["pooled"] == pytest.approx(0.2533, abs=1e-3) and check["upper95"] <= check["limit"]
    assert check["upper95"] > check["pooled"], "an upper bound, not the point"


def test_a_concept_known_at_chance_gets_the_documented_sigma_not_s0():
    calls = []

    def objective(s, draw):
        calls.append(s)
        return answers(0.30)  # base 0.30 on 50 questions: its 95% lower bound is below chance

    trace = learn_sigma(objective, ZerothOrderConfig(), near_chance_sigma=123.0)
    assert trace.stopped == "base_near_chance" and trace.sigma == 123.0 and calls == [0.0]
    assert "within noise of chance" in trace.steps[0]["note"]
    assert learn_sigma(objective, ZerothOrderConfig()).sigma == ZerothOrderConfig().s_max
    known = learn_sigma(lambda s, d: answers(0.5 if s == 0 else 0.2), ZerothOrderConfig(), near_chance_sigma=123.0)
    assert known.stopped == "near_chance" and known.sigma == ZerothOrderConfig().s0, "a known concept is searched"

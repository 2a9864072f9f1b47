"""Issue-12 evaluation: coherence on GENERAL prompts gates the grid, concept fluency is a
diagnostic, near-chance sets cannot veto, base methods use the reference's gates, coverage
and the continuous knowledge measure are right."""
import json

import numpy as np
import pytest
import torch

from obliviate.cli import main
from obliviate.config import EvalConfig
from obliviate.errors import ObliviateError
from obliviate.data.concepts import load_prompt_file, neutral_openings, sample_general_prompts
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.evaluation.evaluator import Evaluator, SplitOutcome
from obliviate.evaluation.metrics import Interval, erasure_statistic, harmonic, near_chance_sets, wilson_low
from obliviate.edits.protocol import EditDefaults
from obliviate.evaluation.multiple_choice import PreparedQuestions, correct_probability
from obliviate.pipeline.selection import NOTHING_TO_ERASE, ember_score, method_score


def outcome(near=frozenset(), **values) -> SplitOutcome:
    return SplitOutcome(metrics={k: Interval(v, v - 0.05, v + 0.05) for k, v in values.items()}, correct={},
                        near_chance=frozenset(near))


GOOD = dict(general_frac=1.0, qa_frac=0.2, efficacy=0.8, specificity=1.0, harmonic=0.89, score=0.92)


def test_the_gate_uses_general_coherence_not_the_concept_prompts():
    garbled_concept_text = outcome(coherence=0.97, concept_fluency=0.10, **GOOD)
    score, _, rejected = ember_score(garbled_concept_text, EvalConfig())
    assert (score, rejected) == (0.92, None)  # the concept set alone would have scored it 0
    score, _, _ = ember_score(garbled_concept_text, EvalConfig(gate_concept_fluency=True))
    assert score == 0.0
    assert ember_score(outcome(coherence=0.85, concept_fluency=1.0, **GOOD), EvalConfig())[0] == 0.0


def test_the_coherence_gate_can_judge_the_interval_low_end():
    """0.93 [0.88, 0.98]: over a 0.9 gate by its point, under it by its low end; the same
    reading for a saved grid's dict form, and for concept fluency when that is gated too."""
    from obliviate.evaluation.metrics import below_gate
    from obliviate.pipeline.selection import fails_coherence

    uncertain = outcome(coherence=0.93, concept_fluency=1.0, **GOOD)
    assert ember_score(uncertain, EvalConfig(coherence_gate_on="value"))[0] == 0.92
    assert ember_score(uncertain, EvalConfig())[0] == 0.0  # the default judges the low end
    assert not below_gate(Interval(0.93, 0.88, 0.98), 0.9) and below_gate(Interval(0.93, 0.88, 0.98), 0.9, "low")
    assert below_gate({"value": 0.93, "low": 0.88, "high": 0.98}, 0.9, "low") and not below_gate(None, 0.9, "low")
    saved = {"coherence": {"value": 1.0, "low": 1.0, "high": 1.0}, "concept_fluency": {"value": 0.93, "low": 0.88}}
    assert not fails_coherence(saved, EvalConfig(), 0.9)
    assert fails_coherence(saved, EvalConfig(gate_concept_fluency=True), 0.9)
    assert not fails_coherence(saved, EvalConfig(coherence_gate_on="value", gate_concept_fluency=True), 0.9)
    with pytest.raises(ObliviateError, match="coherence_gate_on must be value or low"):
        EvalConfig(coherence_gate_on="mid")


def test_ember_gate_rejects_lost_general_knowledge_unless_that_set_is_at_chance():
    lost = {**GOOD, "general_frac": 0.8}
    assert "general-knowledge fraction 0.800 < 0.9" in ember_score(outcome(coherence=1.0, **lost), EvalConfig())[2]
    score, _, rejected = ember_score(outcome({"general"}, coherence=1.0, **lost), EvalConfig())
    assert rejected is None and score == 0.92


def test_a_qa_set_at_chance_cannot_win():
    assert ember_score(outcome({"qa"}, coherence=1.0, **GOOD), EvalConfig())[2] == NOTHING_TO_ERASE
    assert method_score(outcome({"qa"}, **GOOD), EvalConfig())[2] == NOTHING_TO_ERASE


def test_base_method_gates_are_the_reference_grid_eval_kwargs():
    config = EvalConfig()
    assert method_score(outcome(**{**GOOD, "general_frac": 0.75}), config)[:2] == (0.89, pytest.approx(0.1 / 3.92))
    assert "0.650 < 0.7" in method_score(outcome(**{**GOOD, "general_frac": 0.65}), config)[2]
    assert "QA fraction 0.700 > 0.6" in method_score(outcome(**{**GOOD, "qa_frac": 0.7}), config)[2]


def test_wilson_interval_and_near_chance_flags():
    # p = 0.5, n = 50: Wilson low = 0.3664 (closed form, checked by hand).
    assert wilson_low(np.r_[np.ones(25), np.zeros(25)]) == pytest.approx(0.3664, abs=1e-3)
    base_at_chance = np.r_[np.ones(15), np.zeros(35)]  # 0.30: interval reaches 0.25
    base_known = np.r_[np.ones(30), np.zeros(20)]  # 0.60
    samples = {"qa": (base_known, base_known), "simdom": (base_at_chance, base_at_chance),
               "general": (base_known, base_known)}
    assert near_chance_sets(samples) == frozenset({"simdom"})


def test_specificity_leaves_out_a_near_chance_set():
    known, edited = np.r_[np.ones(6), np.zeros(4)], np.r_[np.ones(4), np.zeros(6)]  # 0.6 -> 0.4
    at_chance, dropped = np.r_[np.ones(3), np.zeros(7)], np.zeros(10)  # 0.3 -> 0.0: frac 0
    samples = {"qa": (known, edited), "simdom": (at_chance, dropped), "general": (known, known)}
    assert erasure_statistic(samples)["specificity"] == 0.0
    robust = erasure_statistic(samples, frozenset({"simdom"}))
    assert robust["specificity"] == 1.0 and robust["simdom_frac"] == 0.0
    assert robust["qa_drop"] == pytest.approx(0.2)


def test_probability_drop_and_concept_fluency_are_reported():
    ones = np.ones(4)
    samples = {"qa": (ones, ones, np.full(4, 0.8), np.full(4, 0.3)),
               "concept_fluency": (np.full(4, -3.0), np.full(4, -1.0), ones, ones)}
    out = erasure_statistic(samples)
    assert out["qa_prob_drop"] == pytest.approx(0.5)
    assert out["concept_fluency"] == pytest.approx(harmonic(np.exp(-2.0), 1.0))
    assert "coherence" not in out


def test_correct_probability_is_the_normalized_option_probability_at_a_common_length():
    # loglik scores are per character: 2 options of 2 and 4 characters, taken at their mean length 3.
    prepared = PreparedQuestions(questions=[type("Q", (), {"options": ("a", "b")})()], mode="loglik",
                                 answers=np.array([1]), items=[([], []), ([], [])], item_question=np.array([0, 0]),
                                 char_lengths=np.array([2.0, 4.0]), letter_ids=[], token_sets=[])
    per_char = np.array([[np.log(0.2) / 2, np.log(0.6) / 4]])
    a, b = np.exp(3 * np.log(0.2) / 2), np.exp(3 * np.log(0.6) / 4)
    assert correct_probability(prepared, per_char)[0] == pytest.approx(b / (a + b))
    # it ranks as the accuracy does: the higher per-character score has the larger probability
    assert (correct_probability(prepared, per_char)[0] > 0.5) == (per_char[0, 1] > per_char[0, 0])
    # equal per-character scores are chance, however long the options (no preference for short ones)
    assert correct_probability(prepared, np.array([[-1.0, -1.0]]))[0] == pytest.approx(0.5)


def test_general_prompts_are_other_concepts_open_questions(data_dir):
    prompts = sample_general_prompts(data_dir, "Gambling", 100, 42)
    assert len(prompts["train"]) == len(prompts["test"]) == 100
    assert len(set(prompts["train"])) == 100 and not set(prompts["train"]) & set(prompts["test"])
    gambling = json.loads((data_dir / "open_questions.json").read_text())["Gambling"]["QA_train"]
    assert not {f"Question: {q['q']}\nAnswer:" for q in gambling} & set(prompts["train"])
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prompts["train"])
    openings = neutral_openings(["one two three four five six", "a b c d"], 1)
    assert openings == {"train": ["one two three"], "test": ["a b c"]}


def test_prompt_files_alpaca_json_and_lines(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a fruit.", "input": ""},
                                  {"instruction": "Translate", "input": "bonjour"}]))
    prompts = load_prompt_file(alpaca, 0)
    assert sorted(prompts["train"] + prompts["test"]) == [
        "Instruction: Name a fruit.\nResponse:", "Instruction: Translate\nInput: bonjour\nResponse:"]
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond\nthird\n")
    assert sorted(sum(load_prompt_file(lines, 0).values(), [])) == ["first", "second", "third"]


@pytest.mark.parametrize("content, message", [
    ("", "holds 0 prompt(s)"),
    ("[{\"instruction\": 3}]", "item 0 needs a non-empty 'instruction'"),
    ("[1, 2", "is not valid JSON"),
    ("{\"a\": 1}", "must hold a list"),
])
def test_a_bad_prompts_file_exits_2_naming_it(tmp_path, tiny_model_dir, data_dir, capsys, content, message):
    bad = tmp_path / "prompts.json"
    bad.write_text(content)
    out = tmp_path / "out"
    code = main(["erase", "--concept", "Golf", "--data", str(data_dir), "--model", str(tiny_model_dir),
                 "--coherence-prompts", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and message in err
    assert not (out / "results.json").exists() and not (out / "model").exists()


def test_coverage_counts_questions_with_an_edited_token(tiny_lm, small_concept):
    small_concept.general_prompts = {"train": ["Question: What is golf?\nAnswer:", "The weather"], "test": []}
    config = EvalConfig(scoring="loglik", coherence_new_tokens=3, bootstrap=20)
    evaluator = Evaluator(tiny_lm, small_concept, config)
    qa = small_concept.questions["qa_train"]
    token = tiny_lm.tokenizer(f"Question: {qa[0].question}\nAnswer:").input_ids[-3]
    weight = tiny_lm.model.get_input_embeddings().weight
    patch = EmbeddingPatch(token_ids=torch.tensor([token]), original_rows=weight[[token]].detach().clone(),
                           edited_rows=weight[[token]].detach() + 1.0, metadata={})
    result = evaluator.evaluate("train", patch)
    expected = [token in set(tiny_lm.tokenizer(f"Question: {q.question}\nAnswer:").input_ids)
                or any(token in tiny_lm.tokenizer(f" {o}", add_special_tokens=False).input_ids for o in q.options)
                for q in qa]
    cover = result.coverage["qa"]
    assert cover["touched"] == sum(expected) >= 1 and cover["total"] == len(qa)
    assert cover["share"] == pytest.approx(sum(expected) / len(qa))
    touched = np.array(expected)
    assert cover["touched_accuracy"]["edited"]["value"] == pytest.approx(result.correct["qa"][1][touched].mean())
    assert result.coverage["general_prompts"]["total"] == 2
    assert {"prompt", "original", "edited"} <= set(result.examples["general"][0])
    assert "coherence" in result.metrics and "concept_fluency" in result.metrics


class EverythingChanged(EditDefaults):
    """The same edit, but claiming it may have changed anything: forces a full re-run."""

    def __init__(self, edit):
        self.edit = edit

    def apply(self, model):
        self.edit.apply(model)

    def revert(self, model):
        self.edit.revert(model)

    def changed_token_ids(self):
        return None


@pytest.mark.parametrize("scale", [0.5, 30.0])
def test_tied_edit_shortcut_matches_a_full_rerun(tiny_lm, small_concept, scale):
    """Editing a tied matrix changes the edited tokens' output rows: untouched inputs are
    corrected in closed form; the answers must equal running everything again."""
    from obliviate.models.loading import embeddings_are_tied

    assert embeddings_are_tied(tiny_lm.model)
    small_concept.general_prompts = {"train": ["The weather today", "Question: Who won?\nAnswer:", "In 1990 the"],
                                     "test": []}
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(scoring="loglik", coherence_new_tokens=6, bootstrap=20))
    weight = tiny_lm.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, weight.shape[0], (12,), generator=generator)
    rows = weight[tokens].detach().clone()
    patch = EmbeddingPatch(token_ids=tokens, original_rows=rows,
                           edited_rows=rows + scale * torch.randn(rows.shape, generator=generator), metadata={})
    fast = evaluator.evaluate("train", patch)
    full = evaluator.evaluate("train", EverythingChanged(patch))
    assert sum(fast.rescored.values()) < sum(full.rescored.values())  # the shortcut skipped work
    for name in full.correct:
        np.testing.assert_array_equal(fast.correct[name][1], full.correct[name][1])
        np.testing.assert_allclose(fast.correct[name][3], full.correct[name][3], atol=1e-4)
    for kind in full.prompt_rows:
        np.testing.assert_allclose(fast.prompt_rows[kind][0], full.prompt_rows[kind][0], atol=1e-4)
    assert torch.equal(weight[tokens], rows)  # reverted


def test_original_continuations_are_scored_from_their_generation_pass(tiny_lm):
    """The original's own continuations get their log-likelihood from the generation pass
    (the chosen token's log-probability); it must equal scoring them in a second pass."""
    from obliviate.evaluation import coherence as coh

    prompts = ["The weather today", "Question: Who won the cup?\nAnswer:", "In 1990 the", "A"]
    reference = coh.build_coherence_set(tiny_lm, prompts, 7)
    assert [len(s.top_logit) for s in reference.steps] == [min(len(c) + 1, 7) for c in reference.original_continuations]
    second_pass = coh.mean_loglik(tiny_lm, reference.prompt_ids, reference.original_continuations, coh.Batching())
    np.testing.assert_allclose(reference.original_ll, second_pass, atol=1e-4)


def test_base_method_grid_measures_coherence_on_its_top_cells_only():
    from obliviate.config import RunConfig
    from obliviate.pipeline.checkpoint import CandidateResult, RunCheckpoint
    from obliviate.pipeline.selection import choose, measure_top_coherence

    class CoherenceByEdit:
        calls: list = []

        def evaluate(self, split, edit, coherence=True, questions=True):
            self.calls.append((split, edit, coherence, questions))
            return outcome(coherence={"a": 0.97, "b": 0.60, "c": 0.99}[edit], concept_fluency=0.4)

    results = [CandidateResult({"lr": lr}, {"harmonic": {"value": s, "low": s, "high": s}}, s, 0.0, rejected)
               for lr, s, rejected in ((1, 0.5, None), (2, 0.8, None), (3, 0.9, "QA fraction 0.7 > 0.6"), (4, 0.7, None))]
    edits = ["d", "b", "x", "a"]
    evaluator = CoherenceByEdit()
    checkpoint = RunCheckpoint("run")
    measure_top_coherence("rmu", results, edits, evaluator, RunConfig(evaluation=EvalConfig(method_coherence_top=2)),
                          checkpoint)
    assert [c[1] for c in evaluator.calls] == ["b", "a"]  # the two best unrejected cells, best first
    assert all(c[2] and not c[3] for c in evaluator.calls)  # prompts only: the sweep scored the questions
    assert results[1].metrics["coherence"]["value"] == 0.60 and "coherence" not in results[0].metrics
    assert results[1].score == 0.8 and choose(results) == 1  # no coherence gate by default (reference)
    evaluator.calls.clear()
    gated = RunConfig(evaluation=EvalConfig(method_coherence_top=2, method_coherence_gate=0.9))
    measure_top_coherence("rmu", results, edits, evaluator, gated, checkpoint)
    assert evaluator.calls == []  # already measured: not run again
    assert results[1].score == 0.0 and choose(results) == 3


def test_coherence_alone_equals_the_full_evaluation_s_coherence(tiny_lm, small_concept):
    from obliviate.edits.weights import ParameterDelta

    small_concept.general_prompts = {"train": ["The weather today", "In 1990 the", "Question: Why?\nAnswer:"]}
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(bootstrap=50, coherence_new_tokens=6))
    name, weight = next((n, p) for n, p in tiny_lm.model.named_parameters() if "mlp.down_proj" in n)
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    edit = ParameterDelta(original={name: weight.detach().clone()}, new={name: weight.detach() + noise})
    full = evaluator.evaluate("train", edit)
    alone = evaluator.evaluate("train", edit, questions=False)
    for metric in ("coherence", "concept_fluency"):
        assert alone.metrics[metric].value == full.metrics[metric].value
    assert not alone.correct and "efficacy" not in alone.metrics
    assert alone.rescored["general_prompts"] == full.rescored["general_prompts"] > 0
    assert set(full.rescored) - set(alone.rescored) == set(full.correct)  # no question set ran


def test_continuations_the_edit_left_unchanged_keep_the_original_s_scores(tiny_lm, small_concept, monkeypatch):
    from obliviate.evaluation import coherence as coh

    small_concept.general_prompts = {"train": ["The weather today", "In 1990 the", "Question: Why?\nAnswer:"]}
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(bootstrap=20, coherence_new_tokens=6))
    reference = evaluator.prompt_set("train", "general")
    scored = []
    real = coh.mean_loglik
    monkeypatch.setattr(coh, "mean_loglik", lambda lm, prompts, texts, b: scored.append(len(texts)) or real(lm, prompts, texts, b))
    which = np.arange(len(reference.prompts))
    same = [list(c) for c in reference.original_continuations]
    rows = evaluator._coherence_rows(reference, which, same)
    assert scored == [] and np.array_equal(rows[0], reference.original_ll)  # nothing moved: nothing rescored
    moved = [same[0][:-1] + [(same[0][-1] + 1) % 50]] + same[1:]
    rows = evaluator._coherence_rows(reference, which, moved)
    assert scored == [1]  # only the continuation that changed
    expected = real(tiny_lm, [reference.prompt_ids[0]], moved[:1], coh.Batching())
    np.testing.assert_allclose(rows[0][0], expected[0], atol=1e-6)
    assert np.array_equal(rows[0][1:], reference.original_ll[1:])


def test_neutral_output_rows_shortcut_matches_a_full_rerun(tiny_lm, small_concept):
    """An untied model whose patch also sets the edited tokens' output rows (to the mean
    row): untouched inputs are corrected exactly, as for a tied edit."""
    from obliviate.models.loading import untie_output_embeddings

    untie_output_embeddings(tiny_lm.model)
    small_concept.general_prompts = {"train": ["The weather today", "In 1990 the"], "test": []}
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(scoring="loglik", coherence_new_tokens=6, bootstrap=20))
    weight = tiny_lm.model.get_input_embeddings().weight
    head = tiny_lm.model.get_output_embeddings().weight
    tokens = torch.randint(5, weight.shape[0], (12,), generator=torch.Generator().manual_seed(1))
    rows = weight[tokens].detach().clone()
    mean = head.detach().mean(dim=0).expand_as(rows).clone()
    patch = EmbeddingPatch(tokens, rows, rows * -5.0, {}, output_rows=mean, original_output_rows=head[tokens].detach().clone())
    head_before = head.detach().clone()
    fast = evaluator.evaluate("train", patch)
    full = evaluator.evaluate("train", EverythingChanged(patch))
    assert sum(fast.rescored.values()) < sum(full.rescored.values())
    for name in full.correct:
        np.testing.assert_array_equal(fast.correct[name][1], full.correct[name][1])
        np.testing.assert_allclose(fast.correct[name][3], full.correct[name][3], atol=1e-4)
    np.testing.assert_allclose(fast.prompt_rows["general"][0], full.prompt_rows["general"][0], atol=1e-4)
    assert torch.equal(head, head_before) and torch.equal(weight[tokens], rows)  # both reverted


def test_an_ember_grid_that_applies_nothing_says_why():
    from obliviate.evaluation.results import RunResults
    from obliviate.reports.markdown import no_candidate_chosen

    sweep = [{"params": {"delta": 0.5}, "metrics": {}, "score": 0.0, "rejected": NOTHING_TO_ERASE}]
    run = lambda delta: RunResults.from_dict({"delta": delta, "delta_sweep": sweep, "method": "ember"})  # noqa: E731
    assert no_candidate_chosen(run(0.0)).startswith(f"No delta was applied: {NOTHING_TO_ERASE}")
    assert no_candidate_chosen(run(5.0)) is None


def test_an_evaluation_with_progress_reports_each_part_and_measures_the_same(tiny_lm, small_concept, capsys):
    from obliviate.edits.weights import ParameterDelta

    small_concept.general_prompts = {"test": ["The weather today", "In 1990 the"]}
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(bootstrap=20, coherence_new_tokens=4, cache=False))
    name, weight = next((n, p) for n, p in tiny_lm.model.named_parameters() if "mlp.down_proj" in n)
    edit = ParameterDelta(original={name: weight.detach().clone()}, new={name: weight.detach() + 0.3})
    quiet = evaluator.evaluate("test", edit)
    assert capsys.readouterr().err == ""  # no progress unless asked
    shown = evaluator.evaluate("test", edit, progress=True)
    err = capsys.readouterr().err
    parts = 2 * (len(evaluator.question_sets("test")) + len(evaluator.prompts("test")))
    assert "test evaluation" in err and f"done, {parts} part in" in err  # off a terminal: a start and an end line
    assert {k: v.value for k, v in shown.metrics.items()} == {k: v.value for k, v in quiet.metrics.items()}

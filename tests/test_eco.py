"""ECO: the prompt classifier, the prefill-only hook, zeroth-order sigma, the artifact,
the CLI's bad-input paths, and (slow) the whole thing on the embedded model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from obliviate.cli import main
from obliviate.methods.eco import EcoArtifact
from obliviate.methods.eco import hook_of
from obliviate.methods.eco import unwrap
from obliviate.methods.eco import wrap
from obliviate.methods.eco.artifact import model_identity
from obliviate.methods.eco.artifact import probe_rows
from obliviate.methods.eco.classifier import PromptClassifier
from obliviate.methods.eco.classifier import calibrate_threshold
from obliviate.methods.eco.classifier import pooled_hidden
from obliviate.methods.eco.classifier import rates
from obliviate.methods.eco.classifier import train_logistic
from obliviate.methods.eco.corruption import Corruption
from obliviate.methods.eco.corruption import zero_out_top
from obliviate.methods.eco.fitting import MIN_POSITIVES, encode, scoring_prompt
from obliviate.methods.eco.fitting import build_examples
from obliviate.methods.eco.hook import EcoEdit
from obliviate.methods.eco.hook import EcoHook
from obliviate.methods.eco.hook import prompt_length
from obliviate.methods.eco.sigma import ZerothOrderConfig
from obliviate.methods.eco.sigma import learn_sigma
from obliviate.methods.eco.sigma import zeroth_order_step
from obliviate.errors import ObliviateError
from obliviate.models.layers import block_outputs

from conftest import make_tiny_lm

FLAG_WORD = " Potter"


def never_classifier(d: int, layer: int = 1) -> PromptClassifier:
    """A real classifier whose probability is ~0 for every prompt (runs its forward pass)."""
    return PromptClassifier(torch.zeros(d), torch.tensor([-50.0]), torch.zeros(d), torch.ones(d), layer, 0.5)


class WordHook(EcoHook):
    """Flags prompts containing a given token id: deterministic per-row decisions."""

    flag_id: int = -1

    def decide(self, model, prompts):
        return np.array([self.flag_id in p for p in prompts])


def word_hook(tok, d: int, **kwargs) -> WordHook:
    hook = WordHook(never_classifier(d), Corruption("gaussian", 0, 5.0, seed=1), **kwargs)
    hook.flag_id = tok(FLAG_WORD, add_special_tokens=False).input_ids[0]
    return hook


def left_batch(tok, texts):
    return tok(texts, padding=True, padding_side="left", return_tensors="pt")


def capture_embeddings(model):
    seen: list[torch.Tensor] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return seen, handle


def full_logits(model, batch):
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                     use_cache=False).logits


TEXTS = ["Harry Potter went to school", "the cat sat on the mat today", "a story about Potter and friends at night"]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_hook_corrupts_only_flagged_rows_real_tokens_but_last(tiny_tokenizer, arch):
    lm = make_tiny_lm(tiny_tokenizer, arch, tie=arch == "gemma3")
    batch = left_batch(tiny_tokenizer, TEXTS)
    plain_seen, handle = capture_embeddings(lm.model)
    plain_logits = full_logits(lm.model, batch)
    handle.remove()
    hook = word_hook(tiny_tokenizer, lm.model.config.hidden_size, pad_token_id=tiny_tokenizer.pad_token_id).install(lm.model)
    seen, handle = capture_embeddings(lm.model)  # registered after ECO's: sees its output
    hooked_logits = full_logits(lm.model, batch)
    handle.remove()
    hook.remove()
    assert hook.last_flags.tolist() == [True, False, True]
    before, after = plain_seen[0], seen[0]
    mask = batch.attention_mask.bool()
    for row in (0, 2):
        real = torch.nonzero(mask[row]).flatten()
        changed = (before[row] != after[row]).any(-1)
        assert changed[real[:-1]].all(), "every real prompt token but the last is corrupted"
        assert not changed[real[-1]] and not changed[~mask[row]].any(), "last token and padding untouched"
        assert not torch.equal(hooked_logits[row, -1], plain_logits[row, -1])
    assert torch.equal(after[1], before[1])
    assert torch.equal(hooked_logits[1], plain_logits[1]), "unflagged row must be bit-identical"


def test_unflagged_prompts_bit_identical_through_classifier_and_generate(tiny_lm, tiny_tokenizer):
    batch = left_batch(tiny_tokenizer, TEXTS)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    plain_logits = full_logits(tiny_lm.model, batch)
    plain_out = tiny_lm.model.generate(**batch, **kwargs)
    hook = EcoHook(never_classifier(32, layer=2), Corruption("gaussian", 0, 100.0)).install(tiny_lm.model)
    hooked_logits = full_logits(tiny_lm.model, batch)
    hooked_out = tiny_lm.model.generate(**batch, **kwargs)
    hook.remove()
    assert hook.stats.calls == 2 and hook.stats.flagged == 0 and hook.stats.corrupted_tokens == 0
    assert torch.equal(plain_logits, hooked_logits)
    assert torch.equal(plain_out, hooked_out)
    assert hook_of(tiny_lm.model) is None


def test_decoding_steps_never_corrupted(tiny_lm, tiny_tokenizer):
    batch = left_batch(tiny_tokenizer, TEXTS[:2])
    hook = EcoHook(never_classifier(32), Corruption("gaussian", 0, 50.0), force=True).install(tiny_lm.model)
    seen, handle = capture_embeddings(tiny_lm.model)
    out = tiny_lm.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    handle.remove()
    hook.remove()
    embed = tiny_lm.model.get_input_embeddings()
    width = batch.input_ids.shape[1]
    assert len(seen) == 4 and seen[0].shape[1] == width
    assert not torch.equal(seen[0], embed(batch.input_ids)), "the prefill is corrupted"
    for step, observed in enumerate(seen[1:]):
        assert observed.shape[1] == 1
        assert torch.equal(observed, embed(out[:, width + step: width + step + 1])), f"decode step {step} touched"
    assert hook.stats.calls == 1


def test_marker_limits_corruption_to_question(tiny_lm, tiny_tokenizer):
    marker = tuple(tiny_tokenizer("\nAnswer:", add_special_tokens=False).input_ids)
    context = tiny_tokenizer("Question: who is Harry Potter?\nAnswer:").input_ids
    option = tiny_tokenizer(" a wizard", add_special_tokens=False).input_ids
    assert prompt_length(context + option, marker) == len(context)
    assert prompt_length([5, 6, 7], marker) == 3
    ids = torch.tensor([context + option])
    plain_seen, handle = capture_embeddings(tiny_lm.model)
    full_logits(tiny_lm.model, type("B", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})())
    handle.remove()
    hook = EcoHook(never_classifier(32), Corruption("sign_flip"), marker, force=True).install(tiny_lm.model)
    seen, handle = capture_embeddings(tiny_lm.model)
    full_logits(tiny_lm.model, type("B", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})())
    handle.remove()
    hook.remove()
    changed = (plain_seen[0][0] != seen[0][0]).any(-1)
    assert changed[: len(context) - 1].all()
    assert not changed[len(context) - 1:].any(), "the last prompt token and the option are left alone"


def test_corruptions_shapes_and_determinism():
    x = torch.randn(4, 10)
    g = Corruption("gaussian", 3, 2.0, seed=7)
    assert torch.equal(g(x), g(x)) and torch.equal(g(x)[:, 3:], x[:, 3:]) and not torch.equal(g(x)[:, :3], x[:, :3])
    z = zero_out_top(x, 2)
    assert ((z == 0).sum(-1) == 2).all()
    assert torch.equal(z.abs().max(-1).values, x.abs().sort(-1).values[:, -3])
    assert torch.equal(Corruption("sign_flip", 0)(x), -x)
    with pytest.raises(ObliviateError):
        Corruption("blur")


def test_zeroth_order_step_moves_sigma_the_right_way():
    config = ZerothOrderConfig()
    decreasing = lambda s: max(0.25, 0.9 - 0.01 * s)  # more noise, less accuracy: sigma must grow
    new, record = zeroth_order_step(decreasing, 0.1, config)
    assert record["gradient"] == pytest.approx(-0.01) and new == pytest.approx(0.1 + 100 * 0.01)
    increasing = lambda s: 0.3 + 0.01 * s  # "more noise helps": sampling noise, so grow as when flat
    new, _ = zeroth_order_step(increasing, 0.1, config)
    assert new == pytest.approx(1.0)
    new, _ = zeroth_order_step(lambda s: 0.8, 0.1, config)  # flat: grow instead of standing still
    assert new == pytest.approx(1.0)


def answers(accuracy: float, n: int = 50) -> np.ndarray:
    """n questions of which round(accuracy * n) are answered correctly."""
    return (np.arange(n) < round(accuracy * n)).astype(float)


def test_learn_sigma_stops_near_chance_on_a_toy_accuracy_curve():
    curve = lambda s: 0.25 + 0.55 / (1 + (s / 3.0) ** 2)  # falls from 0.8 to chance around s ~ 3
    trace = learn_sigma(lambda s, draw: answers(curve(s)), ZerothOrderConfig(lr=10.0, steps=30))
    assert trace.stopped == "near_chance" and trace.objective <= 0.30 and trace.sigma > 3.0
    sigmas = [step["sigma"] for step in trace.steps if "gradient" in step]
    assert sigmas == sorted(sigmas)


def test_threshold_calibration_controls_false_positives():
    negatives = np.linspace(0.0, 0.99, 100)
    threshold = calibrate_threshold(negatives, target_fpr=0.05)
    assert (negatives >= threshold).mean() <= 0.05 and (negatives >= threshold).mean() >= 0.04
    conformal = calibrate_threshold(negatives, alpha=0.1)
    assert conformal > negatives[np.ceil(101 * 0.9).astype(int) - 2]
    assert (negatives >= conformal).mean() <= 0.1
    r = rates(np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 1, 0, 0]), 0.5)
    assert r["fpr"] == 0.5 and r["fnr"] == 0.5
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ObliviateError, match="between 0 and 1"):
            PromptClassifier(torch.zeros(2), torch.zeros(1), torch.zeros(2), torch.ones(2), 1, bad)


def test_classifier_separates_hidden_states_and_hook_uses_it(tiny_lm, tiny_tokenizer):
    pos = [f"Harry Potter and the wizard {w}" for w in ("wand", "castle", "owl", "spell", "broom", "cloak")] * 3
    neg = [f"the price of {w} rose in the market" for w in ("bread", "oil", "gold", "corn", "rice", "wool")] * 3
    ids = [tiny_tokenizer(t).input_ids for t in pos + neg]
    features = pooled_hidden(tiny_lm.model, ids, layer=2)
    assert features.shape == (36, 32)
    single = pooled_hidden(tiny_lm.model, ids[:1], layer=2)
    assert torch.allclose(single[0], features[0], atol=1e-5), "padding does not change a prompt's features"
    classifier = train_logistic(features, np.array([1] * 18 + [0] * 18), layer=2)
    scores = classifier.score(tiny_lm.model, ids)
    assert (scores[:18] > 0.5).all() and (scores[18:] < 0.5).all()
    hook = EcoHook(classifier, Corruption("gaussian", 0, 10.0)).install(tiny_lm.model)
    full_logits(tiny_lm.model, left_batch(tiny_tokenizer, [pos[0], neg[0]]))
    hook.remove()
    assert hook.last_flags.tolist() == [True, False]


def test_mean_max_pooling_keeps_a_question_behind_a_long_wrapper(tiny_lm, tiny_tokenizer):
    ids = [tiny_tokenizer(t).input_ids for t in ("the wizard cast a spell",
                                                 "the train was late again and the coffee had gone cold " * 3)]
    both = pooled_hidden(tiny_lm.model, ids, layer=2, pooling="mean+max")
    mean = pooled_hidden(tiny_lm.model, ids, layer=2)
    assert both.shape == (2, 64) and torch.allclose(both[:, :32], mean, atol=1e-6)
    hidden = block_outputs(tiny_lm.model, [1], input_ids=torch.tensor([ids[0]]))[1][0].float()
    assert torch.allclose(both[0, 32:], hidden.amax(0), atol=1e-5), "the max is over the prompt's own tokens"
    assert torch.allclose(pooled_hidden(tiny_lm.model, ids[:1], layer=2, pooling="mean+max")[0], both[0], atol=1e-5), \
        "left padding enters neither statistic"
    classifier = train_logistic(both, np.array([1, 0]), layer=2, pooling="mean+max")
    assert classifier.pooling == "mean+max" and classifier.score(tiny_lm.model, ids).shape == (2,)
    with pytest.raises(ObliviateError, match="pooling must be one of"):
        pooled_hidden(tiny_lm.model, ids, layer=2, pooling="max")


def artifact_for(lm, threshold=0.7, pooling="mean") -> EcoArtifact:
    d = lm.model.config.hidden_size * (2 if pooling == "mean+max" else 1)
    classifier = PromptClassifier(torch.randn(d), torch.zeros(1), torch.zeros(d), torch.ones(d), 1, threshold, pooling)
    return EcoArtifact(classifier, Corruption("gaussian", 0, 3.0), lm.name, lm.source, model_identity(lm.model),
                       probe_rows(lm.model), (5, 6), 0, {"concept": "Harry Potter"})


def test_artifact_round_trip_and_wrong_model_refused(tiny_lm, tiny_tokenizer, tmp_path):
    artifact = artifact_for(tiny_lm)
    artifact.save(tmp_path / "eco")
    assert {p.name for p in (tmp_path / "eco").iterdir()} == {"config.json", "classifier.safetensors"}
    loaded = EcoArtifact.load(tmp_path / "eco")
    assert torch.equal(loaded.classifier.weight, artifact.classifier.weight)
    assert loaded.classifier.threshold == 0.7 and loaded.corruption == artifact.corruption
    assert loaded.marker_ids == (5, 6) and loaded.info["concept"] == "Harry Potter"
    wrapped = wrap(tiny_lm, tmp_path / "eco")
    assert wrapped.model is tiny_lm.model and hook_of(wrapped).installed
    with pytest.raises(ObliviateError, match="already has an ECO hook"):
        wrap(tiny_lm, tmp_path / "eco")
    unwrap(wrapped)
    assert hook_of(tiny_lm.model) is None
    bare = wrap(tiny_lm.model, tmp_path / "eco")  # a bare transformers model works too
    unwrap(bare)
    other = make_tiny_lm(tiny_tokenizer, "gemma3", seed=1)
    other.name = "other-model"
    with pytest.raises(ObliviateError, match=r"made for model tiny-gemma3 .*not for other-model"):
        wrap(other, tmp_path / "eco")
    with pytest.raises(ObliviateError, match="not an ECO artifact"):
        wrap(tiny_lm, tmp_path)


def test_artifact_keeps_its_pooling_and_refuses_tensors_of_another_width(tiny_lm, tmp_path):
    artifact_for(tiny_lm, pooling="mean+max").save(tmp_path / "eco")
    loaded = EcoArtifact.load(tmp_path / "eco")
    assert loaded.classifier.pooling == "mean+max" and loaded.classifier.weight.shape == (2 * tiny_lm.model.config.hidden_size,)
    config = json.loads((tmp_path / "eco" / "config.json").read_text())
    config["classifier"]["pooling"] = "mean"  # tensors twice as wide as a mean-pooled classifier's
    (tmp_path / "eco" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ObliviateError, match="damaged ECO artifact.*weight"):
        EcoArtifact.load(tmp_path / "eco")
    artifact_for(tiny_lm).save(tmp_path / "old")  # an artifact from before pooling was a setting reads as mean
    old = json.loads((tmp_path / "old" / "config.json").read_text())
    del old["classifier"]["pooling"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert EcoArtifact.load(tmp_path / "old").classifier.pooling == "mean"


def test_eco_edit_under_evaluator_leaves_model_clean(tiny_lm, small_concept):
    from obliviate.config import EvalConfig
    from obliviate.evaluation.evaluator import Evaluator

    config = EvalConfig(scoring="loglik", coherence_new_tokens=4, neutral_coherence_prompts=1, bootstrap=10)
    evaluator = Evaluator(tiny_lm, small_concept, config)
    never = EcoEdit(EcoHook(never_classifier(32), Corruption("gaussian", 0, 1e3)))
    outcome = evaluator.evaluate("test", never)
    for name in ("qa", "simdom", "general"):
        base, edited = outcome.correct[name][:2]
        assert np.array_equal(base, edited), f"{name}: nothing flagged must change nothing"
    assert outcome.value("concept_fluency") == 1.0
    assert never.changed_token_ids() is None and hook_of(tiny_lm.model) is None
    always = EcoEdit(EcoHook(never_classifier(32), Corruption("gaussian", 0, 1e3), force=True))
    evaluator.evaluate("test", always)
    assert always.hook.stats.corrupted_tokens > 0


def test_too_few_sentences_is_a_clear_error(small_concept):
    small_concept.concept_sentences = small_concept.concept_sentences[:10]
    small_concept.questions["qa_train"] = small_concept.questions["qa_train"][:3]
    small_concept.coherency_prompts, small_concept.data_dir = [], None  # no prompts, no open questions
    with pytest.raises(ObliviateError, match=rf"13 positive examples .* at least {MIN_POSITIVES}"):
        build_examples(small_concept)


def test_examples_split_without_leaking_question_formats(data_dir):
    from obliviate.data.concepts import load_benchmark_concept

    data = load_benchmark_concept("Golf", data_dir, general_questions=20)
    examples = build_examples(data)
    by_text = {}
    for e in examples:
        key = e.text.removeprefix("Question: ").removesuffix("\nAnswer:")
        by_text.setdefault((key, e.group), set()).add(e.split)
    assert all(len(splits) == 1 for splits in by_text.values())
    groups = {e.group for e in examples if e.label == 0}
    assert {"simdom_questions", "neutral_sentences", "other_questions"} <= groups


def test_cli_bad_input_exit_2(tmp_path, capsys, tiny_lm):
    assert main(["eco", "fit", "--concept", "Golf", "--out", str(tmp_path), "--threshold", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["eco", "fit", "--concept", "Golf", "--out", str(tmp_path), "--target-fpr", "0"]) == 2
    assert main(["eco", "generate", "--eco", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "not an ECO artifact" in capsys.readouterr().err


def test_cli_fit_and_generate_on_a_tiny_model_folder(tiny_lm, data_dir, tmp_path, capsys):
    tiny_lm.model.save_pretrained(tmp_path / "model")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "eco"
    args = ["eco", "fit", "--model", str(tmp_path / "model"), "--concept", "Golf", "--data", str(data_dir),
            "--out", str(out), "--sigma", "2.0", "--general-questions", "40", "--layer", "2"]
    assert main(args) == 0
    assert {"config.json", "classifier.safetensors", "calibration.png", "sigma.png"} <= {p.name for p in out.iterdir()}
    artifact = EcoArtifact.load(out)
    assert artifact.corruption.strength == 2.0 and artifact.classifier.layer == 2
    report = artifact.info["classifier_report"]
    assert 0 <= report["heldout"]["fpr"] <= 1 and report["examples"]["heldout"] > 50
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["eco", "generate", "--eco", str(out), "--model", str(tmp_path / "model"), "--prompt",
                 "Golf is a sport", "--max-new-tokens", "3", "--compare"]) == 0
    assert "flagged:" in capsys.readouterr().out


@pytest.mark.slow
def test_eco_on_the_embedded_model(embedded_lm, data_dir, tmp_path):
    """Real model: the classifier separates held-out concept prompts, and corrupting the
    train questions at the learned sigma brings accuracy near chance."""
    from obliviate.data.concepts import load_benchmark_concept
    from obliviate.methods.eco import EcoConfig
    from obliviate.methods.eco.fitting import fit
    from obliviate.pipeline.eco import side_effects

    data = load_benchmark_concept("Gambling", data_dir, general_questions=100)
    artifact = fit(embedded_lm, data, EcoConfig(zo_steps=4)).artifact
    report = artifact.info["classifier_report"]
    # measured 0.023 / 0.062 (World War II, the hardest concept, has FNR ~0.3)
    assert report["heldout"]["fpr"] <= 0.05 and report["heldout"]["fnr"] <= 0.2
    search = artifact.info["sigma_search"]
    assert search["objective"] < search["steps"][0]["objective"], "corruption lowers forget accuracy"
    hook = EcoHook(artifact.classifier, artifact.corruption, artifact.marker_ids, artifact.pad_token_id)
    effects = side_effects(hook, embedded_lm, data.questions["simdom_test"][:20], "auto", 42)
    assert effects["unflagged"] > 0 and effects["unflagged_identical"] == effects["unflagged"]


def test_evaluate_reports_eco_ember_and_exact_side_effects(tiny_lm, small_concept, tmp_path):
    from obliviate.config import EvalConfig
    from obliviate.edits.embedding import EmbeddingPatch
    from obliviate.pipeline.eco import evaluate

    weight = tiny_lm.model.get_input_embeddings().weight.detach()
    ids = torch.tensor([10, 11, 12])
    patch = EmbeddingPatch(ids, weight[ids].clone(), weight[ids].clone() + 1.0, {"model": "tiny", "embeddings_untied": "True"})
    patch.save(tmp_path / "patch.safetensors")
    artifact = artifact_for(tiny_lm, threshold=0.5)
    config = EvalConfig(scoring="loglik", coherence_new_tokens=3, neutral_coherence_prompts=1, bootstrap=5)
    results = evaluate(tiny_lm, small_concept, artifact, config, ember_patch=tmp_path / "patch.safetensors")
    assert {"eco", "ember", "ember+eco", "classifier", "side_effects", "classifier_under_ember"} <= set(results)
    effects = results["side_effects"]
    assert effects["unflagged"] > 0, "some prompts must pass unflagged, or the next check is vacuous"
    assert effects["unflagged_identical"] == effects["unflagged"] and effects["max_abs_difference"] == 0.0
    prompts = [scoring_prompt(q.question) for q in small_concept.questions["qa_test"]]
    hook = artifact.hook()
    prompt_ids = [tuple(t[: prompt_length(t, hook.marker_ids)]) for t in encode(tiny_lm, prompts)]
    scores = hook.prompt_scores(tiny_lm.model, prompt_ids)
    expected = float(np.mean(scores >= artifact.classifier.threshold))
    assert results["classifier"]["recall_test_questions"] == pytest.approx(expected)
    assert hook_of(tiny_lm.model) is None
    assert torch.equal(tiny_lm.model.get_input_embeddings().weight[ids], weight[ids]), "patch reverted"


def test_evaluator_reruns_only_what_the_hook_flags_and_keeps_the_rest_exact(tiny_lm, tiny_tokenizer, small_concept,
                                                                             monkeypatch):
    """Prompts the classifier does not flag run bit-identical to the plain model, so the
    Evaluator keeps the original's answers for them and runs only the flagged questions and
    prompts again; the numbers equal a run that scores everything again."""
    from obliviate.config import EvalConfig
    from obliviate.evaluation.evaluator import Evaluator

    config = EvalConfig(scoring="loglik", coherence_new_tokens=4, neutral_coherence_prompts=1, bootstrap=10, cache=False)
    hook = word_hook(tiny_tokenizer, 32)
    edit = EcoEdit(hook)
    evaluator = Evaluator(tiny_lm, small_concept, config)
    flagged = {}  # questions with the flagged word in their context or in an option (no marker here)
    for name in evaluator.question_sets("test"):
        prepared = evaluator._prepared_set("test", name)
        flagged[name] = len({int(prepared.item_question[i]) for i, (c, x) in enumerate(prepared.items)
                             if hook.flag_id in c + x})
    outcome = evaluator.evaluate("test", edit)
    assert 0 < flagged["qa"] == outcome.rescored["qa"]
    assert all(outcome.rescored[name] == flagged[name] for name in flagged)
    assert outcome.rescored["general"] < len(evaluator.question_sets("test")["general"])
    monkeypatch.delattr(EcoEdit, "affected")
    everything = Evaluator(tiny_lm, small_concept, config).evaluate("test", EcoEdit(word_hook(tiny_tokenizer, 32)))
    assert everything.rescored["general"] == len(evaluator.question_sets("test")["general"])
    for name, rows in outcome.correct.items():
        np.testing.assert_array_equal(rows[1], everything.correct[name][1], err_msg=name)
        np.testing.assert_allclose(rows[3], everything.correct[name][3], rtol=1e-5, atol=1e-6, err_msg=name)
    for kind, rows in outcome.prompt_rows.items():
        np.testing.assert_allclose(rows[0], everything.prompt_rows[kind][0], rtol=1e-5, atol=1e-6, err_msg=kind)


def test_an_eco_erase_folder_loads_as_the_original_with_its_hook(tiny_model_dir, tmp_path):
    """`attack` and `eval` on an erase run whose edit is ECO's hook: no model/ is written (it
    would be the original), so the recorded original is loaded and the saved hook installed."""
    from obliviate.io import write_json
    from obliviate.models.loading import load_model
    from obliviate.pipeline.pair import erase_run_info, load_erased

    original = load_model(str(tiny_model_dir))
    folder = tmp_path / "run"
    artifact_for(original).save(folder / "eco")
    write_json(folder / "results.json", {"kind": "erase", "method": "eco", "model": str(tiny_model_dir)})
    spec, recorded = erase_run_info(str(folder))
    assert spec == str(folder) and recorded["method"] == "eco"
    erased = load_erased(spec, recorded)
    hook = hook_of(erased)
    assert hook is not None and hook.installed and hook_of(original) is None
    assert all(torch.equal(a, b) for a, b in zip(erased.model.state_dict().values(), original.model.state_dict().values()))

"""Attack battery: registry, every attack's shapes, relearning's copy/resume/determinism,
and (slow) relearning on the embedded model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from obliviate import attacks
from obliviate.attacks.common import AttackContext, splice_prefix
from obliviate.attacks.relearning import Config as RelearnConfig, epoch_order, relearn
from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import knowledge_fraction
from obliviate.evaluation.multiple_choice import prepare
from obliviate.models.loading import parameter_fingerprints

from conftest import make_tiny_lm


@pytest.fixture
def ctx(tiny_tokenizer, small_concept, data_dir, tmp_path):
    models = {"original": make_tiny_lm(tiny_tokenizer, seed=0), "erased": make_tiny_lm(tiny_tokenizer, seed=1, tie=False)}
    return AttackContext(models=models, data=small_concept, data_dir=data_dir, bootstrap=50, out=tmp_path, progress=False)


def _interval_ok(x: dict) -> bool:
    return set(x) == {"value", "low", "high"} and 0 <= x["low"] <= x["value"] <= x["high"] <= 1


def test_registry_lists_valid_names_on_error():
    assert attacks.available() == ["relearn", "relearn-strong", "in-context", "adversarial", "probe",
                                   "tied-restore", "embedding-repair", "repair-relearn", "weights-only", "gcg", "respell",
                                   "quantize",
                                   "finetune-unrelated", "finetune-retain", "relearn-sweep", "ablate-direction",
                                   "logit-lens"]
    with pytest.raises(ObliviateError, match="relearn, relearn-strong, in-context, adversarial, probe, tied-restore"):
        attacks.parse_names("relearn,jailbreak")
    assert attacks.parse_names("probe, relearn,probe") == ["probe", "relearn"]
    with pytest.raises(ValueError):
        attacks.register("relearn", "x")
    with pytest.raises(ObliviateError, match="paragraphs"):
        attacks.make_config("relearn", {"paragraphs": 0})


def test_every_attack_runs_with_expected_shapes(ctx):
    n_layers = ctx.models["original"].model.config.num_hidden_layers
    settings = {"relearn": {"paragraphs": 3, "epochs": 2, "max_length": 24}, "in-context": {"k": 2},
                "adversarial": {}, "probe": {"sentences": 12, "max_length": 16}}
    before = {role: parameter_fingerprints(lm.model) for role, lm in ctx.models.items()}
    results = {name: attacks.run(name, ctx, settings[name]) for name in settings}  # white-box: test_white_box.py
    for role in ("original", "erased"):
        relearned = results["relearn"][role]
        assert len(relearned["curve"]) == 3 and len(relearned["losses"]) == 2
        assert relearned["curve"][0] == relearned["before"] and relearned["curve"][-1] == relearned["after"]
        assert all(_interval_ok(c) for c in relearned["curve"])
        assert _interval_ok(results["in-context"][role]["after"])
        adversarial = results["adversarial"][role]
        assert set(adversarial["per_template"]) == set(attacks.get("adversarial").TEMPLATES)
        worst = adversarial["per_template"][adversarial["worst_template"]]["value"]
        assert worst == max(t["value"] for t in adversarial["per_template"].values()) == adversarial["after"]["value"]
        probe, held_out = results["probe"][role], results["probe"]["settings"]["test"]
        assert len(probe["per_layer"]) == n_layers + 1
        # each layer's accuracy is a share of the held-out sentences; "after" is the best layer's
        assert all(0 <= a <= 1 and a * held_out == pytest.approx(round(a * held_out)) for a in probe["per_layer"])
        assert probe["best_layer"] == int(np.argmax(probe["per_layer"]))
        assert probe["after"]["value"] == pytest.approx(max(probe["per_layer"]))
        # the caller's models are never changed by any attack
        assert all(torch.equal(before[role][k], v) for k, v in parameter_fingerprints(ctx.models[role].model).items())
    for name in ("relearn", "in-context", "adversarial"):
        # the share of the original's above-chance knowledge the attacked erased model has
        recovered = results[name]["recovered_frac"]
        assert _interval_ok(recovered)
        assert recovered["value"] == pytest.approx(knowledge_fraction(results[name]["erased"]["after"]["value"],
                                                                      results[name]["original"]["before"]["value"]))
    # checkpoints of a finished relearning attack keep only the small state file
    assert not list((ctx.out / "checkpoints" / "relearn" / "erased").glob("epoch-*"))


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, 42, 0)) == list(range(10))
    assert epoch_order(10, 42, 0) == epoch_order(10, 42, 0)
    assert epoch_order(10, 42, 0) != epoch_order(10, 42, 1)


def _relearn_setup(ctx):
    lm = ctx.models["erased"]
    prepared = prepare(lm, ctx.test_questions(), "loglik", ctx.seed)
    from obliviate.attacks.common import correct_on

    paragraphs = [s for s in ctx.data.concept_sentences[:4]]
    evaluate = lambda m: correct_on(m, prepared, ctx.batching)  # noqa: E731
    return lm, paragraphs, evaluate


def test_relearning_learns_and_is_deterministic(ctx, tmp_path):
    lm, paragraphs, evaluate = _relearn_setup(ctx)
    config = RelearnConfig(paragraphs=4, epochs=2, lr=3e-3, max_length=24)
    first = relearn(lm, paragraphs, config, evaluate, seed=3, progress=False)
    again = relearn(lm, paragraphs, config, evaluate, seed=3, progress=False)
    assert first[1]["loss"] < first[0]["loss"]  # fine-tuning on the text lowers its loss
    assert [e["loss"] for e in first] == [e["loss"] for e in again]
    assert [e["correct"] for e in first] == [e["correct"] for e in again]


def test_interrupted_relearning_resumes_to_the_same_numbers(ctx, tmp_path):
    lm, paragraphs, evaluate = _relearn_setup(ctx)
    config = RelearnConfig(paragraphs=4, epochs=3, lr=3e-3, max_length=24)
    straight = relearn(lm, paragraphs, config, evaluate, seed=5, checkpoint_dir=tmp_path / "a", progress=False)
    calls = {"n": 0}

    def dies_in_epoch_two(model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(model)

    with pytest.raises(KeyboardInterrupt):
        relearn(lm, paragraphs, config, dies_in_epoch_two, seed=5, checkpoint_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "epoch-1" / "model.safetensors").exists()
    assert not list((tmp_path / "b").glob("*.partial"))
    calls["n"] = 0
    resumed = relearn(lm, paragraphs, config, evaluate, seed=5, checkpoint_dir=tmp_path / "b", progress=False)
    assert [e["epoch"] for e in resumed] == [1, 2, 3]
    assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in straight], abs=1e-6)
    assert [e["correct"] for e in resumed] == [e["correct"] for e in straight]


def test_splice_prefix_keeps_questions_and_order(ctx):
    lm = ctx.models["original"]
    prepared = prepare(lm, ctx.test_questions(), "loglik", ctx.seed)
    spliced = splice_prefix(lm, prepared, "Some text about wizards.\n\n")
    prefix = lm.tokenizer("Some text about wizards.\n\n", add_special_tokens=False).input_ids
    assert np.array_equal(spliced.answers, prepared.answers)
    for (ctx_a, cont_a), (ctx_b, cont_b) in zip(prepared.items, spliced.items):
        assert cont_a == cont_b and ctx_b == ctx_a[:1] + prefix + ctx_a[1:]


@pytest.mark.slow
def test_relearning_on_embedded_model_trains_a_copy(embedded_lm, data_dir):
    """Five paragraphs, one epoch: a real LM's loss on the concept's text (far below the
    uniform ln(262144) = 12.5) and the embedded model itself left untouched."""
    from obliviate.data.concepts import load_benchmark_concept

    data = load_benchmark_concept("Harry Potter", data_dir, general_questions=8)
    data.questions["qa_test"] = data.questions["qa_test"][:10]
    ctx = AttackContext(models={"erased": embedded_lm}, data=data, data_dir=data_dir, bootstrap=50, progress=False)
    before = parameter_fingerprints(embedded_lm.model)
    result = attacks.run("relearn", ctx, {"paragraphs": 5, "epochs": 1, "max_length": 128})
    assert len(result["erased"]["curve"]) == 2 and np.isfinite(result["erased"]["losses"][0])
    assert result["erased"]["losses"][0] < 6.0  # measured 4.60: a real LM on fluent text, not random
    assert all(torch.equal(before[k], v) for k, v in parameter_fingerprints(embedded_lm.model).items())


@pytest.mark.slow
def test_probe_on_embedded_model_reads_the_concept(embedded_lm, data_dir):
    """A real LM separates Harry Potter sentences from Wikipedia ones far above chance."""
    from obliviate.data.concepts import load_benchmark_concept

    data = load_benchmark_concept("Harry Potter", data_dir, general_questions=8)
    ctx = AttackContext(models={"original": embedded_lm}, data=data, data_dir=data_dir, bootstrap=50, progress=False)
    result = attacks.run("probe", ctx, {"sentences": 40, "max_length": 48})
    layers = result["original"]["per_layer"]
    assert len(layers) == embedded_lm.model.config.num_hidden_layers + 1
    assert max(layers) >= 0.85 and result["original"]["after"]["value"] == max(layers)

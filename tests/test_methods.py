"""Trained methods on tiny random models: exactly the targeted parameters move, the model
is restored around each candidate, losses are finite and fall, determinism, resume, the
EMBER plug-in order, and bad input. Forgetting itself is checked on the real model (slow)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from obliviate import methods
from obliviate.settings import build_section
from obliviate.errors import ObliviateError
from obliviate.methods import MethodContext
from obliviate.edits.weights import ParameterDelta

TINY = {"steps": 4, "batch_size": 2, "max_length": 24}
TINY_SETTINGS = {
    "rmu": {**TINY, "lr": (1e-2,), "steering": (10.0,), "alpha": (1.0,), "steering_unit": "absolute"},
    "grad_diff": {**TINY, "lr": (1e-3,)},
    "npo": {**TINY, "lr": (1e-3,)},
    "elm": {**TINY, "lr": (1e-3,), "rank": 4, "consistency_prompts": 2, "consistency_tokens": 4},
}
EXPECTED = {
    # tiny models have 4 layers; RMU's L = round(7/26 * 4) = 1, trained layers 0..1
    "rmu": lambda n: re.fullmatch(r"model\.layers\.[01]\.mlp\.down_proj\.weight", n),
    "grad_diff": lambda n: re.search(r"\.(mlp|self_attn)\.\w+_proj\.weight$", n),
    "npo": lambda n: re.search(r"\.(mlp|self_attn)\.\w+_proj\.weight$", n),
}


def fit(name, lm, data, context=None, **overrides):
    module = methods.get(name)
    config = build_section(module.Config, {**TINY_SETTINGS[name], **overrides}, name)
    return module.fit(lm, data, config, 0, context or MethodContext(progress=False))


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["rmu", "grad_diff", "npo"])
def test_only_targeted_parameters_change_and_model_is_restored(name, tiny_lm, small_concept):
    before = state(tiny_lm.model)
    fitted = fit(name, tiny_lm, small_concept)
    (params, edit), = list(fitted.candidates())
    after_fit = state(tiny_lm.model)
    assert all(torch.equal(before[n], after_fit[n]) for n in before), "fit must leave the model as it came"
    assert isinstance(edit, ParameterDelta) and edit.changed_token_ids() is None
    targeted = {n for n in before if EXPECTED[name](n)}
    assert set(edit.new) == targeted and targeted
    edit.apply(tiny_lm.model)
    applied = state(tiny_lm.model)
    for n in before:
        if n in targeted:
            assert not torch.equal(before[n], applied[n]), f"{n} should have moved"
        else:
            assert torch.equal(before[n], applied[n]), f"{n} should not have moved"
    edit.revert(tiny_lm.model)
    assert all(torch.equal(before[n], p) for n, p in tiny_lm.model.named_parameters())


@pytest.mark.parametrize("name", ["rmu", "grad_diff", "npo"])
def test_losses_finite_and_forget_term_falls(name, tiny_lm, small_concept):
    fitted = fit(name, tiny_lm, small_concept, steps=12)
    list(fitted.candidates())
    losses = fitted.report()["candidates"][0]["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for step in losses for v in step.values())
    key = {"rmu": "forget", "grad_diff": "loss", "npo": "npo"}[name]
    first, last = sum(s[key] for s in losses[:3]), sum(s[key] for s in losses[-3:])
    assert last < first, f"{name}: {key} did not fall ({first} -> {last})"


def test_deterministic_under_seed(tiny_lm, small_concept):
    a = next(fit("grad_diff", tiny_lm, small_concept).candidates())[1]
    b = next(fit("grad_diff", tiny_lm, small_concept).candidates())[1]
    assert all(torch.equal(a.new[n], b.new[n]) for n in a.new)


def test_grid_order_and_size(tiny_lm, small_concept):
    fitted = fit("rmu", tiny_lm, small_concept, lr=(1e-3, 1e-2), steering=(1.0, 5.0), steps=1)
    assert [tuple(p.values())[1:] for p, _ in fitted.candidates()] == [
        (1e-3, 1.0, 1.0), (1e-3, 1.0, 5.0), (1e-2, 1.0, 1.0), (1e-2, 1.0, 5.0)]


def test_rmu_norm_unit_scales_c_by_the_measured_activation_norm(tiny_lm, small_concept, monkeypatch):
    """steering_unit "norm": c = steering x the mean layer-L output norm over the concept
    sentences' content tokens (BOS and padding excluded), measured independently here."""
    from obliviate.training import losses
    from obliviate.methods import rmu
    from obliviate.training.loop import content_mask, tokenize

    coefficients = []
    real = losses.rmu_control_vector
    monkeypatch.setattr(losses, "rmu_control_vector", lambda d, c, g: coefficients.append(c) or real(d, c, g))
    fitted = fit("rmu", tiny_lm, small_concept, steering=(2.0,), steering_unit="norm", steps=1)
    list(fitted.candidates())
    texts = small_concept.concept_sentences[:rmu.NORM_SAMPLE]
    batch = tokenize(tiny_lm.tokenizer, texts, TINY["max_length"], "cpu")
    with torch.no_grad():
        hidden = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states[1 + 1]  # layer L = 1's output
    mask = content_mask(batch, set(tiny_lm.tokenizer.all_special_ids)).bool()
    expected = float(hidden.norm(dim=-1)[mask].mean())
    assert coefficients == [pytest.approx(2.0 * expected, rel=1e-4)]
    assert fitted.report()["activation_norm"] == {1: pytest.approx(expected, rel=1e-4)}


def test_content_mask_drops_bos_and_padding(tiny_lm, monkeypatch):
    from obliviate.training.loop import content_mask, tokenize

    monkeypatch.setattr(tiny_lm.tokenizer, "padding_side", "left")
    batch = tokenize(tiny_lm.tokenizer, ["the cat", "the cat sat on the mat today"], 24, "cpu")
    mask = content_mask(batch, set(tiny_lm.tokenizer.all_special_ids))
    bos = tiny_lm.tokenizer.bos_token_id
    assert (batch.input_ids == bos).sum() == 2 and not mask[batch.input_ids == bos].any()
    assert torch.equal(mask.sum(1), batch.attention_mask.sum(1) - 1)  # every real token but BOS


def test_resume_from_checkpoint_matches_uninterrupted(tiny_lm, small_concept, tmp_path, monkeypatch):
    from obliviate.training import loop as training

    full = next(fit("grad_diff", tiny_lm, small_concept, steps=6).candidates())[1]
    context = MethodContext(progress=False, checkpoint_dir=tmp_path)
    original_step = training.TextStream.next
    calls = {"n": 0}

    def interrupt(self):
        calls["n"] += 1
        if calls["n"] > 2 * 4:  # forget + retain batches of 4 steps, then "Ctrl-C"
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(training.TextStream, "next", interrupt)
    with pytest.raises(KeyboardInterrupt):
        next(fit("grad_diff", tiny_lm, small_concept, context, steps=6, checkpoint_every=2).candidates())
    monkeypatch.setattr(training.TextStream, "next", original_step)
    assert list(tmp_path.rglob("train_state.pt"))
    fitted = fit("grad_diff", tiny_lm, small_concept, context, steps=6, checkpoint_every=2)
    resumed = next(fitted.candidates())[1]
    assert fitted.report()["candidates"][0]["resumed_from"] == 4
    assert all(torch.allclose(full.new[n], resumed.new[n], atol=1e-6) for n in full.new)
    again = fit("grad_diff", tiny_lm, small_concept, context, steps=6, checkpoint_every=2)
    cached = next(again.candidates())[1]
    assert again.report()["candidates"][0]["cached"] is True
    assert all(torch.equal(cached.new[n], resumed.new[n]) for n in full.new)
    trained_with = {k: fitted.report()["candidates"][0][k] for k in ("optimizer", "memory_plan")}
    assert all(trained_with.values())  # a candidate read back says what it was trained with, as when it was
    assert {k: again.report()["candidates"][0][k] for k in trained_with} == trained_with


def test_parameter_delta_save_load(tiny_lm, small_concept, tmp_path):
    edit = next(fit("rmu", tiny_lm, small_concept, steps=1).candidates())[1]
    edit.save(tmp_path / "delta.safetensors")
    loaded = ParameterDelta.load(tmp_path / "delta.safetensors")
    assert set(loaded.new) == set(edit.new) and all(torch.equal(loaded.new[n], edit.new[n]) for n in edit.new)


@pytest.mark.parametrize("name, settings, message", [
    ("rmu", {"layer": (9,)}, "beyond the model's depth"),
    ("rmu", {"lr": (0.0,)}, "lr must be > 0"),
    ("rmu", {"steering_unit": "percent"}, "steering_unit must be one of norm, absolute"),
    ("npo", {"lr": (-1e-5,)}, "lr must be > 0"),
    ("grad_diff", {"param_pattern": "no_such_module"}, "No parameter of the model matches"),
])
def test_bad_settings_are_clear_errors(name, settings, message, tiny_lm, small_concept):
    with pytest.raises(ObliviateError, match=message):
        fit(name, tiny_lm, small_concept, **settings)


def test_unknown_method_lists_methods():
    with pytest.raises(ObliviateError, match="eco, elm, ember, grad_diff, npo, pisces, rmu, snmf"):
        methods.get("sgd")


def test_ember_patch_is_applied_while_training(tiny_lm, small_concept, monkeypatch):
    """--ember: the base method trains on the EMBER-edited model (pipeline._under), and
    the candidate it yields is the EMBER patch followed by the trained change."""
    from obliviate.training import loop as training
    from obliviate.edits.embedding import EmbeddingPatch
    from obliviate.edits.protocol import CompositeEdit, applied
    from obliviate.pipeline.selection import _under

    weight = tiny_lm.model.get_input_embeddings().weight
    rows = torch.tensor([5, 9, 11])
    patch = EmbeddingPatch(rows, weight[rows].detach().clone(), weight[rows].detach() + 1.0, {})
    seen = []
    real_train = training.train

    def spy(job, *args, **kwargs):
        seen.append(torch.equal(job.model.get_input_embeddings().weight[rows].detach(), patch.edited_rows))
        return real_train(job, *args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    with applied(patch, tiny_lm.model):
        fitted = fit("npo", tiny_lm, small_concept, steps=1)
    (params, edit), = list(_under(patch, tiny_lm.model, fitted.candidates()))
    assert seen == [True]
    assert isinstance(edit, CompositeEdit) and edit.edits[0] is patch and isinstance(edit.edits[1], ParameterDelta)
    assert torch.equal(weight[rows].detach(), patch.original_rows), "the patch is reverted after each candidate"
    assert edit.changed_token_ids() is None


def test_elm_trains_only_lora_layers_and_saves_a_peft_adapter(tiny_lm, small_concept, tmp_path):
    from peft import PeftModel

    from obliviate.edits.weights import LoraAdapter

    before = state(tiny_lm.model)
    fitted = fit("elm", tiny_lm, small_concept, MethodContext(progress=False, checkpoint_dir=tmp_path), layers=(1, 2))
    (params, edit), = list(fitted.candidates())
    assert isinstance(edit, LoraAdapter) and edit.changed_token_ids() is None
    assert all(torch.equal(before[n], p) for n, p in tiny_lm.model.named_parameters()), "model restored after training"
    assert sorted(fitted.report()["candidates"][0]["losses"][0]) == ["consistency", "erase", "loss", "retain"]
    edit.apply(tiny_lm.model)
    changed = {n for n, p in tiny_lm.model.named_parameters() if not torch.equal(before[n], p)}
    expected = {n for n in before if re.fullmatch(r"model\.layers\.[12]\.(self_attn|mlp)\.\w+_proj\.weight", n)}
    assert changed == expected and len(expected) == 14
    merged_ours = state(tiny_lm.model)
    edit.revert(tiny_lm.model)
    assert all(torch.equal(before[n], p) for n, p in tiny_lm.model.named_parameters())
    # the saved folder is a normal peft adapter; peft's own merge gives the same weights
    assert (edit.folder / "adapter_config.json").is_file()
    merged = PeftModel.from_pretrained(tiny_lm.model, str(edit.folder)).merge_and_unload()
    for n in expected:
        assert torch.allclose(dict(merged.named_parameters())[n], merged_ours[n], atol=1e-5)


def test_elm_unknown_target_module_lists_the_models_modules(tiny_lm, small_concept):
    with pytest.raises(ObliviateError, match=r"qkv_proj do not exist.*down_proj, gate_proj, k_proj"):
        fit("elm", tiny_lm, small_concept, target_modules=("qkv_proj",))


def gambling_train_outcome(embedded_lm, data_dir, name: str, **settings):
    """Fit ``name``'s first grid point on Gambling and evaluate it on the TRAIN questions
    (no coherence generation). Returns (outcome, fitted)."""
    from obliviate.config import EvalConfig
    from obliviate.data.concepts import load_benchmark_concept
    from obliviate.evaluation.evaluator import Evaluator

    data = load_benchmark_concept("Gambling", data_dir, general_questions=20)
    data.coherency_prompts = []
    evaluator = Evaluator(embedded_lm, data, EvalConfig(coherence_new_tokens=0, bootstrap=50), 42)
    method = methods.get(name)
    fitted = method.fit(embedded_lm, data, method.Config(**settings), 42, MethodContext(progress=False))
    _, edit = next(fitted.candidates())
    return evaluator.evaluate("train", edit), fitted


@pytest.mark.slow
def test_gradient_difference_lowers_qa_accuracy_on_the_embedded_model(embedded_lm, data_dir):
    """Gradient difference (10 steps, lr 1e-4) on Gambling lowers the real model's train-QA
    accuracy, and evaluation leaves the model as it was."""
    before = {name: p.detach().clone() for name, p in embedded_lm.model.named_parameters() if "layers.3." in name}
    outcome, _ = gambling_train_outcome(embedded_lm, data_dir, "grad_diff", lr=(1e-4,), steps=10)
    assert outcome.value("qa_edited") < outcome.value("qa_base") - 0.1, outcome.metrics
    after = dict(embedded_lm.model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)  # evaluate reverted the edit


@pytest.mark.slow
def test_rmu_at_its_stronger_default_point_lowers_qa_accuracy_on_the_embedded_model(embedded_lm, data_dir):
    """RMU's second default grid point (lr 1e-3, c = 1x the layer-5 activation norm, 30
    steps) on Gambling: measured train QA 0.48 -> 0.30, general knowledge kept."""
    outcome, fitted = gambling_train_outcome(embedded_lm, data_dir, "rmu", lr=(1e-3,))
    assert outcome.value("qa_edited") < outcome.value("qa_base") - 0.1, outcome.metrics
    assert outcome.value("general_frac") >= 0.8, outcome.metrics
    norm = fitted.report()["activation_norm"][5]
    assert 1_000 < norm < 20_000  # Gemma 3's residual stream: thousands, so the papers' c = 300 is tiny here

"""The battery's newer attacks on tiny models: token-free rewrites, quantization, fine-tuning
on other text, direction ablation, the logit lens, the relearning sweep and the worst case."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from obliviate import attacks
from obliviate.attacks import activations, probe, quantize, respell
from obliviate.attacks.common import AttackContext, attack_text, worst_case_recovered
from obliviate.data.concepts import MCQuestion
from obliviate.errors import ObliviateError
from obliviate.evaluation.multiple_choice import option_scores, prepare
from obliviate.models.loading import LoadedModel, parameter_fingerprints, untie_output_embeddings

from conftest import make_tiny_lm


def _ctx(tiny_tokenizer, concept, data_dir, tmp_path, edited=None, erased=None) -> AttackContext:
    original = make_tiny_lm(tiny_tokenizer, seed=0)
    erased = erased or LoadedModel(copy.deepcopy(original.model), tiny_tokenizer, "erased", "config")
    return AttackContext(models={"original": original, "erased": erased}, data=concept, data_dir=data_dir,
                         bootstrap=50, out=tmp_path, progress=False, options={"edited_token_ids": edited, "cache": False})


def _word_ids(tokenizer, words: list[str]) -> list[int]:
    """The ids of those words that are one token (as after a space): what an edit of rows targets."""
    encoded = [tokenizer(" " + w, add_special_tokens=False).input_ids for w in words]
    return sorted({ids[0] for ids in encoded if len(ids) == 1})


# ---- respell -------------------------------------------------------------------------

def test_spellings_keep_the_letters_in_order():
    for spelling in respell.spellings("Hermione"):
        assert spelling.replace("-", "").replace(" ", "").lower() == "hermione"
    assert list(respell.spellings("ab"))[:3] == ["AB", "Ab", "ab"]


def test_rewritten_questions_hold_no_target_and_keep_the_answer(tiny_tokenizer, small_concept):
    targets = frozenset(_word_ids(tiny_tokenizer, ["Harry", "Potter", "Hogwarts", "wizard", "magic"]))
    rewriter = respell.Rewriter(tiny_tokenizer, targets)
    questions = small_concept.questions["qa_test"]
    rewritten = [rewriter.question(q, "respell") for q in questions]
    lm = LoadedModel(model=torch.nn.Module(), tokenizer=tiny_tokenizer, name="t", source="t")
    before = prepare(lm, questions, "loglik", 0)
    after = prepare(lm, rewritten, "loglik", 0)
    assert len(before.touching(set(targets))) > 0  # the test questions name the concept
    assert len(after.touching(set(targets))) == 0  # and no rewritten one does
    for q, r in zip(questions, rewritten):
        assert r.answer == q.answer and len(r.options) == len(q.options)
        assert r.options[r.answer].replace("-", "").replace(" ", "").lower() == \
            q.options[q.answer].replace("-", "").replace(" ", "").lower()


def test_neighbour_is_a_vocabulary_word_free_of_targets(tiny_tokenizer):
    targets = frozenset(_word_ids(tiny_tokenizer, ["Potter"]))
    embedding = torch.randn(len(tiny_tokenizer), 16, generator=torch.Generator().manual_seed(0))
    rewriter = respell.Rewriter(tiny_tokenizer, targets, embedding)
    word = rewriter.neighbour("Potter", spaced=True)
    assert word is not None and word.isalpha() and word.lower() != "potter"
    assert not rewriter.holds_target(word, spaced=True)
    rows, words = rewriter.vocabulary()
    assert word in words and torch.allclose(rows.norm(dim=1), torch.ones(len(rows)))


def test_respell_attack_reports_counts_and_recovers_a_token_edit(tiny_tokenizer, small_concept, data_dir, tmp_path):
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    targets = _word_ids(tiny_tokenizer, ["Harry", "Potter"])
    untie_output_embeddings(ctx.models["erased"].model)  # as EMBER does: the output layer keeps its rows
    erased = ctx.models["erased"].model.get_input_embeddings().weight
    with torch.no_grad():  # an erasure that destroys only these rows
        erased[targets] = 50.0 * torch.randn(len(targets), erased.shape[1], generator=torch.Generator().manual_seed(1))
    ctx.options["edited_token_ids"] = targets
    result = attacks.run("respell", ctx, {"forms": "respell"})
    form = result["forms"]["respell"]
    assert result["targets"] == {"source": "edited rows", "tokens": len(targets)}
    assert form["still_containing"] == 0 and 0 < form["rewritten"] <= result["questions"]
    # Without an edited token the erased model IS the original: the rewrite brings back
    # exactly what the original answers on the rewritten questions.
    assert result["erased"]["correct_after"] == result["original"]["correct_after"]


class _Upper(respell.Translator):
    """A translator with a known answer: upper case (and a count of what it was asked)."""

    def __init__(self):
        super().__init__(lm=None, language="Upper")
        self.asked: list[str] = []

    def _translate(self, text: str) -> str:
        self.asked.append(text)
        return text.upper()


def test_translated_form_translates_question_and_each_option_in_order(tiny_tokenizer, small_concept):
    questions = small_concept.questions["qa_test"]
    translator = _Upper()
    rewriter = respell.Rewriter(tiny_tokenizer, frozenset())
    rewritten = respell.rewrite_all(rewriter, questions, ("translated",), translator)["translated"]
    for q, r in zip(questions, rewritten):
        assert r.question == q.question.upper() and r.answer == q.answer
        assert r.options == tuple(o.upper() for o in q.options)
    texts = {t for q in questions for t in (q.question, *q.options)}
    assert sorted(translator.asked) == sorted(texts)  # each distinct text translated once


def _tiny_t5_folder(folder, tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_translation_model_loads_either_kind_and_translates_deterministically(
        tiny_tokenizer, tiny_model_dir, small_concept, tmp_path):
    question = small_concept.questions["qa_test"][0]
    for folder in (tiny_model_dir, _tiny_t5_folder(tmp_path / "t5", tiny_tokenizer)):
        config = respell.Config(forms=("translated",), translator=str(folder))
        lm = respell.load_translation_model(config.translator)
        assert lm.model.config.is_encoder_decoder == (folder != tiny_model_dir)
        first = respell.Translator(lm, config.translate_to).question(question)
        again = respell.Translator(lm, config.translate_to).question(question)
        assert first == again and first.answer == question.answer and len(first.options) == len(question.options)
        assert all(isinstance(t, str) and t for t in (first.question, *first.options))


def test_translated_form_is_checked_before_any_model_and_skipped_with_a_message_without_one(
        tiny_tokenizer, small_concept, data_dir, tmp_path, capsys):
    with pytest.raises(ObliviateError, match="not a folder"):
        respell.Config(translator=str(tmp_path / "missing"))
    with pytest.raises(ObliviateError, match="needs a translator"):
        respell.Config(forms=("translated",))
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    result = attacks.run("respell", ctx, {"forms": ("respell", "translated")})
    assert set(result["forms"]) == {"respell"} and "no translator" in result["skipped"]["translated"]
    assert "translated form is skipped" in capsys.readouterr().err


def test_respell_without_edited_rows_uses_the_concept_key_words(tiny_tokenizer, small_concept):
    ctx = AttackContext(models={}, data=small_concept, data_dir=None, options={})
    targets, source = respell.target_tokens(ctx, tiny_tokenizer, respell.Config(min_occurrences=3))
    assert source == "concept key words" and targets
    neutral = set(_word_ids(tiny_tokenizer, [w for s in small_concept.neutral_sentences for w in s.split()]))
    assert not targets & neutral  # key tokens never occur in neutral text
    with pytest.raises(ObliviateError, match="forms"):
        respell.Config(forms=("typo",))


# ---- quantize ------------------------------------------------------------------------

def _quantized_weight(layer) -> torch.Tensor:
    """The values a quantized layer multiplies with (a float weight dequantizes to itself)."""
    return layer.weight.detach().dequantize().float()


def test_quantized_weights_round_and_the_float_model_comes_back(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer, seed=0)
    before = parameter_fingerprints(lm.model)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    logits = lm.model(ids).logits
    config = quantize.Config(group_size=32, nf4_block=32)
    for scheme in ("int8", "int4", "nf4"):
        name, layer = next(iter(quantize.quantizable(lm.model).items()))
        weight = layer.weight.detach().clone()
        with quantize.quantized(lm.model, scheme, config) as layers:
            assert "lm_head" not in layers and layers[name] is layer
            rounded = _quantized_weight(layer)
            # the widest gap between two levels (NF4's outermost: 1 - 0.696 of the absmax)
            step = weight.abs().amax(dim=1, keepdim=True) * {"int8": 1 / 127, "int4": 1 / 7, "nf4": 0.31}[scheme]
            assert 0 < (rounded - weight).abs().max() and bool(((rounded - weight).abs() <= step).all()), scheme
            if scheme == "int4":  # symmetric round-to-nearest: at most 9 magnitudes in a group of 32
                assert torch.unique(rounded[0, :32].abs()).numel() <= 9 < torch.unique(weight[0, :32].abs()).numel()
            if scheme == "nf4":  # the 16 NormalFloat levels times one absmax a block of 32
                assert torch.unique(rounded.flatten()[:32]).numel() <= 16 < torch.unique(weight.flatten()[:32]).numel()
            changed = (lm.model(ids).logits - logits).abs().max()
            assert changed > 0
        assert all(torch.equal(before[k], v) for k, v in parameter_fingerprints(lm.model).items())
    assert torch.equal(lm.model(ids).logits, logits)
    with pytest.raises(ObliviateError, match="schemes"):
        quantize.Config(schemes=("int3",))
    with pytest.raises(ObliviateError, match="nf4_block 48 does not divide"):
        with quantize.quantized(lm.model, "nf4", quantize.Config(nf4_block=48)):
            pass


def test_four_bits_move_weights_more_than_eight_and_nf4_is_a_four_bit_code(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer, seed=0)
    name = next(iter(quantize.quantizable(lm.model)))
    weight = dict(lm.model.named_parameters())[f"{name}.weight"].detach().clone()
    error = {}
    for scheme in ("int8", "int4", "nf4"):
        with quantize.quantized(lm.model, scheme, quantize.Config(group_size=32, nf4_block=32)) as layers:
            error[scheme] = (_quantized_weight(layers[name]) - weight).abs().mean()
    assert 0 < error["int8"] < error["nf4"] and error["int8"] < error["int4"]
    assert error["nf4"] < 2 * error["int4"]  # both 4-bit codes: the same order of error


# ---- fine-tuning on other text -------------------------------------------------------

def test_attack_text_sources_differ_and_never_hold_the_concepts_sentences(small_concept, data_dir, tmp_path):
    ctx = AttackContext(models={}, data=small_concept, data_dir=data_dir, seed=3)
    concept, where = attack_text(ctx, "concept", 10)
    unrelated, unrelated_source = attack_text(ctx, "unrelated", 10)
    retain, _ = attack_text(ctx, "retain", 10)
    assert len(concept) == len(unrelated) == len(retain) == 10 and where == "relearn_paragraphs.json"
    own_text, where = attack_text(AttackContext(models={}, data=small_concept, data_dir=None), "concept", 10)
    assert where == "the concept's sentences" and own_text[0] == " ".join(small_concept.concept_sentences[:3])
    own = set(small_concept.concept_sentences)
    for paragraph in unrelated + retain:
        assert not any(s in paragraph for s in list(own)[:50])
    assert attack_text(ctx, "unrelated", 10) == (unrelated, unrelated_source)  # the seed fixes the shuffle


# ---- direction ablation and the logit lens -------------------------------------------

def test_difference_directions_find_a_planted_shift():
    original = torch.randn(5, 8)
    planted = torch.zeros(8)
    planted[3] = 1.0
    erased = original.clone()
    erased[2:] += 4.0 * planted
    directions = activations.difference_directions(erased, original)
    assert torch.equal(directions[:2], torch.zeros(2, 8))
    torch.testing.assert_close(directions[2:], planted.expand(3, 8))
    hidden = torch.randn(2, 4, 8)
    projected = activations.project_out(hidden, planted)
    assert torch.allclose(projected[..., 3], torch.zeros(2, 4))
    torch.testing.assert_close(projected[..., :3], hidden[..., :3])


def test_ablating_a_planted_direction_recovers_the_original(tiny_tokenizer, small_concept, data_dir, tmp_path):
    """The erased model's embedding output carries a constant along one axis where the
    original has none: the ablation finds that axis and removes it from the erased model."""
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    original, erased = ctx.models["original"], ctx.models["erased"]
    width = original.model.config.hidden_size
    planted = torch.zeros(width)
    planted[0] = 1.0
    with torch.no_grad():  # the original holds nothing along the planted axis, anywhere
        original.model.get_input_embeddings().weight[:, 0] = 0.0
        erased.model.get_input_embeddings().weight.copy_(original.model.get_input_embeddings().weight)
        erased.model.get_input_embeddings().weight[:, 0] = 5.0
    result = attacks.run("ablate-direction", ctx, {"sentences": 8})
    assert result["erased"]["ablated_sites"] >= 1 and result["original"]["ablated_sites"] == 0
    assert result["mean_gap_by_site"][0] > 0
    directions = activations.difference_directions(
        activations.mean_activations(erased, small_concept.concept_sentences[:8], 64, 4),
        activations.mean_activations(original, small_concept.concept_sentences[:8], 64, 4))
    assert abs(float(directions[0][0])) > 0.99  # the embedding site's direction is the planted axis
    ids = torch.tensor([[2, 10, 11, 12]])
    with activations.directions_ablated(erased.model, directions):
        embedded = {}
        handle = erased.model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.setdefault("o", o))
        erased.model(ids)
        handle.remove()
    assert torch.allclose(embedded["o"][..., 0], torch.zeros(1, 4), atol=1e-5)


def test_logit_lens_last_block_is_the_model_and_lower_blocks_differ(tiny_tokenizer, small_concept, data_dir, tmp_path):
    assert activations.lens_blocks(4, 3) == [0, 3] and activations.lens_blocks(18, 3)[-1] == 17
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    lm = ctx.models["original"]
    ids = torch.tensor([[2, 10, 11, 12]])
    full = lm.model(ids).logits
    with activations.read_at_block(lm.model, 3):  # the last block: nothing skipped
        torch.testing.assert_close(lm.model(ids).logits, full)
    with activations.read_at_block(lm.model, 0):
        assert not torch.allclose(lm.model(ids).logits, full)
    torch.testing.assert_close(lm.model(ids).logits, full)  # hooks gone
    result = attacks.run("logit-lens", ctx, {"stride": 1})
    for role in ("original", "erased"):
        assert result[role]["blocks"] == [0, 1, 2, 3]
        assert result[role]["by_block_correct"][-1] == result[role]["correct_before"]
        best = result[role]["best_block"]
        accuracy = [np.mean(c) for c in result[role]["by_block_correct"]]
        assert accuracy[best] == max(accuracy) and result[role]["after"]["value"] == pytest.approx(max(accuracy))


def test_reading_at_a_block_runs_no_block_above_it(tiny_lm, tiny_llama):
    """The output layer reads block b's output (its hidden state, through the final norm) and
    the blocks above b never run; the model's depth is back after."""
    from obliviate.models.layers import decoder_layers

    ids = torch.tensor([[2, 10, 11, 12, 13]])
    for lm in (tiny_lm, tiny_llama):
        _, blocks = decoder_layers(lm.model)
        ran: list[int] = []
        handles = [b.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                hidden = lm.model(ids, output_hidden_states=True).hidden_states[2]  # block 1's output
                expected = lm.model.get_output_embeddings()(lm.model.model.norm(hidden))
                softcap = getattr(lm.model.config, "final_logit_softcapping", None)
                expected = softcap * torch.tanh(expected / softcap) if softcap else expected
                ran.clear()
                with activations.read_at_block(lm.model, 1):
                    read = lm.model(ids).logits
        finally:
            for handle in handles:
                handle.remove()
        assert ran == [0, 1] and lm.model.config.num_hidden_layers == len(blocks)
        torch.testing.assert_close(read, expected, atol=1e-5, rtol=1e-5)


# ---- probe ---------------------------------------------------------------------------

def test_probe_features_of_a_sentence_do_not_depend_on_its_batch(tiny_lm):
    """What lets the erased model run only some sentences: a sentence's features are the same
    whatever else (and however much padding) shares its batch."""
    sentences = ["The wizard cast a spell.", "A much longer sentence about the golf clubs of Scotland and their greens.",
                 "Cats sleep."]
    together = probe.layer_features(tiny_lm, sentences, 32, batch_size=3)
    for i, sentence in enumerate(sentences):
        np.testing.assert_allclose(probe.layer_features(tiny_lm, [sentence], 32, 1)[:, 0], together[:, i], atol=1e-5)


def test_erased_probe_features_run_only_the_sentences_an_embedding_patch_changes(tiny_tokenizer, small_concept,
                                                                                 data_dir, tmp_path, monkeypatch):
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    original, erased = ctx.models["original"], ctx.models["erased"]
    golf = _word_ids(tiny_tokenizer, ["golf"])
    assert golf
    with torch.no_grad():
        erased.model.get_input_embeddings().weight[golf] += 0.5
    sentences = ["The golf club is old.", "Cats sleep all day.", "A golf course and a cat.", "Rain falls on us."]
    config = probe.Config(sentences=4, max_length=32, batch_size=2)
    ran: list[str] = []
    compute = probe.layer_features
    monkeypatch.setattr(probe, "layer_features", lambda lm, batch, *a: ran.extend(batch) or compute(lm, batch, *a))
    before = probe.original_features(ctx, original, sentences, config)
    ran.clear()
    shortcut = probe.erased_features(ctx, erased, sentences, config, before)
    assert ran == [sentences[0], sentences[2]]
    np.testing.assert_allclose(shortcut, compute(erased, sentences, 32, 2), atol=1e-5)
    assert not np.allclose(shortcut[:, 0], before[:, 0], atol=1e-3) and np.array_equal(shortcut[:, 1], before[:, 1])
    with torch.no_grad():  # another weight changed too: every sentence runs
        next(p for n, p in erased.model.named_parameters() if "mlp" in n).add_(0.01)
    ran.clear()
    probe.erased_features(ctx, erased, sentences, config, before)
    assert ran == sentences


def test_the_originals_probe_features_are_computed_once(tiny_tokenizer, small_concept, data_dir, tmp_path,
                                                        monkeypatch):
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    ctx.options["cache"] = True
    sentences, config, ran = ["The golf club is old.", "Cats sleep all day."], probe.Config(4, 32, 2), []
    compute = probe.layer_features
    monkeypatch.setattr(probe, "layer_features", lambda lm, batch, *a: ran.append(len(batch)) or compute(lm, batch, *a))
    first = probe.original_features(ctx, ctx.models["original"], sentences, config)
    again = probe.original_features(ctx, ctx.models["original"], sentences, config)
    assert ran == [2] and np.array_equal(first, again)
    probe.original_features(ctx, ctx.models["original"], sentences[:1], config)  # other sentences: computed
    assert ran == [2, 1]


def test_the_originals_mean_activations_are_computed_once(tiny_tokenizer, small_concept, data_dir, tmp_path,
                                                          monkeypatch):
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    ctx.options["cache"] = True
    sentences, config, ran = small_concept.concept_sentences[:4], activations.AblateConfig(4, 32, 2), []
    compute = activations.mean_activations
    monkeypatch.setattr(activations, "mean_activations", lambda lm, batch, *a: ran.append(len(batch)) or compute(lm, batch, *a))
    first = activations.original_means(ctx, ctx.models["original"], sentences, config)
    again = activations.original_means(ctx, ctx.models["original"], sentences, config)
    assert ran == [4] and torch.equal(first, again) and first.shape == (len(activations.residual_sites(
        ctx.models["original"].model)), ctx.models["original"].model.config.hidden_size)


# ---- the sweep and the worst case ----------------------------------------------------

def test_relearn_sweep_reports_every_cell_and_the_worst(tiny_tokenizer, small_concept, data_dir, tmp_path):
    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    result = attacks.run("relearn-sweep", ctx, {"lrs": (1e-5, 1e-3), "epochs": 2, "paragraphs": 2, "max_length": 32})
    assert [(c["lr"], c["epoch"]) for c in result["grid"]] == [(1e-5, 1), (1e-5, 2), (1e-3, 1), (1e-3, 2)]
    worst = max(result["grid"], key=lambda c: c["recovered_frac"]["value"])
    assert result["recovered_frac"] == worst["recovered_frac"]
    assert result["worst_cell"] == {"lr": worst["lr"], "epoch": worst["epoch"]}
    assert result["erased"]["after"] == worst["erased"]


def test_worst_case_is_the_maximum_over_attacks():
    results = {"a": {"recovered_frac": {"value": 0.2, "low": 0.1, "high": 0.3}},
               "b": {"recovered_frac": {"value": 0.6, "low": 0.4, "high": 0.8}},
               "probe": {"erased": {}}, "c": {"recovered_frac": {"value": None, "low": None, "high": None}}}
    assert worst_case_recovered(results) == {"attack": "b", "value": 0.6, "low": 0.4, "high": 0.8}
    assert worst_case_recovered({"probe": {}}) is None


def test_cheap_and_all_name_registered_attacks():
    cheap, every = attacks.parse_names("cheap"), attacks.parse_names("all")
    assert set(cheap) < set(every)
    assert {"respell", "quantize", "ablate-direction", "logit-lens"} <= set(cheap)
    assert not {"relearn", "relearn-sweep", "finetune-unrelated", "finetune-retain", "gcg"} & set(cheap)


def test_recovered_fraction_uses_the_questions_chance_level(small_concept):
    from obliviate.attacks.common import recovered_fraction

    three = [MCQuestion(q.question, q.options[:3], 0) for q in small_concept.questions["qa_test"]]
    small_concept.questions["qa_test"] = three
    ctx = AttackContext(models={}, data=small_concept, data_dir=None)
    assert ctx.chance == pytest.approx(1 / 3)
    original = np.array([1, 1, 1, 1, 0, 0], float)  # 2/3
    attacked = np.array([1, 1, 0, 0, 0, 0], float)  # 1/3: chance, nothing back
    assert recovered_fraction(original, attacked, 20, 0, ctx.chance)["value"] == pytest.approx(0.0)
    assert recovered_fraction(original, attacked, 20, 0)["value"] == pytest.approx((1 / 3 - 0.25) / (2 / 3 - 0.25))


# ---- weights-only --------------------------------------------------------------------

def test_weights_only_strips_the_hook_and_gives_the_holder_the_original(tiny_tokenizer, small_concept, data_dir,
                                                                         tmp_path):
    from obliviate.attacks.white_box import hooks_removed
    from obliviate.methods.eco import EcoHook, hook_of
    from obliviate.methods.eco.classifier import PromptClassifier
    from obliviate.methods.eco.corruption import Corruption

    ctx = _ctx(tiny_tokenizer, small_concept, data_dir, tmp_path)
    erased = ctx.models["erased"].model
    d = erased.config.hidden_size
    never = PromptClassifier(torch.zeros(d), torch.tensor([-50.0]), torch.zeros(d), torch.ones(d), 1, 0.5)
    hook = EcoHook(never, Corruption("gaussian", 0, 1e3), force=True).install(erased)  # corrupts every prompt
    result = attacks.run("weights-only", ctx)
    assert result["erased"]["hooks_removed"] and not result["original"]["hooks_removed"]
    prepared = prepare(ctx.models["erased"], small_concept.questions["qa_test"], "loglik", 0)
    hooked = option_scores(ctx.models["erased"], prepared)
    with hooks_removed(erased):
        plain = option_scores(ctx.models["erased"], prepared)
    assert not np.allclose(hooked, plain)  # the hook changes every answer's scores
    assert result["erased"]["correct_after"] == result["original"]["correct_before"]  # the holder gets it all back
    assert result["original"]["correct_after"] == result["original"]["correct_before"]
    assert hook_of(erased) is hook and hook.installed  # the caller's model keeps its hook
    with hooks_removed(ctx.models["original"].model) as removed:
        assert not removed

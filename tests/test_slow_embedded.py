"""Tests on the real embedded Gemma 3 270M (minutes on 2 CPU cores): `pytest -m slow`."""
import math

import pytest
import torch

import obliviate
from obliviate.data.concepts import load_benchmark_concept
from obliviate.evaluation.evaluator import Evaluator
from obliviate.config import EvalConfig
from obliviate.methods.factorization import FactorizationConfig, factorize, reference_factorize
from obliviate.methods import ember
from obliviate.models.loading import embedding_scale, embeddings_are_tied, untie_output_embeddings

pytestmark = pytest.mark.slow
CONCEPT = "Gambling"


def test_embedded_model_is_gemma3_with_scaled_tied_embeddings(embedded_lm):
    model = embedded_lm.model
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert embedding_scale(model) == pytest.approx(math.sqrt(640), rel=1e-3)
    assert embeddings_are_tied(model)


def test_fast_factorization_beats_the_reference_loss_on_the_real_matrix(embedded_lm, data_dir):
    data = load_benchmark_concept(CONCEPT, data_dir)
    token_set = ember.build_token_set(embedded_lm.tokenizer, data.concept_sentences, data.neutral_sentences, [])
    A = ember.embedding_matrix(embedded_lm, token_set.ids).cpu()
    config = FactorizationConfig(patience=100)
    assert factorize(A, config).loss <= reference_factorize(A, config).loss


def test_ember_lowers_concept_accuracy_and_keeps_the_similar_domain(embedded_lm, data_dir):
    data = load_benchmark_concept(CONCEPT, data_dir, general_questions=40)
    lm = embedded_lm
    untie_output_embeddings(lm.model)
    fit = ember.fit(lm, data, ember.Config())
    tokens = " ".join(t for f in fit.features for t in f.top_tokens[:10]).lower()
    assert "gambling" in tokens or "casino" in tokens or "betting" in tokens
    evaluator = Evaluator(lm, data, EvalConfig(coherence_new_tokens=0, bootstrap=200))
    before = lm.model.get_input_embeddings().weight.clone()
    outcome = evaluator.evaluate("test", fit.patch(5.0))
    qa_drop = outcome.value("qa_base") - outcome.value("qa_edited")
    simdom_change = abs(outcome.value("simdom_base") - outcome.value("simdom_edited"))
    assert qa_drop >= 0.1, outcome.metrics
    assert simdom_change <= 0.06, outcome.metrics
    assert torch.equal(before, lm.model.get_input_embeddings().weight)  # evaluate reverted the edit


def test_erase_api_end_to_end_with_a_fixed_delta(data_dir, tmp_path):
    result = obliviate.erase(CONCEPT, data=data_dir, out=tmp_path / "run", save_model=False,
                             ember={"delta": 5.0}, evaluation={"coherence_new_tokens": 16})
    r = result.results
    assert r["delta"] == 5.0 and r["edited_token_count"] > 0 and r["embeddings_untied"]
    assert r["qa_test"]["edited"]["value"] < r["qa_test"]["base"]["value"]
    assert (tmp_path / "run" / "embedding_patch.safetensors").stat().st_size < 2_000_000


def test_default_leak_free_edit_erases_and_keeps_general_coherence(data_dir, tmp_path):
    """Gambling at delta 10 with the default output rows (the mean row, nothing original
    saved): measured train QA 0.48 -> 0.36 at general coherence 0.91 (45 prompts), the same
    as the reference's untied edit; concept text is where the cost shows."""
    result = obliviate.erase(CONCEPT, data=data_dir, out=tmp_path / "run", save_model=False, ember={"delta": 10.0},
                             evaluation={"general_prompts": 40, "bootstrap": 200},
                             data_options={"general_questions": 40})
    r = result.results
    assert r["output_rows"] == "neutral" and r["leak_check"]["passed"]
    assert r["qa_test"]["edited"]["value"] <= r["qa_test"]["base"]["value"] - 0.1, r["qa_test"]
    assert r["coherence"]["value"] >= 0.85 and r["concept_fluency"]["value"] < r["coherence"]["value"]
    assert r["coverage"]["qa"]["share"] > 0.5  # most Gambling questions contain an edited token


def test_two_concepts_erased_from_one_model(data_dir, tmp_path):
    """Gambling and Golf at a fixed delta (their chosen strength alone: 50): each concept's
    own QA falls, and the cross table says what each concept's rows do to the other."""
    result = obliviate.erase("Gambling", data=data_dir, out=tmp_path / "two", concepts=("Golf",),
                             ember={"delta": 50.0}, save_model=False, progress=False,
                             evaluation={"general_prompts": 20, "neutral_coherence_prompts": 2, "bootstrap": 200},
                             data_options={"general_questions": 40})
    concepts = result["concepts"]
    drop = {name: concepts[name]["qa_test"]["base"]["value"] - concepts[name]["qa_test"]["edited"]["value"]
            for name in ("Gambling", "Golf")}
    assert drop["Gambling"] >= 0.2 and drop["Golf"] > 0.0, drop  # alone: 0.64 -> 0.26 and 0.40 -> 0.24
    cross = result["cross"]
    own = cross["Gambling"]["Gambling"]
    assert own["base"]["value"] - own["edited"]["value"] >= 0.2  # Gambling's rows alone erase Gambling
    assert set(cross) == {"Gambling", "Golf"} and all(set(row) == {"Gambling", "Golf"} for row in cross.values())
    assert result["leak_check"]["passed"]

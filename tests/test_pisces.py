"""PISCES: the dictionary, the vocabulary projection, the closed-form vector edit (only
the named down-projections move, revert gives the original bits), the cache, and a whole
`erase --method pisces` on a tiny model through the Python API."""
import json

import pytest
import torch

import obliviate
from obliviate.edits.protocol import apply_verified, revert_verified
from obliviate.edits.weights import LowRankDelta
from obliviate.errors import ObliviateError
from obliviate.methods import get, pisces

TINY = dict(cache_dir="", train_steps=40, train_batch=128, ratio_threshold=1.0, projection_fraction=0.05)


def test_dictionary_training_lowers_the_error_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    codes = torch.rand(300, 12, generator=g) * (torch.rand(300, 12, generator=g) < 0.2)
    x = codes @ atoms
    untrained = pisces.train_dictionary(x, 24, 3, 0, 64, 1e-2, seed=1)
    trained = pisces.train_dictionary(x, 24, 3, 200, 64, 1e-2, seed=1)
    again = pisces.train_dictionary(x, 24, 3, 200, 64, 1e-2, seed=1)
    assert trained.relative_error < untrained.relative_error
    assert torch.equal(trained.atoms, again.atoms) and torch.equal(trained.encoder, again.encoder)
    assert torch.allclose(trained.atoms.norm(dim=1), torch.ones(24), atol=1e-5)
    values, indices = trained.code(x)
    assert values.shape == (300, 3) and (values >= 0).all()


def test_vocabulary_projection_keeps_each_atoms_top_tokens():
    rows = torch.eye(4) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # row norms must not matter
    atoms = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.6, -0.8, 0.0, 0.0]])
    projection = pisces.vocabulary_projection(atoms, rows, fraction=0.25)  # one token per atom
    assert projection.shape == (4, 2)
    assert torch.nonzero(projection[:, 0]).flatten().tolist() == [2]
    assert torch.nonzero(projection[:, 1]).flatten().tolist() == [1]  # |-0.8| beats 0.6
    assert projection[1, 1] == pytest.approx(-0.8)


@pytest.mark.parametrize("settings, message", [
    ({"ks": (0.0,)}, "ks"), ({"values": (-1.0,)}, "values"), ({"topk": 0}, "topk"), ({"selection": "vibes"}, "selection"),
    ({"projection_fraction": 2.0}, "projection_fraction"),
])
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ObliviateError, match=message):
        pisces.Config(**settings)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_edits_change_only_down_projections_and_revert_exactly(tiny_lm, small_concept):
    before = _snapshot(tiny_lm.model)
    fitted = get("pisces").fit(tiny_lm, small_concept, pisces.Config(**TINY), 42, None)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    assert fitted.features, "the tiny setting should select some feature"
    points = [p for p, _ in fitted.candidates()]
    assert points[0] == {"k": 0.3, "value": 8.0} and len(points) == 4
    for _, edit in fitted.candidates():
        assert isinstance(edit, LowRankDelta) and edit.factors
        assert all(name.endswith("mlp.down_proj.weight") for name in edit.factors)
        fingerprints = apply_verified(edit, tiny_lm.model)
        changed = {n for n, p in tiny_lm.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set(edit.factors)
        revert_verified(edit, tiny_lm.model, fingerprints)
        assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())


def test_edit_moves_exactly_the_chosen_vectors_along_their_features(tiny_lm, small_concept):
    fitted = pisces.fit(tiny_lm, small_concept, pisces.Config(**TINY), 42)
    k, value = 0.5, 10.0
    edit = fitted.edit(k, value)
    checked = [name for name in fitted.names.values() if name in edit.factors]
    assert checked  # the loop below checks at least one edited matrix
    for layer, name in fitted.names.items():
        if name not in edit.factors:
            continue
        W, W_new = fitted.original[name].double(), edit.new_value(name).double()
        z = fitted.codes[layer].double()
        chosen = torch.where((z >= k * fitted.peaks.double()) & (z > 0), z, torch.zeros((), dtype=torch.float64))
        # v_i' = v_i - (1 + value) |v_i| sum_j z_ij d_j, column by column
        expected = W - (1 + value) * (fitted.atoms.double().T @ (chosen * fitted.norms[layer].double()[:, None]).T)
        assert torch.allclose(W_new, expected, atol=1e-5)
        untouched = ~(chosen > 0).any(1)
        assert torch.equal(edit.new_value(name)[:, untouched], fitted.original[name][:, untouched])
    assert fitted.vectors_edited(0.1) >= fitted.vectors_edited(0.8) > 0


def test_dictionary_is_cached_per_model(tiny_lm, small_concept, tmp_path):
    config = pisces.Config(**{**TINY, "cache_dir": str(tmp_path / "cache")})
    first = pisces.fit(tiny_lm, small_concept, config, 42)
    second = pisces.fit(tiny_lm, small_concept, config, 42)
    assert not first.report()["dictionary"]["cached"] and second.report()["dictionary"]["cached"]
    assert len(list((tmp_path / "cache").glob("dictionary-*.safetensors"))) == 1
    assert torch.equal(first.atoms, second.atoms)


def test_erase_with_pisces_through_the_api_writes_results(tiny_model_dir, data_dir, tmp_path):
    result = obliviate.erase(
        "Golf", data=data_dir, out=tmp_path / "run", model={"name": str(tiny_model_dir)}, progress=False,
        method="pisces", save_model=False, methods={"pisces": {**TINY, "ks": (0.5,), "values": (4.0, 24.0)}},
        evaluation={"coherence_new_tokens": 2, "neutral_coherence_prompts": 1, "bootstrap": 20, "fit_at_chance": True},
        data_options={"general_questions": 4})
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "pisces" and len(results["method_sweep"]) == 2
    assert results["details"]["pisces"]["features"]
    assert result.results["concept"] == "Golf"


def test_under_a_plug_in_edit_features_are_read_on_the_vocabulary_before_it(tiny_lm, small_concept):
    """The tied default gives edited tokens the mean output row; PISCES then reads the output
    embedding from before the edit (MethodContext.vocabulary) and finds the plain model's features."""
    from obliviate.methods import MethodContext
    from obliviate.methods.features import build_token_set

    config = pisces.Config(**TINY)
    plain = pisces.fit(tiny_lm, small_concept, config, 42)
    before = tiny_lm.model.get_output_embeddings().weight.detach().clone()
    concept_ids = build_token_set(tiny_lm.tokenizer, small_concept.concept_sentences, small_concept.neutral_sentences,
                                  small_concept.contrast_sentences).ids
    with torch.no_grad():  # what EMBER's tied policy does to the concept tokens' output rows
        tiny_lm.model.get_output_embeddings().weight[concept_ids] = before.mean(0)
    blind = pisces.fit(tiny_lm, small_concept, config, 42)
    seeing = pisces.fit(tiny_lm, small_concept, config, 42, MethodContext(progress=False, vocabulary=before))
    assert [f.index for f in seeing.features] == [f.index for f in plain.features] and plain.features
    assert [f.index for f in blind.features] != [f.index for f in plain.features]


def test_the_pipeline_hands_a_base_method_the_vocabulary_from_before_the_plug_in(tiny_model_dir, data_dir, tmp_path,
                                                                                 monkeypatch):
    from obliviate import methods
    from obliviate.models.loading import load_model

    seen = []
    plain = pisces.fit

    def spy(lm, data, config, seed=42, context=None, judge=None):
        seen.append((context.vocabulary, lm.model.get_output_embeddings().weight.detach().clone()))
        return plain(lm, data, config, seed, context, judge)

    monkeypatch.setattr(methods.get("pisces"), "fit", spy)
    original = load_model(str(tiny_model_dir)).model.get_output_embeddings().weight.detach()
    obliviate.erase("Golf", data=data_dir, out=tmp_path / "run", model={"name": str(tiny_model_dir)}, progress=False,
                    save_model=False, method="pisces", with_ember=True,
                    ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                    methods={"pisces": {**TINY, "ks": (0.3,), "values": (8.0,)}},
                    evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50,
                                "fit_at_chance": True},
                    data_options={"general_questions": 6})
    (vocabulary, current), = seen
    assert torch.equal(vocabulary, original) and not torch.equal(current, original)

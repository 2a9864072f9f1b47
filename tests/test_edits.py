import pytest
import torch

from obliviate.edits.embedding import EmbeddingPatch
from obliviate.edits.protocol import EditVerificationError, apply_verified, revert_verified
from obliviate.errors import ObliviateError
from obliviate.methods import ember
from obliviate.models.loading import embedding_scale, untie_output_embeddings


@pytest.fixture
def fitted(tiny_lm, small_concept):
    untie_output_embeddings(tiny_lm.model)
    return ember.fit(tiny_lm, small_concept, ember.Config(k=20, ratio_threshold=1.0))


def test_patch_row_arithmetic_is_exact_in_float64(tiny_lm, fitted):
    delta = 3.0
    patch = fitted.patch(delta)
    scale = embedding_scale(tiny_lm.model)
    assert scale == pytest.approx(32 ** 0.5)  # read from the module: Gemma scales by sqrt(d)
    expected = fitted.original_rows.double() - delta * fitted.contributions / scale
    torch.testing.assert_close(patch.edited_rows.double(), expected, rtol=0, atol=1e-6)
    # In the space the model uses, the row moved by exactly delta * c_i.
    moved = (patch.original_rows.double() - patch.edited_rows.double()) * scale
    torch.testing.assert_close(moved, delta * fitted.contributions, rtol=1e-5, atol=1e-5)


def test_only_the_chosen_rows_change_and_revert_restores_the_bits(tiny_lm, fitted):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    patch = fitted.patch(5.0)
    assert patch.changed_token_ids(), "the fit must select tokens for this test to mean anything"
    apply_verified(patch, tiny_lm.model)
    after = tiny_lm.model.state_dict()
    for name, tensor in after.items():
        if name.endswith("embed_tokens.weight"):
            changed = torch.nonzero((tensor != before[name]).any(dim=1)).flatten().tolist()
            assert set(changed) == patch.changed_token_ids()
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"
    revert_verified(patch, tiny_lm.model)
    for name, tensor in tiny_lm.model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_verification_catches_a_change_outside_the_patch(tiny_lm, fitted):
    patch = fitted.patch(1.0)

    class Sneaky(EmbeddingPatch):
        def apply(self, model):
            super().apply(model)
            with torch.no_grad():
                model.lm_head.weight[0, 0] += 1.0

    sneaky = Sneaky(patch.token_ids, patch.original_rows, patch.edited_rows, patch.metadata)
    with pytest.raises(EditVerificationError, match="lm_head"):
        apply_verified(sneaky, tiny_lm.model)


def test_patch_round_trips_through_safetensors(tmp_path, fitted):
    patch = fitted.patch(2.0)
    patch.save(tmp_path / "p.safetensors")
    loaded = EmbeddingPatch.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.token_ids, patch.token_ids)
    assert torch.equal(loaded.edited_rows, patch.edited_rows)
    assert loaded.metadata["delta"] == "2.0"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_a_patch_for_another_model_is_refused(tiny_tokenizer, fitted):
    from conftest import make_tiny_lm

    other = make_tiny_lm(tiny_tokenizer, "llama", seed=1)
    with pytest.raises(ObliviateError, match="another model"):
        fitted.patch(1.0).apply(other.model)


def test_a_saved_patch_is_forward_only_and_cannot_revert(tmp_path, tiny_lm, fitted):
    patch = fitted.patch(4.0)
    before = tiny_lm.model.get_input_embeddings().weight.detach().clone()
    patch.save(tmp_path / "p.safetensors")
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "p.safetensors")
    assert set(stored) == {"token_ids", "edited_rows"}  # no original row in the file
    loaded = EmbeddingPatch.load(tmp_path / "p.safetensors")
    assert loaded.metadata["revertible"] == "False" and loaded.original_sha256() == patch.original_sha256()
    apply_verified(loaded, tiny_lm.model)  # applies: the hash of the original rows matches
    assert not torch.equal(before, tiny_lm.model.get_input_embeddings().weight)
    with pytest.raises(ObliviateError, match="forward-only.*cannot revert"):
        revert_verified(loaded, tiny_lm.model)
    with pytest.raises(ObliviateError, match="not this patch's original"):
        loaded.bound_to(tiny_lm.model)  # an edited model cannot lend its rows as the original
    tiny_lm.model.get_input_embeddings().weight.data.copy_(before)
    bound = loaded.bound_to(tiny_lm.model)  # the original model lends its rows, in memory only
    apply_verified(bound, tiny_lm.model)
    revert_verified(bound, tiny_lm.model)
    assert torch.equal(before, tiny_lm.model.get_input_embeddings().weight)


def test_a_revertible_patch_reverts_and_says_so(tmp_path, tiny_lm, fitted):
    patch = fitted.patch(4.0)
    before = tiny_lm.model.get_input_embeddings().weight.detach().clone()
    patch.save(tmp_path / "revert.safetensors", revertible=True)
    loaded = EmbeddingPatch.load(tmp_path / "revert.safetensors")
    assert loaded.metadata["revertible"] == "True"
    apply_verified(loaded, tiny_lm.model)
    revert_verified(loaded, tiny_lm.model)
    assert torch.equal(before, tiny_lm.model.get_input_embeddings().weight)


def test_a_revertible_patch_is_refused_inside_the_output_folder(tmp_path):
    from obliviate.edits.embedding import check_revertible_path

    for inside in ("out/model/p.safetensors", "out/p.safetensors"):
        with pytest.raises(ObliviateError, match="inside the output folder"):
            check_revertible_path(tmp_path / inside, tmp_path / "out")
    assert check_revertible_path(tmp_path / "keep" / "p.safetensors", tmp_path / "out") == tmp_path / "keep" / "p.safetensors"


def test_a_saved_patch_for_another_model_is_refused_naming_both(tmp_path, tiny_lm, fitted):
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_lm, tiny_config

    patch = fitted.patch(2.0)
    apply_verified(patch, tiny_lm.model)  # records the model it was made for
    patch.save(tmp_path / "p.safetensors")
    loaded = EmbeddingPatch.load(tmp_path / "p.safetensors")
    bigger = AutoModelForCausalLM.from_config(tiny_config("llama", 1600))
    with pytest.raises(ObliviateError, match=r"another model \(tiny-gemma3, vocabulary 1500.*vocabulary 1600"):
        loaded.apply(bigger)
    same_shape = make_tiny_lm(tiny_lm.tokenizer, "llama", seed=1)  # same shape, other weights: the hash differs
    with pytest.raises(ObliviateError, match="sha256.*another model"):
        loaded.apply(same_shape.model)
    bad_ids = EmbeddingPatch(torch.tensor([1500]), None, loaded.edited_rows[:1], dict(loaded.metadata))
    with pytest.raises(ObliviateError, match="not valid ids"):
        bad_ids.apply(tiny_lm.model)


def test_every_edit_kind_answers_the_protocol_and_declares_its_capabilities(tiny_lm, fitted):
    from obliviate.edits.protocol import CompositeEdit, Edit
    from obliviate.edits.weights import LoraAdapter, ParameterDelta

    weight = tiny_lm.model.get_input_embeddings().weight
    tokens = torch.tensor([5, 6])
    rows = weight[tokens].detach().clone()
    plain = EmbeddingPatch(token_ids=tokens, original_rows=rows, edited_rows=rows + 1, metadata={})
    with_output = EmbeddingPatch(token_ids=tokens, original_rows=rows, edited_rows=rows + 1, metadata={},
                                 output_rows=rows - 1, original_output_rows=rows)
    delta = ParameterDelta(original={}, new={})
    for edit in (plain, with_output, delta, CompositeEdit([plain, delta])):
        assert isinstance(edit, Edit), type(edit)
        assert edit.affected(tiny_lm.model, [[1, 2]]) is None  # none of them claims to know which inputs move
    assert not plain.sets_output_rows() and with_output.sets_output_rows() and not delta.sets_output_rows()
    assert CompositeEdit([delta, with_output]).sets_output_rows()  # a part that sets them is enough
    assert LoraAdapter.reveals_original_beside_model and not plain.reveals_original_beside_model
    assert not delta.reveals_original_beside_model


def _snapshot(edit) -> dict:
    """Every tensor and string an edit holds, copied (nested dicts and tuples walked)."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [copy(v) for v in value]
        return value
    return {name: copy(value) for name, value in vars(edit).items()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_edits_are_immutable_applying_and_reverting_change_the_model_only(tiny_lm, small_concept):
    import dataclasses

    from obliviate.edits.weights import LoraAdapter, ParameterDelta, base_weights

    neutral = ember.fit(tiny_lm, small_concept, ember.Config(k=20, ratio_threshold=1.0, untie_embeddings=False,
                                                             tied_output="neutral"))
    patch = neutral.patch(5.0)
    assert tiny_lm.untied_here and patch.sets_output_rows()  # the fit untied the tied matrix ("neutral")
    assert patch.original_output_rows is not None  # read at the fit, not at apply
    assert patch.metadata["vocab_size"] == str(tiny_lm.model.get_input_embeddings().weight.shape[0])
    name, weight = next((n, p) for n, p in tiny_lm.model.named_parameters() if "mlp.down_proj" in n)
    delta = ParameterDelta(original={name: weight.detach().clone()}, new={name: weight.detach() + 0.5})
    a, b = torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2)
    adapter = LoraAdapter({name: (a, b)}, 0.5, base_weights(tiny_lm.model, [name]))
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    for edit in (patch, delta, adapter):
        held = _snapshot(edit)
        fingerprints = apply_verified(edit, tiny_lm.model)
        assert not all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())
        revert_verified(edit, tiny_lm.model, fingerprints)
        assert _same(_snapshot(edit), held), type(edit).__name__
        assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items()), type(edit).__name__
        with pytest.raises(dataclasses.FrozenInstanceError):
            edit.metadata = {}
    with pytest.raises(ValueError, match="original output rows"):  # revert would need them
        EmbeddingPatch(patch.token_ids, patch.original_rows, patch.edited_rows, {}, output_rows=patch.output_rows)
    with pytest.raises(ValueError, match="base weights"):
        LoraAdapter({name: (a, b)}, 0.5, {})


def test_patch_between_recovers_an_embedding_edit_and_refuses_anything_else(tiny_lm, small_concept):
    import copy

    from obliviate.edits.embedding import patch_between

    original = copy.deepcopy(tiny_lm.model)  # tied, as loaded
    neutral = ember.fit(tiny_lm, small_concept, ember.Config(k=20, ratio_threshold=1.0, tied_output="neutral"))
    made = neutral.patch(5.0)
    made.apply(tiny_lm.model)  # the erased model: untied by the fit, rows and output rows set
    found = patch_between(original, tiny_lm.model)
    assert found is not None and found.metadata["embeddings_untied"] == "True"
    moved = sorted(made.changed_token_ids())
    assert found.token_ids.tolist() == moved and torch.equal(found.edited_rows, made.edited_rows[made._moved()])
    assert torch.equal(found.output_rows, made.output_rows[made._moved()])
    untie_output_embeddings(original)
    apply_verified(found, original)  # the found patch turns the original into the erased model
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), tiny_lm.model.state_dict().values()))
    assert patch_between(original, tiny_lm.model).changed_token_ids() == set()  # nothing differs any more
    with torch.no_grad():
        next(p for n, p in tiny_lm.model.named_parameters() if "mlp" in n).add_(1.0)
    assert patch_between(original, tiny_lm.model) is None  # a weight outside the embedding moved


def test_patch_between_tied_models_sets_no_output_rows(tiny_lm, small_concept):
    import copy

    from obliviate.edits.embedding import patch_between

    original = copy.deepcopy(tiny_lm.model)
    shared = ember.fit(tiny_lm, small_concept, ember.Config(k=20, ratio_threshold=1.0, tied_output="shared"))
    shared.patch(5.0).apply(tiny_lm.model)
    found = patch_between(original, tiny_lm.model)
    assert found is not None and not found.sets_output_rows() and found.metadata["embeddings_untied"] == "False"
    assert found.changed_token_ids() == shared.patch(5.0).changed_token_ids()

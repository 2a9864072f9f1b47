"""White-box attacks on planted erasures: tied-restore recovers them exactly, the repair
flags planted outlier rows (precision and recall) and rebuilds them, and the attacks run
through the CLI on a patch-only erase run."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from obliviate import attacks
from obliviate.attacks import relearning, white_box
from obliviate.attacks.common import AttackContext
from obliviate.models.loading import LoadedModel, parameter_fingerprints, untie_output_embeddings

from conftest import make_tiny_lm

PLANTED = torch.tensor([5, 77, 300, 640, 901, 1200, 1333, 1499])


def _plant(lm: LoadedModel, scale: float = 20.0, seed: int = 0) -> LoadedModel:
    """A copy of ``lm`` whose output layer keeps the original rows (the reference untie) and
    whose input rows of PLANTED moved far: what an untied EMBER edit with a large delta does."""
    erased = LoadedModel(model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer, name="planted", source="config")
    untie_output_embeddings(erased.model)
    weight = erased.model.get_input_embeddings().weight
    push = torch.randn(len(PLANTED), weight.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weight[PLANTED] += scale * weight.norm(dim=1).median() * push / push.norm(dim=1, keepdim=True)
    return erased


@pytest.fixture
def planted_ctx(tiny_tokenizer, small_concept, data_dir, tmp_path):
    original = make_tiny_lm(tiny_tokenizer, seed=0)
    models = {"original": original, "erased": _plant(original)}
    return AttackContext(models=models, data=small_concept, data_dir=data_dir, bootstrap=50, out=tmp_path,
                         progress=False, options={"edited_token_ids": PLANTED.tolist()})


def test_tied_restore_recovers_a_planted_erasure_exactly(planted_ctx):
    original, erased = planted_ctx.models["original"], planted_ctx.models["erased"]
    mirror = white_box.mirror_rows(erased.model)
    assert mirror["tensor"] == "lm_head.weight" and torch.equal(mirror["token_ids"], PLANTED)
    assert torch.equal(mirror["rows"], original.model.get_input_embeddings().weight[PLANTED])
    assert white_box.mirror_rows(original.model) is None  # tied: nothing separate to copy from

    before = parameter_fingerprints(erased.model)
    result = attacks.run("tied-restore", planted_ctx)
    assert result["erased"]["rows_restored"] == len(PLANTED) and result["erased"]["precision"] == 1.0
    assert result["erased"]["after"] == result["original"]["before"]  # the original model's answers, exactly
    assert result["original"]["after"] == result["original"]["before"] and result["original"]["rows_restored"] == 0
    assert all(torch.equal(before[k], v) for k, v in parameter_fingerprints(erased.model).items())


def test_robust_z_has_the_known_value():
    z = white_box.robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    # median 3, MAD median(|-2, -1, 0, 1, 97|) = 1
    torch.testing.assert_close(z, torch.tensor([-2.0, -1.0, 0.0, 1.0, 97.0]) / 1.4826)


def test_repair_flags_planted_rows_and_rebuilds_them(planted_ctx):
    original, erased = planted_ctx.models["original"], planted_ctx.models["erased"]
    flags = white_box.flag_outliers(erased.model.get_input_embeddings().weight, 6.0)
    flagged = set(torch.nonzero(flags["any"]).flatten().tolist())
    hits = len(flagged & set(PLANTED.tolist()))
    assert hits / len(PLANTED) == 1.0  # recall
    assert hits / len(flagged) >= 0.8  # precision
    assert not white_box.flag_outliers(original.model.get_input_embeddings().weight, 6.0)["norm"].any()

    mask = torch.zeros(erased.model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    mask[PLANTED] = True
    weight = erased.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(white_box.reconstruct(erased.model, mask, "mean")[0], weight[~mask].mean(0))
    # The output layer kept the originals, so the least-squares map is the identity: exact rebuild.
    rebuilt = white_box.reconstruct(erased.model, mask, "lstsq", ridge=0.0)
    torch.testing.assert_close(rebuilt, original.model.get_input_embeddings().weight[PLANTED].detach(), atol=1e-5, rtol=1e-4)
    assert white_box.reconstruct(original.model, mask, "lstsq") is None  # tied: no output matrix to map from


def test_embedding_repair_reports_precision_recall_and_leaves_models_alone(planted_ctx):
    before = {role: parameter_fingerprints(lm.model) for role, lm in planted_ctx.models.items()}
    result = attacks.run("embedding-repair", planted_ctx)
    erased = result["erased"]
    assert erased["recall"] == 1.0 and erased["precision"] >= 0.8 and erased["edited_rows"] == len(PLANTED)
    assert set(erased["per_reconstruction"]) == {"mean", "lstsq"} and erased["flagged_by_norm"] >= len(PLANTED)
    assert erased["per_reconstruction"]["lstsq"] == result["original"]["before"]  # exact rebuild, same answers
    assert "precision" not in result["original"] and "recovered_frac" in result
    for role, lm in planted_ctx.models.items():
        assert all(torch.equal(before[role][k], v) for k, v in parameter_fingerprints(lm.model).items())


def test_repair_relearn_and_the_strong_preset(planted_ctx):
    strong = attacks.get("relearn-strong")
    assert (strong.Config().lr, strong.Config().epochs) == (1e-4, 3) and strong.run.func is relearning.run
    assert attacks.get("relearn").Config().lr == 1e-5  # the reference stays as it was
    settings = {"paragraphs": 2, "epochs": 1, "max_length": 16}
    result = attacks.run("repair-relearn", planted_ctx, settings)
    assert result["erased"]["reconstruction"] == "lstsq" and result["original"]["reconstruction"] in ("mean", None)
    assert result["erased"]["repaired"] == result["original"]["before"]
    assert len(result["erased"]["curve"]) == 3 and len(result["erased"]["losses"]) == 1


def test_attacks_run_on_a_patch_only_erase_run(tiny_model_dir, data_dir, tmp_path):
    import obliviate
    from obliviate.cli import main

    obliviate.erase("Golf", data=data_dir, out=tmp_path / "run", model={"name": str(tiny_model_dir)}, progress=False,
                    save_model=False, ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                    evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50},
                    data_options={"general_questions": 6})
    code = main(["attack", "--model", str(tmp_path / "run"), "--data", str(data_dir), "--bootstrap", "50",
                 "--attacks", "tied-restore,embedding-repair", "--out", str(tmp_path / "attack"), "--no-progress"])
    assert code == 0
    results = json.loads((tmp_path / "attack" / "results.json").read_text())
    # the default gives the edited tokens the mean output row: tied-restore finds exactly those rows
    # and copies that row back (not the original, which is nowhere in the files)
    erased = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tied-restore"]["erased"]["rows_restored"] == erased["edited_token_count"] > 0
    repair = results["embedding-repair"]["erased"]
    assert repair["edited_rows"] > 0 and {"before", "after", "flagged", "precision", "recall"} <= set(repair)
    assert results["erase_results"]["leak_check"]["passed"]


def test_a_patch_only_run_of_a_base_method_on_ember_loads_both_edits(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """--no-save-model with --ember writes the embedding patch and the base method's weight
    delta; the attack's erased model carries both (it used to get the patch alone), and a
    delta made for other weights is refused."""
    import obliviate
    from obliviate.pipeline import erase as pipeline
    from obliviate.edits.weights import apply_weight_delta_file
    from obliviate.errors import ObliviateError
    from obliviate.models.loading import load_model
    from obliviate.pipeline.pair import erase_run_info, load_erased

    monkeypatch.setattr(pipeline, "choose", lambda results, rule="best": 0)  # a random tiny model passes no gate
    result = obliviate.erase("Golf", data=data_dir, out=tmp_path / "run", model={"name": str(tiny_model_dir)},
                             progress=False, save_model=False, method="grad_diff", with_ember=True,
                             ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                             methods={"grad_diff": {"steps": 2, "batch_size": 2, "max_length": 24, "lr": (1e-2,)}},
                             evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50,
                                         "fit_at_chance": True},
                             data_options={"general_questions": 6})
    assert (tmp_path / "run" / "weight_delta.safetensors").is_file()
    loaded = load_erased(*erase_run_info(str(tmp_path / "run")))
    in_memory = dict(result.lm.model.named_parameters())
    for name, value in loaded.model.named_parameters():
        assert torch.equal(value, in_memory[name]), name  # the erase run's model, both edits applied
    other = load_model(str(tiny_model_dir))
    with torch.no_grad():
        next(p for n, p in other.model.named_parameters() if "mlp" in n).add_(1.0)
        for p in other.model.parameters():
            p.add_(0.5)
    with pytest.raises(ObliviateError, match="made for another model"):
        apply_weight_delta_file(other.model, tmp_path / "run" / "weight_delta.safetensors")

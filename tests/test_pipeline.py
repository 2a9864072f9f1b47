"""The whole erase on a tiny model saved to a folder: files, verification, resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import obliviate
from obliviate import methods
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.errors import ObliviateError
from obliviate.pipeline.checkpoint import CandidateResult
from obliviate.pipeline.selection import NOTHING_TO_ERASE, choose

FAST = dict(
    ember={"k": 20, "ratio_threshold": 1.0, "delta_grid": (1.0, 50.0)},
    # a random model is at chance on every split: sweep the grids anyway (a user's model would not be)
    evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50, "fit_at_chance": True},
    data_options={"general_questions": 6},
)


def run(tiny_model_dir, data_dir, out, **extra):
    settings = {**FAST, **extra}
    return obliviate.erase("Golf", data=data_dir, out=out, model={"name": str(tiny_model_dir)}, progress=False, **settings)


def test_erase_writes_every_output_and_a_loadable_model(tiny_model_dir, data_dir, tmp_path):
    result = run(tiny_model_dir, data_dir, tmp_path / "run")
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    for key in ("concept", "method", "model", "seed", "delta", "features", "edited_token_count", "qa_test",
                "simdom_test", "general_test", "efficacy", "specificity", "coherence", "harmonic",
                "delta_sweep", "timings", "embeddings_untied", "general_knowledge_source"):
        assert key in results, key
    assert results["output_rows"] == "neutral"  # default: untied, edited tokens get the mean output row
    assert results["leak_check"]["passed"] and "leak_warning" not in results
    assert {"low", "high", "value"} <= set(results["qa_test"]["edited"])
    assert [c["params"]["delta"] for c in results["delta_sweep"]][0] == 1.0
    assert (out / "report.md").read_text().startswith("# Erasure of 'Golf'")
    card = (out / "model" / "README.md").read_text()  # a model card, ready for the Hub
    assert card.startswith("---") and "Golf" in card and "concept-erasure" in card
    assert not (out / ".checkpoint.json").exists() and not list(out.glob(".*tmp"))

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = torch.nonzero((reloaded.get_input_embeddings().weight != original.get_input_embeddings().weight).any(1))
    if results["delta"]:
        patch = EmbeddingPatch.load(out / "embedding_patch.safetensors")
        assert set(changed.flatten().tolist()) == patch.changed_token_ids()
        assert len(load_file(out / "embedding_patch.safetensors")["token_ids"]) == results["edited_token_count"]
        # The output layer is the edited matrix itself: no original row survives in it.
        assert torch.equal(reloaded.lm_head.weight, reloaded.get_input_embeddings().weight)
    else:
        assert len(changed) == 0
    assert result["concept"] == "Golf"


def test_a_concept_the_original_answers_at_chance_is_not_fitted(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """No candidate can win where the original's TRAIN QA is at chance (a random model's is):
    neither stage is fitted or swept and nothing is applied; a fixed delta still is."""
    at_chance = {**FAST["evaluation"], "fit_at_chance": False}

    def must_not_fit(*args, **kwargs):
        raise AssertionError("fitted although nothing can be erased")

    with monkeypatch.context() as patched:
        for name in ("ember", "snmf"):
            patched.setattr(methods.get(name), "fit", must_not_fit)
        result = run(tiny_model_dir, data_dir, tmp_path / "skip", method="snmf", with_ember=True,
                     evaluation=at_chance, save_model=False)
    assert result.edit is None and result["delta"] == 0.0
    assert result["delta_sweep"] == [] and result["method_sweep"] == []
    assert result["details"]["ember"]["skipped"] == result["details"]["snmf"]["skipped"] == NOTHING_TO_ERASE
    assert result["qa_test"]["edited"]["value"] == result["qa_test"]["base"]["value"]
    assert not list((tmp_path / "skip").glob("*.safetensors"))

    fixed = run(tiny_model_dir, data_dir, tmp_path / "fixed", ember={**FAST["ember"], "delta": 7.0},
                evaluation=at_chance, save_model=False)
    assert fixed["delta"] == 7.0 and (tmp_path / "fixed" / "embedding_patch.safetensors").exists()


def test_the_grid_skips_concept_fluency_unless_asked_and_chooses_the_same(tiny_model_dir, data_dir, tmp_path):
    """EMBER's grid ranks on general coherence: the concept's prompts are generated for
    every candidate only when asked; the scores, the choice and the TEST numbers agree."""
    plain = run(tiny_model_dir, data_dir, tmp_path / "plain")
    asked = run(tiny_model_dir, data_dir, tmp_path / "asked",
                evaluation={**FAST["evaluation"], "grid_concept_fluency": True})
    assert all("concept_fluency" not in c["metrics"] and "coherence" in c["metrics"] for c in plain["delta_sweep"])
    assert all("concept_fluency" in c["metrics"] for c in asked["delta_sweep"])
    assert [(c["params"], c["score"]) for c in plain["delta_sweep"]] == [(c["params"], c["score"]) for c in asked["delta_sweep"]]
    assert plain["delta"] == asked["delta"] and "concept_fluency" in plain.results
    assert plain["concept_fluency"] == asked["concept_fluency"]


def test_fixed_delta_and_patch_apply_revert_through_the_api(tiny_model_dir, data_dir, tmp_path):
    result = run(tiny_model_dir, data_dir, tmp_path / "run", ember={**FAST["ember"], "delta": 7.0}, save_model=False)
    assert not (tmp_path / "run" / "model").exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["delta"] == 7.0
    lm = obliviate.load_model(str(tiny_model_dir))
    before = lm.model.get_input_embeddings().weight.clone()
    patch = obliviate.apply_patch(lm, tmp_path / "run" / "embedding_patch.safetensors")
    assert not torch.equal(before, lm.model.get_input_embeddings().weight)
    with pytest.raises(ObliviateError, match="forward-only"):  # the file holds no original row
        obliviate.revert_patch(lm, patch)
    obliviate.revert_patch(lm, result.edit)  # the run's patch in memory still can
    assert torch.equal(before, lm.model.get_input_embeddings().weight)


def test_an_interrupted_grid_resumes_with_the_same_numbers(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from obliviate.pipeline import erase as pipeline

    # A random tiny model answers at chance, which stops the grid at its first point (nothing
    # measurable to erase); this plumbing test needs the grid to go on.
    monkeypatch.setattr("obliviate.evaluation.evaluator.near_chance_sets", lambda samples, chance=None: frozenset())
    full = run(tiny_model_dir, data_dir, tmp_path / "full", save_model=False).results
    assert len(full["delta_sweep"]) == 2
    calls = {"n": 0}
    real = pipeline.Evaluator.evaluate

    def dies_on_second_train(self, split, edit, **options):
        if split == "train":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(self, split, edit, **options)

    monkeypatch.setattr(pipeline.Evaluator, "evaluate", dies_on_second_train)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, data_dir, tmp_path / "resumed", save_model=False)
    checkpoint = json.loads((tmp_path / "resumed" / ".checkpoint.json").read_text())
    assert len(checkpoint["sweeps"]["ember"]) == 1
    assert not (tmp_path / "resumed" / "results.json").exists()  # nothing that looks complete
    monkeypatch.setattr(pipeline.Evaluator, "evaluate", real)
    resumed = run(tiny_model_dir, data_dir, tmp_path / "resumed", save_model=False).results
    without_seconds = lambda sweep: [{k: v for k, v in c.items() if k != "seconds"} for c in sweep]  # noqa: E731
    assert without_seconds(resumed["delta_sweep"]) == without_seconds(full["delta_sweep"])
    assert resumed["qa_test"] == full["qa_test"]
    # the candidate read back keeps the seconds the interrupted run spent on it, and they count
    earlier = checkpoint["sweeps"]["ember"][0]["seconds"]
    assert earlier > 0 and resumed["delta_sweep"][0]["seconds"] == earlier
    assert resumed["timings"]["resumed_grid"] == pytest.approx(earlier)
    assert "resumed_grid" not in full["timings"] and all(c["seconds"] > 0 for c in full["delta_sweep"])


def test_an_out_folder_with_another_run_is_refused(tiny_model_dir, data_dir, tmp_path):
    run(tiny_model_dir, data_dir, tmp_path / "run", save_model=False)
    with pytest.raises(ObliviateError, match="different run.*--overwrite"):
        run(tiny_model_dir, data_dir, tmp_path / "run", save_model=False, seed=1)


def test_choice_is_the_best_score_or_the_one_standard_error_rule():
    def cand(delta, score, se, rejected=None):
        return CandidateResult({"delta": delta}, {}, score, se, rejected)

    noisy = [cand(0.5, 0.60, 0.05), cand(1, 0.64, 0.05), cand(2, 0.70, 0.08)]
    assert choose(noisy, "one-se") == 1  # 0.64 >= 0.70 - 0.08; 0.60 is not
    assert choose(noisy) == 2  # the reference: the best score
    assert choose([cand(1, 0.7, 0.0), cand(2, 0.7, 0.0)]) == 0  # ties go to the smaller delta

    def saturated(delta, drop):
        return CandidateResult({"delta": delta}, {"qa_prob_drop": {"value": drop}}, 1.0, 0.0)

    # a saturated score: the larger drop of the correct option's probability wins the tie
    assert choose([saturated(5, 0.10), saturated(50, 0.30), saturated(200, 0.20)]) == 1
    assert choose([saturated(5, 0.10), saturated(50, 0.10)]) == 0  # then the smaller delta
    assert choose([saturated(5, 0.50), cand(50, 0.99, 0.0)]) == 0  # the score first
    assert choose([cand(1, 0.0, 0.0), cand(2, 0.0, 0.0)]) is None
    assert choose([cand(1, 0.9, 0.0, rejected="general"), cand(2, 0.5, 0.0)]) == 1


def test_every_registered_method_provides_the_protocol():
    from obliviate import methods

    for name in methods.available():
        module = methods.get(name)  # raises TypeError when Config or fit is missing
        assert isinstance(module, methods.Method) and callable(module.fit), name


def always_first(monkeypatch):
    """A random tiny model knows nothing (its QA is at chance), so no grid cell can win:
    choose the first, to test what happens to a chosen edit."""
    from obliviate.pipeline import erase as pipeline

    monkeypatch.setattr(pipeline, "choose", lambda results, rule="best": 0)


def test_eco_erases_as_a_method_and_saves_its_artifact_not_a_model_copy(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from obliviate.methods.eco import EcoArtifact

    always_first(monkeypatch)
    out = tmp_path / "eco"
    result = run(tiny_model_dir, data_dir, out, method="eco", methods={"eco": {"sigma": "2.0", "layer": "2"}},
                 data_options={"general_questions": 40})
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "eco" and results["params"] == {"sigma": 2.0}
    assert results["saved"] == {"model": False, "edits": ["eco"]} and not (out / "model").exists()
    assert EcoArtifact.load(out / "eco").corruption.strength == 2.0
    assert result.edit.expected_changes(result.lm.model) == {}  # a hook: no weight moves


def test_a_weight_edit_is_saved_forward_only_beside_the_model(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    always_first(monkeypatch)
    out = tmp_path / "gd"
    run(tiny_model_dir, data_dir, out, method="grad_diff",
        methods={"grad_diff": {"steps": "2", "batch_size": "2", "max_length": "16", "lr": "1e-2"}})
    results = json.loads((out / "results.json").read_text())
    assert results["saved"]["edits"] == ["weight_delta.safetensors"] and results["saved"]["model"]
    # the chosen cell's TRAIN numbers beside TEST, as the grid saw them and as they came out
    gap, chosen = results["train_test_gap"], results["method_sweep"][0]["metrics"]
    assert {"efficacy", "specificity"} <= set(gap) <= {"efficacy", "specificity", "coherence"}
    for name, entry in gap.items():
        assert entry["train"] == chosen[name]["value"] and entry["test"] == results[name]["value"]
        assert entry["gap"] == pytest.approx(entry["train"] - entry["test"])
    delta = load_file(out / "weight_delta.safetensors")
    saved = load_file(out / "model" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert delta and set(delta) <= set(saved)
    for name, tensor in delta.items():  # the new values, exactly as in model/; no original in the file
        assert torch.equal(tensor, saved[name]) and not torch.equal(tensor, original[name])


def test_two_concepts_compose_their_edits_and_report_each_and_the_cross_table(tiny_model_dir, data_dir, tmp_path,
                                                                              monkeypatch):
    always_first(monkeypatch)
    out = tmp_path / "two"
    result = run(tiny_model_dir, data_dir, out, concepts=("Gambling",), ember={**FAST["ember"], "delta": 50.0})
    results = json.loads((out / "results.json").read_text())
    assert results["concept"] == "Golf + Gambling" and set(results["concepts"]) == {"Golf", "Gambling"}
    assert set(results["delta"]) == {"Golf", "Gambling"} and all(d == 50.0 for d in results["delta"].values())
    assert set(results["cross"]) == {"Golf", "Gambling"}
    assert all(set(row) == {"Golf", "Gambling"} for row in results["cross"].values())
    assert "## Each concept (TEST), and the cross table" in (out / "report.md").read_text()
    assert "under these rows alone" in (out / "report.html").read_text()
    # one forward-only patch holds both concepts' rows; it applies to the original model and
    # gives exactly the saved model's embeddings (shared rows carry both edits)
    patch = EmbeddingPatch.load(out / "embedding_patch.safetensors")
    lm = obliviate.load_model(str(tiny_model_dir))
    obliviate.apply_patch(lm, out / "embedding_patch.safetensors")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert torch.equal(lm.model.get_input_embeddings().weight, saved.get_input_embeddings().weight)
    assert patch.changed_token_ids() == result.edit.changed_token_ids()
    assert results["edited_token_count"] == len(patch.changed_token_ids())
    assert results["leak_check"]["passed"]
    shared = set(results["shared_token_ids"])
    assert shared == {int(t) for t in patch.metadata["shared_token_ids"].split(",") if t}
    # the general sets leave out both erased concepts
    from obliviate.api import make_config
    from obliviate.pipeline.inputs import load_concept_data

    config = make_config(concept="Golf", concepts=("Gambling",), data={"data": str(data_dir), "general_questions": 40})
    gambling = {q.question for q in load_concept_data(config, "Gambling").questions["qa_test"]}
    assert not gambling & {q.question for q in load_concept_data(config, "Golf").general["test"]}


def test_train_only_then_the_same_command_evaluates_without_training_again(tiny_model_dir, data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """`erase --train-only` (the step `accelerate launch` runs on several GPUs) trains the grid
    into OUT/checkpoints and writes no result; the same command without it evaluates,
    reusing every trained candidate."""
    from obliviate.cli import main
    from obliviate.training import loop

    out = tmp_path / "run"
    argv = ["erase", "--concept", "Golf", "--data", str(data_dir), "--model", str(tiny_model_dir), "--out", str(out),
            "--method", "grad_diff", "--set", "steps=1", "--set", "batch_size=2", "--set", "max_length=16",
            "--set", "lr=1e-3,1e-2", "--fit-at-chance", "--coherence-new-tokens", "2",
            "--neutral-coherence-prompts", "1",
            "--general-prompts", "2", "--general-questions", "4", "--bootstrap", "20", "--no-save-model"]
    assert main([*argv, "--train-only"]) == 0, capsys.readouterr().err
    assert "2 candidate(s) of grad_diff trained" in capsys.readouterr().out
    assert len(list((out / "checkpoints").rglob("trained.safetensors"))) == 2 and not (out / "results.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a trained candidate was trained again")

    monkeypatch.setattr(loop, "train", no_training)
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert len(results["method_sweep"]) == 2
    assert main([*argv[:9], "--method", "ember", "--train-only"]) == 2  # EMBER is not trained


def test_run_checkpoint_writes_each_grid_typed_and_reads_it_back(tmp_path):
    from obliviate.pipeline.checkpoint import RunCheckpoint
    from obliviate.pipeline.erase import StageKey

    out = tmp_path / "run"
    first = RunCheckpoint.open(out, "print-1", overwrite=False)
    first.mark()
    key = str(StageKey("ember", "Gun"))
    assert key == "ember[Gun]" and str(StageKey("rmu")) == "rmu"
    results = [CandidateResult({"delta": 5.0}, {"qa_frac": {"value": 0.5}}, 0.7, 0.1, None, 2.5)]
    first.record(key, results)
    results[0].metrics["coherence"] = {"value": 0.9}  # a later pass adds a metric and time, then records again
    results[0].seconds += 1.5
    first.record(key, results)
    again = RunCheckpoint.open(out, "print-1", overwrite=False)
    assert again.grid(key) == results and isinstance(again.grid(key)[0], CandidateResult)
    assert again.seconds_before_resume(key) == 4.0 and again.seconds_before_resume("rmu") == 0.0
    with pytest.raises(ObliviateError, match="different run"):
        RunCheckpoint.open(out, "print-2", overwrite=False)
    assert RunCheckpoint.open(out, "print-2", overwrite=True).grids == {}

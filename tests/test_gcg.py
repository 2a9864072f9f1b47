"""GCG through nanogcg: the model view it searches on is the model (the embedding scale
included), the search improves its own objective, the numbers are on held-out questions,
the original's suffixes come from the results cache, and nothing of the caller's changes."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from obliviate import attacks
from obliviate.attacks import gcg
from obliviate.attacks.common import AttackContext, prepared_test
from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import knowledge_fraction
from obliviate.models.loading import parameter_fingerprints

from conftest import make_tiny_lm

pytest.importorskip("nanogcg")

SMALL = {"questions": 2, "num_steps": 3, "search_width": 8, "topk": 8, "suffix_tokens": 3, "bf16_autocast": False}


@pytest.fixture
def ctx(tiny_tokenizer, small_concept, data_dir, tmp_path):
    models = {"original": make_tiny_lm(tiny_tokenizer, seed=0), "erased": make_tiny_lm(tiny_tokenizer, seed=1, tie=False)}
    return AttackContext(models=models, data=small_concept, data_dir=data_dir, bootstrap=50, out=tmp_path, progress=False)


def test_view_gives_nanogcg_the_scaled_embedding(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer)  # Gemma 3: the embedding module multiplies by sqrt(d_model)
    view = gcg.GcgView(lm.model, bf16_autocast=False)
    ids = torch.tensor([[2, 40, 41, 300, 7]])
    onehot = torch.nn.functional.one_hot(ids, view.get_input_embeddings().num_embeddings).float()
    through_onehot = view(inputs_embeds=onehot @ view.get_input_embeddings().weight).logits
    plain = lm.model(input_ids=ids).logits
    assert torch.allclose(through_onehot, plain, atol=1e-5)
    view.keep = 3  # only the positions nanogcg reads (target length + 1, from the end)
    assert torch.allclose(view(inputs_embeds=view.get_input_embeddings()(ids)).logits[:, -3:], plain[:, -3:], atol=1e-5)
    assert not torch.allclose(onehot @ lm.model.get_input_embeddings().weight, view.get_input_embeddings()(ids))


def test_attack_reports_held_out_questions_and_leaves_the_caller_alone(ctx, monkeypatch):
    calls = []
    search = gcg.search_suffixes
    monkeypatch.setattr(gcg, "search_suffixes", lambda lm, *a, **k: calls.append(lm.name) or search(lm, *a, **k))
    tokenizer = ctx.models["original"].tokenizer
    template, deterministic = getattr(tokenizer, "chat_template", None), torch.are_deterministic_algorithms_enabled()
    before = {role: parameter_fingerprints(lm.model) for role, lm in ctx.models.items()}

    result = attacks.run("gcg", ctx, SMALL)

    n = len(prepared_test(ctx, ctx.models["original"]))
    attacked = gcg.attacked_questions(n, SMALL["questions"], ctx.seed)
    for role in ("original", "erased"):
        out = result[role]
        assert [s["question"] for s in out["suffixes"]] == attacked.tolist()
        assert sorted(out["held_out_questions"] + attacked.tolist()) == list(range(n))
        assert len(out["correct_after"]) == len(out["correct_before"]) == n - len(attacked)
        best = max(s["held_out"]["value"] for s in out["suffixes"])
        assert out["after"]["value"] == pytest.approx(best) == pytest.approx(np.mean(out["correct_after"]))
        assert out["forced"]["after"] == pytest.approx(np.mean([s["correct_after"] for s in out["suffixes"]]))
        assert all(s["suffix"] and np.isfinite(s["loss"]) for s in out["suffixes"])
        assert all(torch.equal(before[role][k], v) for k, v in parameter_fingerprints(ctx.models[role].model).items())
    # the share of the original's above-chance knowledge the erased model gets back on held-out questions
    recovered = result["recovered_frac"]
    assert recovered["value"] == pytest.approx(knowledge_fraction(np.mean(result["erased"]["correct_after"]),
                                                                  np.mean(result["original"]["correct_before"])))
    assert recovered["low"] <= recovered["value"] <= recovered["high"]
    assert getattr(tokenizer, "chat_template", None) == template  # nanogcg sets one; it is given back
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert len(calls) == 2

    ctx.models["erased"] = make_tiny_lm(tokenizer, seed=2, tie=False)
    again = attacks.run("gcg", ctx, SMALL)
    assert len(calls) == 3  # the original's suffixes came from the results cache
    assert again["original"]["suffixes"] == result["original"]["suffixes"]


def _target_loss(lm, prompt: str, suffix: str, target: str) -> float:
    """nanogcg's objective recomputed on the plain model: mean cross-entropy of the target
    after prompt-before-suffix, the suffix and prompt-after-suffix, each tokenized apart."""
    tok = lm.tokenizer
    before, after = prompt.split(gcg.OPTIM_MARK)
    pieces = [tok(before).input_ids] + [tok(t, add_special_tokens=False).input_ids for t in (suffix, after, target)]
    ids = torch.tensor([sum(pieces, [])])
    n_target = len(pieces[-1])
    logits = lm.model(input_ids=ids).logits[0, -n_target - 1:-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, -n_target:]).item()


def test_search_lowers_the_target_loss_and_reports_it_truly(ctx):
    lm = ctx.models["original"]
    prepared = prepared_test(ctx, lm)
    config = gcg.Config(**{**SMALL, "num_steps": 6})
    found = gcg.search_suffixes(lm, prepared, np.array([0]), config, ctx.seed)[0]
    prompt, options, answer = gcg.question_prompt(prepared.questions[0], ctx.seed, "loglik", " " + gcg.OPTIM_MARK)
    target = f" {options[answer]}"
    with torch.no_grad():
        start = _target_loss(lm, prompt, " ".join(["x"] * SMALL["suffix_tokens"]), target)
        reached = _target_loss(lm, prompt, found["suffix"], target)
    assert reached == pytest.approx(found["loss"], abs=1e-4)
    assert reached < start


def test_missing_package_and_bad_settings_are_clear(ctx, monkeypatch):
    with pytest.raises(ObliviateError, match="at least 1"):
        attacks.make_config("gcg", {"num_steps": 0})
    monkeypatch.setitem(sys.modules, "nanogcg", None)
    with pytest.raises(ObliviateError, match="pip install --no-deps nanogcg"):
        attacks.run("gcg", ctx, SMALL)

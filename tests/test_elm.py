"""ELM's pieces on a tiny random model: the key-value-cached guided generation gives the
tokens of the plain recompute, its cache is reused and invalidated by exactly its inputs,
and each loss term moves the adapted model the right way after a step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from obliviate import methods
from obliviate.errors import ObliviateError
from obliviate.methods import MethodContext, elm
from obliviate.settings import build_section
from obliviate.training.loop import tokenize

SMALL = {"steps": 2, "batch_size": 2, "max_length": 24, "lr": (1e-3,), "rank": 4, "consistency_prompts": 2,
         "consistency_tokens": 5, "layers": (1, 2)}


def config(**overrides) -> elm.Config:
    return build_section(elm.Config, {**SMALL, **overrides}, "elm")


@torch.no_grad()
def recomputed_generation(lm, prompt, concept, tokens, gamma, top_k, seed) -> list[int]:
    """The definition: every step runs the three whole texts again (no key-value cache)."""
    rng = torch.Generator().manual_seed(seed)
    expert = elm.EXPERT[int(torch.randint(len(elm.EXPERT), (1,), generator=rng))].format(c=concept)
    novice = elm.NOVICE[int(torch.randint(len(elm.NOVICE), (1,), generator=rng))].format(c=concept)
    batch = tokenize(lm.tokenizer, [prompt], 10_000, "cpu")
    generated: list[int] = []
    for _ in range(tokens):
        ids = torch.cat([batch.input_ids, torch.tensor([generated], dtype=torch.long)], 1)
        step = type(batch)(batch.texts, ids, torch.ones_like(ids))
        last = [lm.model(input_ids=i, attention_mask=m).logits[:, -1:] for i, m, _ in
                (elm._prefixed(lm.tokenizer, step, p) if p else (ids, step.attention_mask, 0)
                 for p in ("", expert + " ", novice + " "))]
        guided = F.log_softmax(last[0], -1) + gamma * (F.log_softmax(last[2], -1) - F.log_softmax(last[1], -1))
        outside = torch.ones_like(guided, dtype=torch.bool).scatter_(-1, last[0].topk(top_k, dim=-1).indices, False)
        generated.append(int(guided.masked_fill(outside, float("-inf"))[0, -1].argmax()))
    return generated


def test_cached_guided_generation_gives_the_recomputed_tokens(tiny_lm, small_concept):
    prompt = small_concept.concept_sentences[0]
    fast = elm.guided_generate(tiny_lm, prompt, small_concept.concept, 6, 3.0, 50, seed=5)
    assert len(fast) == 6
    assert fast == recomputed_generation(tiny_lm, prompt, small_concept.concept, 6, 3.0, 50, seed=5)


def test_consistency_cache_is_reused_and_invalidated_by_its_inputs(tiny_lm, small_concept, tmp_path, monkeypatch):
    calls = []
    plain = elm.guided_generate
    monkeypatch.setattr(elm, "guided_generate", lambda *a, **k: calls.append(a[1]) or plain(*a, **k))
    first = elm.consistency_examples(tiny_lm, small_concept, config(), 0, tmp_path)
    assert len(calls) == 2 and len(first) == 2
    assert elm.consistency_examples(tiny_lm, small_concept, config(lr=(5e-3,), rank=8), 0, tmp_path) == first
    assert len(calls) == 2  # learning rate and rank do not change the generated text: reused
    elm.consistency_examples(tiny_lm, small_concept, config(guidance_gamma=1.0), 0, tmp_path)
    elm.consistency_examples(tiny_lm, small_concept, config(), 1, tmp_path)  # another seed
    assert len(calls) == 6
    small_concept.concept_sentences[0] = "An entirely new first sentence about the concept at hand."
    elm.consistency_examples(tiny_lm, small_concept, config(), 0, tmp_path)
    assert len(calls) == 8 and calls[-2].startswith("An entirely new")
    with torch.no_grad():
        tiny_lm.model.get_input_embeddings().weight[7] += 1.0  # another model (an EMBER edit, say)
    elm.consistency_examples(tiny_lm, small_concept, config(), 0, tmp_path)
    assert len(calls) == 10


def lora_model(lm):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=list(elm.Config().target_modules),
                      layers_to_transform=[1, 2], bias="none")
    peft_model = get_peft_model(lm.model, lora)
    with torch.no_grad():  # B = 0 at init would make the first step's A gradient vanish
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return peft_model, [p for n, p in peft_model.named_parameters() if "lora_" in n]


def batches(lm, data):
    return (tokenize(lm.tokenizer, data.concept_sentences[:4], 24, "cpu"),
            tokenize(lm.tokenizer, data.neutral_sentences[:4], 24, "cpu"))


def term(lm, peft_model, data, settings: elm.Config, name: str) -> float:
    """One loss term on the fixed batches (a fresh closure: the same prefixes every call)."""
    forget, retain = batches(lm, data)
    with torch.no_grad():
        return float(elm.make_step_loss(lm.model, lm.tokenizer, peft_model, data.concept, settings, [], seed=0)(forget, retain)[1][name])


def neutral_kl(lm, peft_model, data) -> float:
    _, retain = batches(lm, data)
    with torch.no_grad():
        adapted = F.log_softmax(peft_model(input_ids=retain.input_ids, attention_mask=retain.attention_mask).logits, -1)
        with peft_model.disable_adapter():
            original = F.log_softmax(peft_model(input_ids=retain.input_ids, attention_mask=retain.attention_mask).logits, -1)
    per_token = (original.exp() * (original - adapted)).sum(-1)
    return float(per_token[retain.attention_mask.bool()].mean())


def train_steps(lm, peft_model, params, data, settings: elm.Config, steps: int, lr: float) -> None:
    forget, retain = batches(lm, data)
    optimizer = torch.optim.SGD(params, lr=lr)
    step_loss = elm.make_step_loss(lm.model, lm.tokenizer, peft_model, data.concept, settings, [], seed=0)
    for _ in range(steps):
        loss, _ = step_loss(forget, retain)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture
def fresh_lm(tiny_tokenizer):
    from conftest import make_tiny_lm

    return make_tiny_lm(tiny_tokenizer, seed=3)


def test_an_erase_step_moves_the_model_towards_the_novice_target(fresh_lm, small_concept):
    settings = config(retain_weight=0.0, consistency_weight=0.0)
    peft_model, params = lora_model(fresh_lm)
    before = term(fresh_lm, peft_model, small_concept, settings, "erase")
    train_steps(fresh_lm, peft_model, params, small_concept, settings, 1, lr=0.5)
    assert term(fresh_lm, peft_model, small_concept, settings, "erase") < before - 1e-4


def test_the_retain_term_keeps_neutral_text_where_the_original_had_it(fresh_lm, small_concept):
    """Erase alone drifts on neutral text; with the retain term the drift is smaller."""
    drift = {}
    for retain_weight in (0.0, 1.0):
        peft_model, params = lora_model(fresh_lm)
        settings = config(retain_weight=retain_weight, consistency_weight=0.0)
        train_steps(fresh_lm, peft_model, params, small_concept, settings, 4, lr=0.5)
        drift[retain_weight] = neutral_kl(fresh_lm, peft_model, small_concept)
        peft_model.unload()
    assert drift[0.0] > 0 and drift[1.0] < drift[0.0]


def test_fit_reuses_the_generated_consistency_text_across_the_grid(tiny_lm, small_concept, tmp_path, monkeypatch):
    calls = []
    plain = elm.guided_generate
    monkeypatch.setattr(elm, "guided_generate", lambda *a, **k: calls.append(1) or plain(*a, **k))
    module = methods.get("elm")
    for lr in ((1e-3,), (2e-3,)):
        fitted = module.fit(tiny_lm, small_concept, config(lr=lr), 0,
                            MethodContext(progress=False, checkpoint_dir=tmp_path))
        list(fitted.candidates())
    assert len(calls) == SMALL["consistency_prompts"]


def test_guidance_check_scores_each_question_under_both_personas(tiny_lm, small_concept):
    logged = []
    found = elm.guidance_check(tiny_lm, small_concept, 2, logged.append)
    expert, novice = elm.persona_accuracy(tiny_lm, small_concept.questions["qa_train"], small_concept.concept, 2)
    assert expert.shape == novice.shape == (len(small_concept.questions["qa_train"]),)
    assert set(np.unique(np.concatenate([expert, novice]))) <= {0.0, 0.5, 1.0}  # the mean of two templates
    d = found["novice_minus_expert"]
    assert d["value"] == pytest.approx(novice.mean() - expert.mean())
    assert d["low"] <= d["value"] <= d["high"]
    assert (len(logged) == 1) == (d["high"] >= 0)


def test_guidance_check_reports_no_difference_where_the_personas_are_the_same(tiny_lm, small_concept, monkeypatch):
    monkeypatch.setattr(elm, "NOVICE", elm.EXPERT)
    logged = []
    d = elm.guidance_check(tiny_lm, small_concept, 3, logged.append)["novice_minus_expert"]
    assert d == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert len(logged) == 1 and "no knowledge difference" in logged[0]
    assert elm.guidance_check(tiny_lm, small_concept, 0, logged.append) == {}


def test_fit_reports_the_guidance_check_and_the_setting_is_checked(tiny_lm, small_concept, tmp_path):
    fitted = methods.get("elm").fit(tiny_lm, small_concept, config(guidance_templates=1), 0,
                                    MethodContext(progress=False, checkpoint_dir=tmp_path))
    assert fitted.report()["guidance"]["questions"] == len(small_concept.questions["qa_train"])
    with pytest.raises(ObliviateError, match="guidance_templates"):
        config(guidance_templates=11)


def test_the_guidance_check_setting_reuses_the_trained_adapter(tiny_lm, small_concept, tmp_path):
    cached, merged = [], []
    for templates in (0, 1):
        fitted = methods.get("elm").fit(tiny_lm, small_concept, config(guidance_templates=templates), 0,
                                        MethodContext(progress=False, checkpoint_dir=tmp_path))
        (_, adapter), = list(fitted.candidates())
        cached.append(fitted.report()["candidates"][0]["cached"])
        adapter.apply(tiny_lm.model)  # the adapter read back applies like the trained one
        merged.append({n: p.detach().clone() for n, p in tiny_lm.model.named_parameters() if n in adapter.weights})
        adapter.revert(tiny_lm.model)
    assert cached == [False, True]
    assert merged[0] and merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][n], merged[1][n]) for n in merged[0])

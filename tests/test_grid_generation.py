"""EMBER's candidates generate their changed prompts together (Evaluator.generate_ahead):
each batch row runs with its own candidate's input rows, and every candidate's outcome is
the one it gets alone."""
import pytest
import torch

from obliviate.config import EvalConfig
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.evaluation import evaluator as evaluator_module
from obliviate.evaluation.evaluator import Evaluator
from obliviate.models.loading import untie_output_embeddings

from conftest import same_outcome

CONFIG = EvalConfig(scoring="loglik", coherence_new_tokens=6, bootstrap=20, cache=False)
PROMPTS = {"train": ["The weather today", "Question: Who won the match?\nAnswer:", "In 1990 the wizard", "A cat sat"],
           "test": ["In 1990 the"]}


@pytest.fixture
def concept(small_concept):
    small_concept.general_prompts = PROMPTS
    return small_concept


def candidates(lm, scales=(0.5, 3.0, 12.0), output_rows=True) -> list[EmbeddingPatch]:
    """Patches of the same tokens (ones the prompts use) that differ only in their input rows."""
    tokens = torch.tensor(sorted({lm.tokenizer(" wizard", add_special_tokens=False).input_ids[0],
                                  lm.tokenizer(" weather", add_special_tokens=False).input_ids[0],
                                  lm.tokenizer(" cat", add_special_tokens=False).input_ids[0]}))
    rows = lm.model.get_input_embeddings().weight[tokens].detach().clone()
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(rows.shape, generator=generator)
    output = lm.model.get_output_embeddings().weight.detach().mean(0).expand_as(rows).clone() if output_rows else None
    original_output = lm.model.get_output_embeddings().weight[tokens].detach().clone() if output_rows else None
    return [EmbeddingPatch(tokens, rows, rows - scale * direction, {}, output_rows=output,
                           original_output_rows=original_output) for scale in scales]


def test_candidates_generated_together_score_as_one_at_a_time(tiny_lm, concept, monkeypatch):
    untie_output_embeddings(tiny_lm.model)
    patches = candidates(tiny_lm)
    alone = [Evaluator(tiny_lm, concept, CONFIG).evaluate("train", patch) for patch in patches]
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    evaluator.generate_ahead("train", patches)
    calls = []
    generate = evaluator_module.greedy_generate
    monkeypatch.setattr(evaluator_module, "greedy_generate", lambda *a, **k: calls.append(len(a[1])) or generate(*a, **k))
    together = [evaluator.evaluate("train", patch) for patch in patches]
    for one, other in zip(alone, together):
        same_outcome(one, other)
    # the edited model generated nothing more (the original's continuations were made before)
    assert calls == [] and not evaluator._ahead
    # the candidates changed some continuations, differently: the batch did not give every row one candidate's rows
    continuations = [tuple(tuple(e["edited"] for e in outcome.examples["general"])) for outcome in together]
    assert len(set(continuations)) > 1 and all(outcome.rescored["general_prompts"] > 0 for outcome in together)


def test_candidates_whose_output_rows_differ_are_generated_one_at_a_time(tiny_lm, concept):
    """A tied matrix: each patch moves its tokens' output rows too, so no batch can hold them."""
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    evaluator.generate_ahead("train", candidates(tiny_lm, output_rows=False))
    assert not evaluator._ahead
    evaluator.generate_ahead("train", candidates(tiny_lm)[:1])  # one candidate: nothing to share
    assert not evaluator._ahead

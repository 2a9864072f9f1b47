"""Open-ended questions: the normalised matcher, greedy answers, and the optional judges."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from obliviate.data.concepts import OpenQuestion
from obliviate.errors import ObliviateError
from obliviate.evaluation.open_ended import (Judge, answer_matches, endpoint_judge, generate_answers, judge_answers,
                                             make_judge, normalise)


@pytest.mark.parametrize("prediction, gold, expected", [
    ("J. K. Rowling wrote it.", "J.K. Rowling", True),
    ("The Sorting Hat", "the sorting hat", True),
    ("Sorting hat!", "The Sorting Hat", True),
    ("There were seven books", "7", True),
    ("Lord Voldemort\nQuestion: who else", "Lord Voldemort", True),
    ("Expelliarmus, of course", "expelliarmus", True),
    ("Voldemort", "Lord Voldemort", False),  # a part of the answer is not the answer
    ("restart", "art", False),  # whole words only
    ("Question: who?\nSirius Black", "Sirius Black", False),  # only the first line counts
    ("", "Sirius Black", False),
])
def test_answer_matches(prediction, gold, expected):
    assert answer_matches(prediction, gold) is expected


def test_normalise_words():
    assert normalise("The Two Towers, an epic!") == ["2", "towers", "epic"]
    assert normalise("Café  É") == ["cafe", "e"]


def test_judged_numbers_exist_only_with_a_judge(tiny_lm):
    questions = [OpenQuestion("Who wrote Harry Potter?", "J.K. Rowling"), OpenQuestion("Who is Harry?", "a wizard")]
    plain = judge_answers(questions, generate_answers(tiny_lm, questions, max_new_tokens=3))
    assert set(plain) == {"answers", "match"} and plain["match"].shape == (2,) and len(plain["answers"]) == 2
    always = Judge("always yes", lambda q, g, a: np.ones(len(q), dtype=bool))
    judged = judge_answers(questions, generate_answers(tiny_lm, questions, max_new_tokens=3), always)
    assert judged["judged"].tolist() == [1.0, 1.0] and judged["answers"] == plain["answers"]  # greedy: same answers


@pytest.mark.parametrize("untie", [False, True])
def test_an_embedding_patch_s_answers_are_generated_only_where_it_can_change_them(tiny_lm, small_concept, untie):
    """The erased model's open-ended answers as a patch on the original (tied, or untied
    with output rows set): only the prompts the patch can change are generated, and every
    continuation equals generating all of them on the patched model."""
    import torch

    from obliviate.config import EvalConfig
    from obliviate.edits.embedding import EmbeddingPatch
    from obliviate.evaluation.evaluator import Evaluator
    from obliviate.evaluation.open_ended import answer_prompts
    from obliviate.evaluation.scoring import greedy_generate
    from obliviate.models.loading import untie_output_embeddings

    if untie:
        untie_output_embeddings(tiny_lm.model)
    questions = [OpenQuestion(q, "x") for q in ("Who wrote Harry Potter?", "Who is Harry?", "What is rain?",
                                                 "Where is Paris?", "When was 1990?", "Why is the sky blue?")]
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(cache=False, bootstrap=20))
    reference = evaluator.original_continuations(answer_prompts(questions), 6)
    weight, head = tiny_lm.model.get_input_embeddings().weight, tiny_lm.model.get_output_embeddings().weight
    tokens = torch.tensor(sorted(set(tiny_lm.tokenizer(" Harry").input_ids[1:]) | {7, 11}))
    rows = weight[tokens].detach().clone()
    edited = -3.0 * rows  # tied: the edited tokens' logits flip sign too
    patch = (EmbeddingPatch(tokens, rows, edited, {}, output_rows=head.detach().mean(0).expand_as(rows).clone(),
                            original_output_rows=head[tokens].detach().clone())
             if untie else EmbeddingPatch(tokens, rows, edited, {}))
    continuations, generated = evaluator.edited_continuations(reference, patch)
    patch.apply(tiny_lm.model)
    try:
        everything = greedy_generate(tiny_lm, reference.prompt_ids, 6)
    finally:
        patch.revert(tiny_lm.model)
    assert continuations == everything
    assert 0 < generated < len(questions)  # the untouched prompts were not generated again
    assert continuations != reference.original_continuations  # the patch changed some answers
    assert torch.equal(weight[tokens], rows)  # reverted


class _FakeOpenAI(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        reply = "Yes." if "Proposed answer: Rowling" in prompt else "no"
        payload = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_endpoint_judge_against_a_local_openai_compatible_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = make_judge(f"http://127.0.0.1:{server.server_port}/v1")
        assert judge.name.startswith("endpoint http://127.0.0.1") and "chat/completions" in judge.name
        verdicts = judge.fn(["q1", "q2"], ["J.K. Rowling", "J.K. Rowling"], ["Rowling", "Tolkien"])
        assert verdicts.tolist() == [True, False]
    finally:
        server.shutdown()
    with pytest.raises(ObliviateError, match="did not answer"):
        endpoint_judge(f"http://127.0.0.1:{server.server_port}/v1", timeout=1).fn(["q"], ["a"], ["b"])

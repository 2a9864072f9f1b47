"""Open-ended questions: the normalised matcher, greedy answers, and the optional judges."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from obliviate.data.concepts import OpenQuestion
from obliviate.errors import ObliviateError
from obliviate.evaluation.open_ended import Judge, answer_matches, endpoint_judge, evaluate_open, make_judge, normalise


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


def test_evaluate_open_claims_judged_numbers_only_with_a_judge(tiny_lm):
    questions = [OpenQuestion("Who wrote Harry Potter?", "J.K. Rowling"), OpenQuestion("Who is Harry?", "a wizard")]
    plain = evaluate_open(tiny_lm, questions, None, max_new_tokens=3)
    assert set(plain) == {"answers", "match"} and plain["match"].shape == (2,) and len(plain["answers"]) == 2
    always = Judge("always yes", lambda q, g, a: np.ones(len(q), dtype=bool))
    judged = evaluate_open(tiny_lm, questions, always, max_new_tokens=3)
    assert judged["judged"].tolist() == [1.0, 1.0] and judged["answers"] == plain["answers"]  # greedy: same answers


def test_the_originals_open_answers_are_generated_once_with_a_cache(tiny_lm, tmp_path, monkeypatch):
    from obliviate.evaluation import open_ended
    from obliviate.evaluation.cache import OriginalCache

    questions = [OpenQuestion("Who wrote Harry Potter?", "J.K. Rowling"), OpenQuestion("Who is Harry?", "a wizard")]
    first = evaluate_open(tiny_lm, questions, None, 3, cache=OriginalCache(tiny_lm, folder=tmp_path))
    monkeypatch.setattr(open_ended, "generate_answers", lambda *a, **k: pytest.fail("generated again"))
    again = evaluate_open(tiny_lm, questions, None, 3, cache=OriginalCache(tiny_lm, folder=tmp_path))
    assert again["answers"] == first["answers"] and again["match"].tolist() == first["match"].tolist()
    with pytest.raises(pytest.fail.Exception):  # other settings are another entry
        evaluate_open(tiny_lm, questions, None, 4, cache=OriginalCache(tiny_lm, folder=tmp_path))


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

"""Open-ended questions (METHOD.md section 4): greedy answers to "Question: {q}\\nAnswer:".

Judged without any external API by default: normalised answer match (lower case, no
punctuation, no articles, number words as digits; the gold answer must appear as a run
of the answer's words, spaces ignored so "J. K." matches "J.K."). An optional judge can
be given: a local model (path or hub id; it answers yes/no, compared by log-probability)
or an OpenAI-compatible endpoint URL the user runs. Results always name the judge; a
judged number exists only when a judge ran.
"""
from __future__ import annotations

import json
import re
import string
import unicodedata
import urllib.request
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from obliviate.data.concepts import OpenQuestion
from obliviate.errors import ObliviateError
from obliviate.models.loading import LoadedModel
from obliviate.evaluation.scoring import Batching, greedy_generate, next_token_logprobs
from obliviate.models.loading import load_model
from obliviate.evaluation.multiple_choice import chat_prompt_ids

PROMPT = "Question: {q}\nAnswer:"
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                     "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000", "first": "1st",
                     "second": "2nd", "third": "3rd"})
JUDGE_PROMPT = ("Question: {q}\nReference answer: {gold}\nProposed answer: {answer}\n"
                "Does the proposed answer give the same answer as the reference? Reply yes or no.")


def normalise(text: str) -> list[str]:
    """Words of ``text`` after case folding, punctuation and article removal, numbers as digits."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = text.translate(str.maketrans({c: " " for c in string.punctuation if c not in ".'"}))
    text = text.replace(".", "").replace("'", "")
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return [w.replace(",", "") for w in words if w not in ARTICLES]


def answer_matches(prediction: str, gold: str) -> bool:
    """True when the gold answer's words appear contiguously in the prediction's first line."""
    target = "".join(normalise(gold))
    words = normalise(prediction.strip().split("\n")[0])
    if not target:
        return False
    for start in range(len(words)):
        joined = ""
        for word in words[start:]:
            joined += word
            if joined == target:
                return True
            if len(joined) >= len(target):
                break
    return False


def answer_prompts(questions: Sequence[OpenQuestion]) -> list[str]:
    return [PROMPT.format(q=q.question) for q in questions]


def decode_answers(tokenizer, generated: Sequence[Sequence[int]]) -> list[str]:
    """Each continuation's first line: the answer."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip() for ids in generated]


def generate_answers(lm: LoadedModel, questions: Sequence[OpenQuestion], max_new_tokens: int = 24,
                     batching: Batching = Batching()) -> list[str]:
    prompts = [lm.tokenizer(p).input_ids for p in answer_prompts(questions)]
    return decode_answers(lm.tokenizer, greedy_generate(lm, prompts, max_new_tokens, batching))


@dataclass
class Judge:
    """A yes/no judge: ``name`` is what results report; ``fn`` maps (q, gold, answer) lists to bools."""

    name: str
    fn: Callable[[list[str], list[str], list[str]], np.ndarray]


def local_model_judge(spec: str, device: str = "cpu") -> Judge:

    judge = load_model(spec, device)

    def fn(questions, golds, answers):

        contexts = [chat_prompt_ids(judge, JUDGE_PROMPT.format(q=q, gold=g, answer=a))
                    if getattr(judge.tokenizer, "chat_template", None)
                    else judge.tokenizer(JUDGE_PROMPT.format(q=q, gold=g, answer=a) + "\nAnswer:").input_ids
                    for q, g, a in zip(questions, golds, answers)]
        spaced = not getattr(judge.tokenizer, "chat_template", None)
        ids = [judge.tokenizer((" " if spaced else "") + w, add_special_tokens=False).input_ids[0] for w in ("yes", "no")]
        logprobs = next_token_logprobs(judge, contexts, ids).numpy()
        return logprobs[:, 0] > logprobs[:, 1]

    return Judge(name=f"local model {spec}", fn=fn)


def endpoint_judge(url: str, model: str = "default", timeout: float = 60.0) -> Judge:
    """An OpenAI-compatible chat completions endpoint (e.g. a local vLLM or llama.cpp server)."""
    endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"

    def ask(prompt: str) -> bool:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": 3,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(endpoint, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except (OSError, KeyError, ValueError) as err:
            raise ObliviateError(f"The judge endpoint {endpoint} did not answer ({err}); check --judge.") from err
        return reply.strip().lower().startswith("yes")

    def fn(questions, golds, answers):
        return np.array([ask(JUDGE_PROMPT.format(q=q, gold=g, answer=a)) for q, g, a in zip(questions, golds, answers)])

    return Judge(name=f"endpoint {endpoint} (model {model})", fn=fn)


def make_judge(spec: str | None, model: str = "default", device: str = "cpu") -> Judge | None:
    if not spec:
        return None
    if re.match(r"https?://", spec):
        return endpoint_judge(spec, model)
    return local_model_judge(spec, device)


def judge_answers(questions: Sequence[OpenQuestion], answers: list[str], judge: Judge | None = None) -> dict:
    """Per-question answers and correctness: {"answers", "match", "judged" (only with a judge)}."""
    golds = [q.answer for q in questions]
    out = {"answers": answers, "match": np.array([answer_matches(a, g) for a, g in zip(answers, golds)], dtype=float)}
    if judge is not None:
        out["judged"] = np.asarray(judge.fn([q.question for q in questions], golds, answers), dtype=float)
    return out


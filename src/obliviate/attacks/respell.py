"""Token-free rewrites (black box): ask the concept's TEST questions without the tokens
the erasure leans on.

An edit of token rows (EMBER) disrupts inputs that contain those tokens; a user who writes
the same words so that they tokenize differently asks the same question. This attack
rewrites every word of a question and its options that holds a target token, keeping the
meaning and the correct option's index:

- ``respell``: the first spelling of the word whose tokens hold no target: case (upper,
  capitalised, lower), hyphenated or space-split halves (from the middle outward), and
  letters joined by hyphens as a last resort.
- ``neighbours``: the word replaced by the ORIGINAL model's nearest vocabulary word (cosine
  of input embeddings) that is a whole word and holds no target: a synonym or a close
  description, as an attacker without the concept's words would find.
- ``translated``: the question and each option (in their order, so the correct index stays)
  translated by a local model the user gives (``translator``: an encoder-decoder such as a
  Marian opus-mt model, or a causal model asked for ``translate_to``). Without one the form
  is skipped and the results say so. Translation does not aim at the targets: how many
  translated questions still hold one is reported like the other forms.

Targets: the token ids the erase run edited; for a method that edits no token rows, the
concept's own key tokens (concept-only tokens of the concept sentences, methods/features.py,
seen at least ``min_occurrences`` times), so a method that erases meaning is asked the same
respelled questions. The attacker keeps the form that brings back the most.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from obliviate.attacks.common import AttackContext, accuracy_interval, cached_for_original, correct_on, each_role
from obliviate.data.concepts import MCQuestion
from obliviate.data.respelling import rewrite_text, spellings, word_tokens
from obliviate.errors import ObliviateError
from obliviate.evaluation.multiple_choice import prepare
from obliviate.methods.features import key_token_ids
from obliviate.models.loading import LoadedModel, load_translation_model
from obliviate.progress import write_line

NAME = "respell"
FORMS = ("respell", "neighbours", "translated")
EXAMPLES = 3  # rewritten questions shown in results.json
NO_TRANSLATOR = ("the translated form is skipped: no translator was given (--set respell.translator=FOLDER, a local "
                 "translation model such as a Marian opus-mt model saved with save_pretrained)")


@dataclass(frozen=True)
class Config:
    forms: tuple[str, ...] = FORMS  # each rewrites every question; the attacker keeps the best
    min_occurrences: int = 3  # key tokens of a method that edits no rows: concept-only, seen this often
    translator: str = ""  # a local translation model's folder; empty: the translated form is skipped
    translate_to: str = "French"  # the language a causal translator is asked for
    translator_prefix: str = ""  # before each text, for an encoder-decoder that wants one (T5: "translate English to French: ")

    def __post_init__(self) -> None:
        forms = (self.forms,) if isinstance(self.forms, str) else tuple(self.forms)
        unknown = [f for f in forms if f not in FORMS]
        if unknown or not forms:
            raise ObliviateError(f"respell forms {unknown or '()'} are not valid: choose from {', '.join(FORMS)}.")
        object.__setattr__(self, "forms", forms)
        if self.min_occurrences < 1:
            raise ObliviateError(f"respell min_occurrences must be >= 1, got {self.min_occurrences}.")
        if self.translator and not Path(self.translator).expanduser().is_dir():
            raise ObliviateError(f"respell translator {self.translator!r} is not a folder: give a local translation "
                                 "model's folder (written by save_pretrained).")
        if forms == ("translated",) and not self.translator:
            raise ObliviateError(f"respell forms=translated alone needs a translator: {NO_TRANSLATOR.split(': ', 1)[1]}.")

    def measured_forms(self) -> tuple[str, ...]:
        """The forms this run can measure (translated only with a translator)."""
        return tuple(f for f in self.forms if f != "translated" or self.translator)


def target_tokens(ctx: AttackContext, tokenizer, config: Config) -> tuple[frozenset[int], str]:
    """(token ids no rewritten question may contain, where they come from)."""
    edited = ctx.options.get("edited_token_ids")
    if edited:
        return frozenset(int(t) for t in edited), "edited rows"
    return key_token_ids(tokenizer, ctx.data, config.min_occurrences), "concept key words"


class Rewriter:
    """Rewrites of text that avoid ``targets`` under ``tokenizer``, one form at a time."""

    def __init__(self, tokenizer, targets: frozenset[int], embedding: torch.Tensor | None = None):
        self.tokenizer, self.targets, self.embedding = tokenizer, targets, embedding
        self._vocabulary: tuple[torch.Tensor, list[str]] | None = None

    def holds_target(self, word: str, spaced: bool) -> bool:
        return bool(word_tokens(self.tokenizer, word, spaced) & self.targets)

    def respelled(self, word: str, spaced: bool) -> str | None:
        return next((s for s in spellings(word) if not self.holds_target(s, spaced)), None)

    def neighbour(self, word: str, spaced: bool) -> str | None:
        """The nearest whole vocabulary word (by the original's input embedding) to the
        word's first target token, itself free of targets."""
        rows, words = self.vocabulary()
        if not words:
            return None
        target = next(t for t in self.tokenizer((" " if spaced else "") + word, add_special_tokens=False).input_ids
                      if t in self.targets)
        query = self.embedding[target].float()
        cosine = rows @ (query / query.norm().clamp_min(1e-12))
        for index in torch.argsort(cosine, descending=True).tolist():
            candidate = words[index]
            if candidate.lower() != word.lower() and not self.holds_target(candidate, spaced):
                return candidate
        return None

    def vocabulary(self) -> tuple[torch.Tensor, list[str]]:
        """Unit rows and texts of the whole-word tokens (a leading space, 3+ letters) outside the targets."""
        if self._vocabulary is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.embedding))])
            kept = [i for i, text in enumerate(texts)
                    if i not in self.targets and text.startswith(" ") and text[1:].isalpha() and len(text) >= 4]
            rows = self.embedding[kept].float()
            self._vocabulary = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12), [texts[i][1:] for i in kept])
        return self._vocabulary

    def question(self, question: MCQuestion, form: str) -> MCQuestion:
        replace = self.respelled if form == "respell" else self.neighbour
        return MCQuestion(rewrite_text(question.question, self.holds_target, replace),
                          tuple(rewrite_text(o, self.holds_target, replace) for o in question.options), question.answer)


class Translator:
    """Text into another language by a local model, greedy, one text at a time (each
    distinct text translated once); a text that comes back empty stays as it was."""

    def __init__(self, lm: LoadedModel, language: str, prefix: str = ""):
        self.lm, self.language, self.prefix = lm, language, prefix
        self._done: dict[str, str] = {}

    @torch.no_grad()
    def __call__(self, text: str) -> str:
        if text not in self._done:
            self._done[text] = self._translate(text) or text
        return self._done[text]

    def _translate(self, text: str) -> str:
        model, tokenizer = self.lm.model, self.lm.tokenizer
        encoder_decoder = bool(model.config.is_encoder_decoder)
        prompt = (self.prefix + text if encoder_decoder
                  else f"Translate from English to {self.language}.\nEnglish: {text}\n{self.language}:")
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        length = inputs["input_ids"].shape[1]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(**inputs, max_new_tokens=2 * length + 8, do_sample=False, pad_token_id=pad)
        new = out[0] if encoder_decoder else out[0, length:]
        return tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()

    def question(self, question: MCQuestion) -> MCQuestion:
        return MCQuestion(self(question.question), tuple(self(o) for o in question.options), question.answer)


def rewrite_all(rewriter: Rewriter, questions: list[MCQuestion], forms: tuple[str, ...],
                translator: Translator | None = None) -> dict[str, list[MCQuestion]]:
    """Every question in each form, options in their order (the correct index unchanged)."""
    return {form: [translator.question(q) if form == "translated" else rewriter.question(q, form) for q in questions]
            for form in forms}


def run(ctx: AttackContext, config: Config) -> dict:
    """Each form's rewritten TEST questions on both models; the erased model's best form is
    the attack's "after"."""
    lm = ctx.models.get("original") or next(iter(ctx.models.values()))
    targets, source = target_tokens(ctx, lm.tokenizer, config)
    embedding = lm.model.get_input_embeddings().weight.detach().cpu() if "neighbours" in config.forms else None
    questions = ctx.test_questions()
    forms = config.measured_forms()
    # the translation model is held only while the questions are rewritten, not while they are scored
    rewrites = rewrite_all(Rewriter(lm.tokenizer, targets, embedding), questions, forms,
                           Translator(load_translation_model(config.translator, str(lm.model.device)),
                                      config.translate_to, config.translator_prefix) if "translated" in forms else None)
    out: dict = {"settings": asdict(config), "targets": {"source": source, "tokens": len(targets)},
                 "questions": len(questions), "forms": {}}
    if forms != config.forms:
        out["skipped"] = {"translated": NO_TRANSLATOR}
        write_line(f"respell: {NO_TRANSLATOR}")
    for form, rewritten in rewrites.items():
        prepared = prepare(lm, rewritten, ctx.scoring, ctx.seed)
        changed = [i for i, (q, r) in enumerate(zip(questions, rewritten)) if q != r]
        out["forms"][form] = {
            "rewritten": len(changed),
            "still_containing": int(len(prepared.touching(set(targets)))),
            "examples": [{"before": questions[i].question, "after": rewritten[i].question} for i in changed[:EXAMPLES]],
        }

    def measure(role, model, plain, before):
        per_form = {}
        for form, rewritten in rewrites.items():
            prepared = prepare(model, rewritten, ctx.scoring, ctx.seed)
            score = lambda prepared=prepared: correct_on(model, prepared, ctx.batching).astype(int).tolist()  # noqa: E731
            per_form[form] = np.asarray(
                cached_for_original(ctx, model, prepared, "respell", {"form": form}, score) if role == "original"
                else score(), dtype=bool)
        best = max(per_form, key=lambda f: per_form[f].mean())
        return per_form[best], {
            "best_form": best,
            "per_form": {f: accuracy_interval(c, ctx.bootstrap, ctx.seed) for f, c in per_form.items()},
            "per_form_correct": {f: c.astype(int).tolist() for f, c in per_form.items()},
        }

    return each_role(ctx, out, measure)

"""Evaluate an edit against the original model on one split (train or test).

What is measured (METHOD.md section 4): multiple-choice accuracy and the normalized
probability of the correct option on the QA, SimDom and general-knowledge sets; coherence
on GENERAL prompts (not about the concept); and, as a diagnostic, fluency on the concept's
own coherency prompts (text that reuses the edited tokens: the paper's "localized" cost).

The original model's answers and continuations are computed once per split, and kept
across commands by the results cache (cache.py) unless ``config.cache`` is off.
For an edit that only changes some tokens' embedding rows, a question or prompt that uses
none of those tokens has exactly the original's hidden states, so only the touched ones
are run again: with untied embeddings the rest keep the original's answers; with tied
ones their answers are corrected exactly for the changed output rows (output_rows.py).
An edit that can tell which inputs it changes (ECO's hook: prompts its classifier does not
flag run bit-identical to the plain model; ``affected``) re-runs only those. Any other
edit re-runs everything. Coverage (the share of questions and prompts that contain an edited token,
and accuracy on touched and untouched questions) is reported for every edit that names
the tokens it changed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from obliviate.data.concepts import ConceptData, MCQuestion
from obliviate.edits.protocol import Edit, applied
from obliviate.models.layers import input_rows_per_sequence
from obliviate.models.loading import LoadedModel, embeddings_are_tied
from obliviate.evaluation import coherence as coh
from obliviate.evaluation.cache import OriginalCache, pack, unpack
from obliviate.evaluation.metrics import (Interval, accuracy_pair, bootstrap, chance_level, erasure_metrics,
                                          near_chance_sets, probability_sets)
from obliviate.evaluation.multiple_choice import (PreparedQuestions, correct_from_scores, correct_probability, option_scores,
                              prepare)
from obliviate.evaluation.output_rows import (OutputChange, capture_output_states, greedy_path_holds, option_shift,
                          current_output_rows, output_change)
from obliviate.evaluation.results import SplitResults
from obliviate.evaluation.scoring import Batching, OutputStates, greedy_generate
from obliviate.progress import progress_bar

SPLITS = ("train", "test")
PROMPT_KINDS = {"general": "coherence", "concept": "concept_fluency"}  # prompt set -> metric name
EXAMPLES_PER_KIND = 3


@dataclass
class SplitOutcome:
    metrics: dict[str, Interval]
    correct: dict[str, tuple[np.ndarray, ...]]  # set -> accuracy_pair rows (base, edited[, probs])
    rescored: dict[str, int] = field(default_factory=dict)  # how many items actually ran
    near_chance: frozenset[str] = frozenset()
    by_probability: frozenset[str] = frozenset()  # sets whose fraction is on the correct option's probability
    coverage: dict = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)  # set -> its chance level (mean of 1 / options)
    prompt_rows: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)  # kind -> coherence rows
    examples: dict[str, list[dict]] = field(default_factory=dict)  # kind -> a few generations

    def value(self, name: str, default: float = float("nan")) -> float:
        return self.metrics[name].value if name in self.metrics else default

    def as_dict(self) -> dict:
        return {
            "metrics": {name: interval.as_dict() for name, interval in self.metrics.items()},
            "rescored": self.rescored,
            "near_chance": {name: name in self.near_chance for name in self.correct},
            "judged_by_probability": sorted(self.by_probability),
            "chance": dict(self.chance),
            "coverage": self.coverage,
        }

    def results(self) -> SplitResults:
        return SplitResults(dict(self.metrics), {name: name in self.near_chance for name in self.correct},
                            {"rescored": self.rescored, "coverage": self.coverage, "chance": dict(self.chance),
                             "judged_by_probability": sorted(self.by_probability)})

    def per_question(self) -> dict:
        keys = ("base_correct", "edited_correct", "base_prob", "edited_prob")
        return {name: {k: [round(float(v), 6) for v in rows[i]] for i, k in enumerate(keys[: len(rows)])}
                for name, rows in self.correct.items()}

    def per_prompt(self) -> dict:
        keys = ("edited_ll", "original_ll", "edited_distinct", "original_distinct")
        return {kind: {k: [round(float(v), 6) for v in rows[i]] for i, k in enumerate(keys)}
                for kind, rows in self.prompt_rows.items()}


class Evaluator:
    def __init__(self, lm: LoadedModel, data: ConceptData, config, seed: int = 42):
        self.lm, self.data, self.config, self.seed = lm, data, config, seed
        self.batching = Batching(config.batch_tokens)
        self._prepared: dict[tuple[str, str], PreparedQuestions] = {}
        self._base_scores: dict[tuple[str, str], np.ndarray] = {}
        self._prompt_sets: dict[tuple[str, str], coh.CoherenceSet] = {}
        self._states: dict[tuple[str, str], dict[int, OutputStates]] = {}  # output-row edits: _before_output_edit
        self._ahead: dict[tuple[str, str, int], tuple] = {}  # (split, kind, id(edit)) -> generate_ahead's output
        # Opened now, while the weights are the original's: its key is their fingerprint.
        self.cache = OriginalCache(lm, enabled=getattr(config, "cache", True))

    def question_sets(self, split: str) -> dict[str, list[MCQuestion]]:
        sets = {
            "qa": self.data.questions.get(f"qa_{split}", []),
            "simdom": self.data.questions.get(f"simdom_{split}", []),
            "general": self.data.general.get(split, []),
        }
        return {name: questions for name, questions in sets.items() if questions}

    def _prepared_set(self, split: str, name: str) -> PreparedQuestions:
        key = (split, name)
        if key not in self._prepared:
            prepared = prepare(self.lm, self.question_sets(split)[name], self.config.scoring, self.seed)
            self._base_scores[key] = self.cache.fetch(
                "option_scores", self._questions_key(prepared), lambda: self._score_original(key, prepared),
                lambda scores: ({"scores": torch.from_numpy(scores)}, {}),
                lambda tensors, _: tensors["scores"].numpy().astype(np.float64))
            self._prepared[key] = prepared
        return self._prepared[key]

    def _score_original(self, key: tuple[str, str], prepared: PreparedQuestions) -> np.ndarray:
        """The original's option scores; the output states of the same pass are kept (and
        cached), so correcting for an edit of output rows needs no second pass."""
        scores, states = option_scores(self.lm, prepared, batching=self.batching, record=True)
        if states:
            self._states[key] = states
            self._save_states(prepared, states)
        return scores

    def _questions_key(self, prepared: PreparedQuestions) -> dict:
        """What the original's option scores depend on, besides the weights."""
        return {"mode": prepared.mode, "items": prepared.items, "item_question": prepared.item_question,
                "char_lengths": prepared.char_lengths, "letter_ids": prepared.letter_ids,
                "options": [len(q.options) for q in prepared.questions], "budget": self.batching.budget(self.lm)}

    def prompts(self, split: str) -> dict[str, list[str]]:
        """Prompt sets of a split: general prompts (coherence) and the concept's own (fluency)."""
        sets = {"general": self.data.general_prompts.get(split, []), "concept": list(self.data.coherency_prompts)}
        if self.config.coherence_new_tokens <= 0:
            return {}
        return {kind: prompts for kind, prompts in sets.items() if prompts}

    def prompt_set(self, split: str, kind: str) -> coh.CoherenceSet:
        """The original model's continuations of one prompt set, computed once."""
        key = self._prompt_key(split, kind)
        if key not in self._prompt_sets:
            self._prompt_sets[key] = self.original_continuations(self.prompts(split)[kind],
                                                                 self.config.coherence_new_tokens)
        return self._prompt_sets[key]

    def original_continuations(self, prompts: list[str], new_tokens: int) -> coh.CoherenceSet:
        """The original's greedy continuations of any prompts, with what its output layer saw
        at each step, through the results cache."""
        payload = {"prompt_ids": [self.lm.tokenizer(p).input_ids for p in prompts], "new_tokens": new_tokens,
                   "stops": [self.lm.tokenizer.eos_token_id, self.lm.tokenizer.pad_token_id],
                   "budget": self.batching.generation_budget(self.lm)}
        return self.cache.fetch(
            "coherence_set", payload, lambda: coh.build_coherence_set(self.lm, prompts, new_tokens, self.batching),
            coh.encode_coherence_set, lambda tensors, _: coh.decode_coherence_set(tensors, prompts, new_tokens))

    def edited_continuations(self, reference: coh.CoherenceSet, edit: Edit) -> tuple[list[list[int]], int]:
        """The edited model's greedy continuations of ``reference``'s prompts, and how many
        were generated: only the prompts the edit can change run (as for the coherence
        prompts); the others keep the original's continuation."""
        token_ids = self.input_tokens(edit)
        old_rows = self._output_rows_before(token_ids, edit)
        with applied(edit, self.lm.model):
            change = self._output_change(token_ids, old_rows)
            which, generated = self._generate_edited(reference, self._prompts_to_rerun(reference, token_ids, change, edit))
        continuations = list(reference.original_continuations)
        for i, continuation in zip(which, generated):
            continuations[i] = continuation
        return continuations, len(which)

    def generate_ahead(self, split: str, edits: Sequence[Edit], concept_fluency: bool = True) -> None:
        """Generate at once what ``evaluate(split, edit, concept_fluency=...)`` will generate for
        each of ``edits``, when they differ only in the input rows of the same tokens (EMBER's
        deltas): every candidate's changed prompts run as one batch, each row with its own
        candidate's rows (``input_rows_per_sequence``), so a decoding step reads the weights
        once for all of them (on 2 CPU cores, Gemma 3 270M: 8 candidates' one prompt in 6 s,
        26 s one after another). Anything else is left to ``evaluate``."""
        self._ahead.clear()
        changed = {None if ids is None else frozenset(ids) for ids in (edit.changed_token_ids() for edit in edits)}
        if len(edits) < 2 or len(changed) != 1 or not next(iter(changed)):
            return
        tokens = set(next(iter(changed)))
        references = {kind: self.prompt_set(split, kind) for kind in self._prompt_kinds(split, True, concept_fluency)}
        ids = torch.tensor(sorted(tokens), dtype=torch.long)
        embedded, outputs, which = [], [], {}
        for number, edit in enumerate(edits):
            old_rows = self._output_rows_before(tokens, edit)
            with applied(edit, self.lm.model):
                embedded.append(self.lm.model.get_input_embeddings()(ids[None].to(self.lm.device))[0].detach().cpu())
                outputs.append(current_output_rows(self.lm, tokens))
                change = self._output_change(tokens, old_rows)
                for kind, reference in references.items():
                    which[kind, number] = self._prompts_to_rerun(reference, tokens, change, edit)
        if any(not torch.equal(rows, outputs[0]) for rows in outputs[1:]):
            return  # their output rows differ too (a tied matrix): one model per candidate
        rows = torch.stack(embedded)
        with applied(edits[0], self.lm.model):  # its output rows are every candidate's
            for kind, reference in references.items():
                pairs = [(number, int(i)) for number in range(len(edits)) for i in which[kind, number]]
                generated = greedy_generate(
                    self.lm, [reference.prompt_ids[i] for _, i in pairs], reference.max_new_tokens, self.batching,
                    per_batch=lambda batch: input_rows_per_sequence(self.lm.model, ids, rows,
                                                                    [pairs[b][0] for b in batch]))
                for number, edit in enumerate(edits):
                    mine = [continuation for (owner, _), continuation in zip(pairs, generated) if owner == number]
                    self._ahead[split, kind, id(edit)] = (edit, which[kind, number], mine)

    def _take_ahead(self, split: str, kind: str, edit: Edit | None) -> tuple[np.ndarray, list[list[int]]] | None:
        """(prompts, continuations) ``generate_ahead`` made for this very edit, once."""
        entry = self._ahead.pop((split, kind, id(edit)), None)
        return (entry[1], entry[2]) if entry is not None and entry[0] is edit else None

    def _generate_edited(self, reference: coh.CoherenceSet, which: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
        """The model as it is now (edited) continues ``reference``'s prompts ``which``."""
        return which, greedy_generate(self.lm, [reference.prompt_ids[i] for i in which], reference.max_new_tokens,
                                      self.batching)

    def _prompt_kinds(self, split: str, coherence: bool, concept_fluency: bool) -> list[str]:
        return [kind for kind in self.prompts(split) if coherence and (concept_fluency or kind != "concept")]

    def input_tokens(self, edit: Edit | None) -> set[int] | None:
        """Tokens whose embedding rows the edit changed, when nothing else changed (else
        None: every prediction may move and everything runs again)."""
        return set() if edit is None else edit.changed_token_ids()

    def _original_correct(self, split: str, name: str) -> np.ndarray:
        """Which questions of set ``name`` the ORIGINAL model answers correctly on ``split``."""
        return correct_from_scores(self._prepared_set(split, name), self._base_scores[(split, name)])

    def base_accuracy(self, split: str) -> dict[str, float]:
        return {name: float(self._original_correct(split, name).mean()) for name in self.question_sets(split)}

    def chance(self, split: str) -> dict[str, float]:
        """Each question set's chance level on ``split``: the mean of 1 / options."""
        return {name: chance_level(len(q.options) for q in questions)
                for name, questions in self.question_sets(split).items()}

    def original_near_chance(self, split: str, names: tuple[str, ...] | None = None) -> frozenset[str]:
        """The question sets (``names``, default all) where neither the ORIGINAL's accuracy nor
        its probability of the correct option shows knowledge on ``split``; only those sets
        are scored (deciding on QA alone costs its 50 questions, not 200)."""
        rows = {}
        for name in self.question_sets(split):
            if names is None or name in names:
                correct = self._original_correct(split, name)
                probability = correct_probability(self._prepared_set(split, name), self._base_scores[(split, name)])
                rows[name] = (correct, correct, probability, probability)  # accuracy_pair's shape: the original twice
        return near_chance_sets(rows, self.chance(split))

    def evaluate(self, split: str, edit: Edit | None, coherence: bool = True, concept_fluency: bool = True,
                 questions: bool = True, progress: bool = False) -> SplitOutcome:
        """Metrics of ``edit`` on ``split``; the model is left as it was (edit reverted).
        ``coherence=False`` skips the prompt sets (the base methods' grids rank without it);
        ``concept_fluency=False`` skips only the concept's own prompts (EMBER's grid ranks on
        general coherence, and regenerating every concept prompt was half of its time);
        ``questions=False`` skips the question sets (a grid cell whose questions were scored
        already and now needs only its coherence). ``progress``: a line per part (the
        original's answers, then the edited model's) with an ETA, off a terminal every 30 s."""
        token_ids = self.input_tokens(edit)
        names = list(self.question_sets(split)) if questions else []
        kinds = self._prompt_kinds(split, coherence, concept_fluency)
        with self._parts(f"{split} evaluation", 2 * (len(names) + len(kinds)), progress) as done:
            sets, references = {}, {}
            for name in names:
                sets[name] = self._prepared_set(split, name)
                done(f"original {name}")
            for kind in kinds:
                references[kind] = self.prompt_set(split, kind)
                done(f"original {kind} prompts")
            old_rows = self._before_output_edit(split, sets, token_ids, edit)
            correct, rescored, generated = {}, {}, {}
            with applied(edit, self.lm.model):
                change = self._output_change(token_ids, old_rows)
                for name, prepared in sets.items():
                    correct[name], rescored[name] = self._score_set(split, name, prepared, token_ids, change, edit)
                    done(name)
                for kind, reference in references.items():
                    generated[kind] = self._take_ahead(split, kind, edit) or self._generate_edited(
                        reference, self._prompts_to_rerun(reference, token_ids, change, edit))
                    done(f"{kind} prompts")
        prompt_rows = {kind: self._coherence_rows(references[kind], *generated[kind]) for kind in references}
        rescored.update({f"{kind}_prompts": int(len(generated[kind][0])) for kind in references})
        samples = {**correct, **{PROMPT_KINDS[kind]: rows for kind, rows in prompt_rows.items()}}
        chance = {name: level for name, level in self.chance(split).items() if name in correct}
        near_chance, by_probability = near_chance_sets(correct, chance), probability_sets(correct, chance)
        metrics = erasure_metrics(samples, self.config.bootstrap, self.seed, near_chance, chance, by_probability)
        return SplitOutcome(
            metrics=metrics, correct=correct, rescored=rescored, near_chance=near_chance,
            by_probability=by_probability, chance=chance,
            coverage=self._coverage(token_ids, sets, correct, references), prompt_rows=prompt_rows,
            examples={kind: self._examples(references[kind], *generated[kind]) for kind in references},
        )

    def compare(self, split: str, candidate: LoadedModel, coherence: bool = True,
                progress: bool = False) -> SplitOutcome:
        """The same metrics as ``evaluate`` for another model (an erased copy, a hooked model,
        any model with this vocabulary) against this evaluator's original, which keeps its
        cached answers and continuations; every item runs on the candidate. ``progress`` as
        in ``evaluate``."""
        sets, kinds = self.question_sets(split), list(self.prompts(split)) if coherence else []
        correct, references, generated = {}, {}, {}
        with self._parts(f"{split} evaluation", 2 * (len(sets) + len(kinds)), progress) as done:
            for name, questions in sets.items():
                prepared = self._prepared_set(split, name)
                done(f"original {name}")
                base, theirs = self._base_scores[(split, name)], prepare(candidate, questions, self.config.scoring, self.seed)
                scores = option_scores(candidate, theirs, batching=self.batching)
                correct[name] = accuracy_pair(correct_from_scores(prepared, base), correct_from_scores(theirs, scores),
                                              correct_probability(prepared, base), correct_probability(theirs, scores))
                done(name)
            for kind in kinds:
                references[kind] = self.prompt_set(split, kind)
                done(f"original {kind} prompts")
                generated[kind] = self._candidate_continuations(candidate, references[kind])
                done(f"{kind} prompts")
        prompt_rows = {kind: self._coherence_rows(references[kind], *generated[kind]) for kind in references}
        samples = {**correct, **{PROMPT_KINDS[kind]: rows for kind, rows in prompt_rows.items()}}
        chance = {name: level for name, level in self.chance(split).items() if name in correct}
        near_chance, by_probability = near_chance_sets(correct, chance), probability_sets(correct, chance)
        return SplitOutcome(
            metrics=erasure_metrics(samples, self.config.bootstrap, self.seed, near_chance, chance, by_probability),
            correct=correct, rescored={name: len(rows[0]) for name, rows in correct.items()}, near_chance=near_chance,
            by_probability=by_probability, chance=chance,
            prompt_rows=prompt_rows,
            examples={kind: self._examples(references[kind], *generated[kind]) for kind in references},
        )

    @staticmethod
    @contextmanager
    def _parts(desc: str, total: int, show: bool) -> Iterator[Callable[[str], None]]:
        """A progress line over an evaluation's parts; yields ``done(part)``, called as each ends."""
        bar = progress_bar(desc=desc, total=total, unit="part", disable=not show)

        def done(part: str) -> None:
            bar.set_postfix(done=part)
            bar.update(1)

        try:
            yield done
        finally:
            bar.close()

    def _candidate_continuations(self, candidate: LoadedModel, reference: coh.CoherenceSet):
        """(every prompt, the candidate's greedy continuations in the ORIGINAL's tokens): the
        very tokens when the vocabularies agree, else the text re-tokenized."""
        prompt_ids = [candidate.tokenizer(p).input_ids for p in reference.prompts]
        generated = greedy_generate(candidate, prompt_ids, reference.max_new_tokens, self.batching)
        if candidate.tokenizer.get_vocab() != self.lm.tokenizer.get_vocab():
            texts = [candidate.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
            generated = [self.lm.tokenizer(t, add_special_tokens=False).input_ids if t else [] for t in texts]
        return np.arange(len(reference.prompts)), generated

    def _before_output_edit(self, split: str, sets: dict, token_ids: set[int] | None, edit: Edit | None):
        """For an embedding edit that changes the edited tokens' OUTPUT rows too (a tied model,
        or a patch that sets them):
        the original output rows of those tokens, with the original's output states of the
        untouched questions captured (once each), so they are corrected exactly instead of
        run again (evaluation/output_rows.py). None when there is nothing to correct."""
        old_rows = self._output_rows_before(token_ids, edit)
        if old_rows is None:
            return None
        for name, prepared in sets.items():
            if (split, name) not in self._states:
                self._states[(split, name)] = self._cached_states(prepared)
            states = self._states[(split, name)]
            untouched = set(range(len(prepared))) - set(prepared.touching(token_ids).tolist())
            missing = [i for i, q in enumerate(prepared.item_question) if q in untouched and i not in states]
            if not missing:
                continue
            # an option's positions: the context's last and all but the last continuation token
            pairs = [(c + x[:-1], len(x)) if x else (c, 1) for c, x in (prepared.items[i] for i in missing)]
            captured = capture_output_states(self.lm, [p for p, _ in pairs], [n for _, n in pairs], self.batching)
            states.update(zip(missing, captured))
            self._save_states(prepared, states)
        return old_rows  # prompts: their generation pass kept what is needed

    def _output_change(self, token_ids: set[int] | None, old_rows: torch.Tensor | None) -> OutputChange | None:
        """How the edit now applied moved the output rows ``old_rows`` held (None: nothing to correct)."""
        return output_change(self.lm, token_ids, old_rows) if old_rows is not None else None

    def _output_rows_before(self, token_ids: set[int] | None, edit: Edit | None) -> torch.Tensor | None:
        """The edited tokens' original output rows when the edit changes them too (a tied
        model, or a patch that sets them); None when no output row changes."""
        sets_output_rows = edit is not None and edit.sets_output_rows()
        if not token_ids or not (embeddings_are_tied(self.lm.model) or sets_output_rows):
            return None
        return current_output_rows(self.lm, token_ids)

    def _cached_states(self, prepared: PreparedQuestions) -> dict[int, OutputStates]:
        """The original's output states captured for this set by earlier commands (any subset)."""
        found = self.cache.load("output_states", self._questions_key(prepared))
        if found is None:
            return {}
        tensors, _ = found
        hidden = unpack(tensors["hidden"], tensors["lengths"])
        log_norm = unpack(tensors["log_norm"], tensors["lengths"])
        return {int(i): OutputStates(h, z) for i, h, z in zip(tensors["items"].tolist(), hidden, log_norm)}

    def _save_states(self, prepared: PreparedQuestions, states: dict[int, OutputStates]) -> None:
        items = sorted(states)
        hidden = pack([states[i].hidden for i in items], torch.float32)
        self.cache.save("output_states", self._questions_key(prepared),
                        {"items": torch.tensor(items, dtype=torch.long), "hidden": hidden["values"],
                         "lengths": hidden["lengths"],
                         "log_norm": pack([states[i].log_norm for i in items], torch.float64)["values"]})

    def _score_set(self, split: str, name: str, prepared: PreparedQuestions, token_ids, change,
                   edit: Edit | None = None) -> tuple[tuple, int]:
        base_scores = self._base_scores[(split, name)]
        which = self._questions_to_rerun(prepared, token_ids, edit)
        scores = base_scores.copy()
        if change is not None:
            which |= self._shift_untouched(self._states[(split, name)], prepared, which, change, scores)
        which = np.array(sorted(which), dtype=int)
        if len(which):
            scores[which] = option_scores(self.lm, prepared, which, self.batching)[which]
        rows = accuracy_pair(correct_from_scores(prepared, base_scores), correct_from_scores(prepared, scores),
                             correct_probability(prepared, base_scores), correct_probability(prepared, scores))
        return rows, int(len(which))

    def _questions_to_rerun(self, prepared: PreparedQuestions, token_ids, edit: Edit | None) -> set[int]:
        """Questions using an edited token; for an edit that tells which token sequences it
        changes, those whose context or any context + option it changes (the scorer feeds
        either); every question otherwise."""
        contexts = [c for c, _ in prepared.items]
        flags = _affected(token_ids, edit, self.lm.model, lambda: contexts + [c + x for c, x in prepared.items])
        if flags is not None:
            items = np.nonzero(flags[:len(contexts)] | flags[len(contexts):])[0]
            return {int(prepared.item_question[i]) for i in items}
        return set(prepared.touching(token_ids).tolist())

    def _shift_untouched(self, states: dict[int, OutputStates], prepared: PreparedQuestions, touched: set[int],
                         change: OutputChange, scores: np.ndarray) -> set[int]:
        """Move untouched questions' option scores by the exact normalizer shift; return the
        questions where that is not safe (they run again)."""
        unsafe: set[int] = set()
        letters_edited = prepared.mode == "letter" and bool(set(prepared.letter_ids) & set(change.token_ids.tolist()))
        slot = np.zeros(len(prepared), dtype=int)
        for item, question in enumerate(prepared.item_question):
            if question in touched or question in unsafe:
                continue
            shift = None if letters_edited else option_shift(change, states[item])
            if shift is None:
                unsafe.add(int(question))
            elif prepared.mode == "loglik":
                scores[question, slot[question]] += shift / prepared.char_lengths[item]
                slot[question] += 1
            else:
                scores[question] += shift  # every letter's log-probability moves by -(Z' - Z)
        return unsafe

    def _prompts_to_rerun(self, reference: coh.CoherenceSet, token_ids, change, edit: Edit | None = None) -> np.ndarray:
        """Prompts whose greedy continuation may differ: those using an edited token, and
        (tied models) those where an edited token's new logit overtakes the original's choice;
        for an edit that tells which prompts it changes, those."""
        flags = _affected(token_ids, edit, self.lm.model, lambda: reference.prompt_ids)
        if flags is not None:
            return np.nonzero(flags)[0]
        which = set(reference.touching(token_ids).tolist())
        if change is not None:
            for i, (steps, continuation) in enumerate(zip(reference.steps, reference.original_continuations)):
                # the continuation's steps, and the one that ended it early (EOS) if any
                length = min(len(continuation) + 1, len(steps.top_logit))
                if i not in which and not greedy_path_holds(change, steps, length):
                    which.add(i)
        return np.array(sorted(which), dtype=int)

    @staticmethod
    def _prompt_key(split: str, kind: str) -> tuple[str, str]:
        return (split if kind == "general" else "any", kind)  # the concept's prompts serve every split

    def _coherence_rows(self, reference: coh.CoherenceSet, which: np.ndarray, continuations) -> tuple[np.ndarray, ...]:
        """Score the edited continuations with the ORIGINAL model (the edit is reverted). A
        continuation the edit left as the original's keeps the original's scores: the same
        tokens under the same model (a small weight edit leaves many greedy texts unchanged)."""
        edited_ll, edited_distinct = reference.original_ll.copy(), reference.original_distinct.copy()
        moved = [(i, c) for i, c in zip(which, continuations) if list(c) != list(reference.original_continuations[i])]
        if moved:
            rows = np.array([i for i, _ in moved], dtype=int)
            texts = [c for _, c in moved]
            edited_ll[rows] = coh.mean_loglik(self.lm, [reference.prompt_ids[i] for i in rows], texts, self.batching)
            edited_distinct[rows] = [coh.distinct_bigrams(c) for c in texts]
        return coh.coherence_rows(edited_ll, edited_distinct, reference)

    def _examples(self, reference: coh.CoherenceSet, which: np.ndarray, continuations) -> list[dict]:
        """A few prompts with the original's and the edited model's continuations, side by side
        (prompts the edit touched first: those are the ones that can differ)."""
        edited = {int(i): c for i, c in zip(which, continuations)}
        order = list(edited) + [i for i in range(len(reference.prompts)) if i not in edited]
        decode = lambda ids: self.lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [{"prompt": reference.prompts[i], "original": decode(reference.original_continuations[i]),
                 "edited": decode(edited.get(i, reference.original_continuations[i]))}
                for i in order[:EXAMPLES_PER_KIND]]

    def _coverage(self, token_ids: set[int] | None, sets: dict[str, PreparedQuestions], correct: dict,
                  references: dict[str, coh.CoherenceSet]) -> dict:
        """Share of questions and prompts that contain an edited token, and accuracy on the
        touched and untouched questions (with intervals), for edits that name their tokens."""
        if not token_ids:
            return {}
        out: dict = {}
        for name, prepared in sets.items():
            mask = np.zeros(len(prepared), dtype=bool)
            mask[prepared.touching(token_ids)] = True
            out[name] = {"share": float(mask.mean()), "touched": int(mask.sum()), "total": int(len(mask)),
                         "touched_accuracy": self._subset_accuracy(correct[name], mask),
                         "untouched_accuracy": self._subset_accuracy(correct[name], ~mask)}
        for kind, reference in references.items():
            touched = len(reference.touching(token_ids))
            out[f"{kind}_prompts"] = {"share": touched / len(reference.prompts), "touched": touched,
                                      "total": len(reference.prompts)}
        return out

    def _subset_accuracy(self, rows: tuple[np.ndarray, ...], mask: np.ndarray) -> dict:
        if not mask.any():
            return {}
        statistic = lambda s: {"base": float(s["q"][0].mean()), "edited": float(s["q"][1].mean())}  # noqa: E731
        intervals = bootstrap(statistic, {"q": (rows[0][mask], rows[1][mask])}, self.config.bootstrap, self.seed)
        return {name: interval.as_dict() for name, interval in intervals.items()}


def _affected(token_ids: set[int] | None, edit: Edit | None, model,
              sequences: Callable[[], Sequence[Sequence[int]]]) -> np.ndarray | None:
    """Which ``sequences`` an edit that changes no token rows says it changes (ECO's hook);
    None when it cannot tell or when its token rows already tell (the sequences are then
    never built: an embedding patch's candidates take this path on every evaluation)."""
    if token_ids is not None or edit is None:
        return None
    flags = edit.affected(model, sequences())
    return None if flags is None else np.asarray(flags, dtype=bool)

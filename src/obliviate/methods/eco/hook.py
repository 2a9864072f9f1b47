"""The ECO inference hook: classify each prompt in the batch, corrupt flagged prompts'
token embeddings during prefill only.

Two hooks cooperate:
- a forward pre-hook on the top-level model sees ``input_ids`` and ``attention_mask``
  (left padding included), finds each row's prompt, asks the classifier, and plans which
  (row, position) embeddings to corrupt;
- a forward hook on the input-embedding module applies the plan to its output (the
  embeddings as the model uses them, after any scale) and clears it.

Prefill only: a call whose ``input_ids`` has length 1 (a KV-cache decoding step) or that
continues a non-empty cache plans nothing. Unflagged rows, and calls with nothing
flagged, are not touched at all (the embedding hook returns None), so their outputs are
bit-identical to the plain model's.

What the prompt is. For generation it is the whole (unpadded) input. For log-likelihood
multiple-choice scoring the model sees "Question: q\\nAnswer: option" in one pass; the
reference corrupts the prompt (the question), not the answer option. So when a row
contains the prompt marker (default "\\nAnswer:"), its prompt ends at the marker's last
occurrence: the classifier sees only that part, and its tokens up to but excluding the
last marker token are corrupted; the option tokens are left alone. Without the marker
every real token but the last is corrupted, as in the reference.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from obliviate.edits.protocol import EditDefaults
from obliviate.errors import ObliviateError
from obliviate.methods.eco.classifier import PromptClassifier
from obliviate.methods.eco.corruption import Corruption

CACHE_LIMIT = 8192


def prompt_length(tokens: Sequence[int], marker: Sequence[int]) -> int:
    """Length of the prompt part of ``tokens``: through the marker's last occurrence."""
    m = len(marker)
    if m == 0 or len(tokens) < m:
        return len(tokens)
    marker = list(marker)
    for end in range(len(tokens), m - 1, -1):
        if list(tokens[end - m:end]) == marker:
            return end
    return len(tokens)


@dataclass
class HookStats:
    calls: int = 0  # prefill calls seen
    sequences: int = 0
    flagged: int = 0
    corrupted_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


ECO_DIR = "eco"  # the artifact's folder inside an erase run's output

# The hook installed on each model, kept here rather than as an attribute of the model
# (a model object carries nothing of ours); weak, so a dropped model frees its entry.
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, EcoHook]" = weakref.WeakKeyDictionary()


def installed_hook(model: nn.Module) -> "EcoHook | None":
    """The ECO hook installed on ``model``, if any."""
    return _INSTALLED.get(model)


@dataclass
class EcoHook:
    """Installable on any causal LM; ``force`` overrides the classifier (True: corrupt
    every prompt, as when learning sigma on a forget set; False: never)."""

    classifier: PromptClassifier
    corruption: Corruption
    marker_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    force: bool | None = None
    stats: HookStats = field(default_factory=HookStats)
    last_flags: np.ndarray | None = None  # the latest prefill's per-row decisions

    def __post_init__(self) -> None:
        self._handles: list = []
        self._plan: tuple[tuple[int, int], list[tuple[int, torch.Tensor]]] | None = None
        self._busy = False
        self._scores: dict[tuple[int, ...], float] = {}
        self.model: nn.Module | None = None

    # -- installation ------------------------------------------------------------------
    def detached_copy(self) -> "EcoHook":
        """The same classifier, corruption and settings, installed nowhere (for another copy
        of the same weights)."""
        return replace(self, stats=HookStats(), last_flags=None)

    def install(self, model: nn.Module) -> "EcoHook":
        if installed_hook(model) is not None:
            raise RuntimeError("An ECO hook is already installed on this model; remove it first.")
        self._handles = [
            model.register_forward_pre_hook(self._plan_prefill, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self._corrupt_embeddings),
        ]
        _INSTALLED[model] = self
        self.model = model
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._plan = [], None
        if self.model is not None and installed_hook(self.model) is self:
            del _INSTALLED[self.model]
        self.model = None

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    # -- classification ----------------------------------------------------------------
    def prompt_scores(self, model: nn.Module, prompts: list[tuple[int, ...]]) -> np.ndarray:
        """Classifier probabilities, cached per prompt (MC scoring repeats each question)."""
        missing = sorted({p for p in prompts if p not in self._scores}, key=len)
        if missing:
            self._busy = True  # the classifier's own forward pass must not be hooked
            try:
                scores = self.classifier.score(model, missing)
            finally:
                self._busy = False
            if len(self._scores) + len(missing) > CACHE_LIMIT:
                self._scores.clear()
            self._scores.update(zip(missing, scores.tolist()))
        return np.array([self._scores[p] for p in prompts])

    def decide(self, model: nn.Module, prompts: list[tuple[int, ...]]) -> np.ndarray:
        if self.force is not None:
            return np.full(len(prompts), bool(self.force))
        return self.prompt_scores(model, prompts) >= self.classifier.threshold

    # -- hooks -------------------------------------------------------------------------
    def _real_mask(self, ids: torch.Tensor, mask) -> torch.Tensor:
        if torch.is_tensor(mask) and mask.shape == ids.shape:
            return mask.bool()
        if self.pad_token_id is not None:  # e.g. a 4-D mask prepared by the caller
            return ids != self.pad_token_id
        return torch.ones_like(ids, dtype=torch.bool)

    @staticmethod
    def _is_prefill(ids, kwargs) -> bool:
        if ids is None or ids.dim() != 2 or ids.shape[1] <= 1:
            return False
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it "cache"
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        return int(seen) == 0

    def prefill_decision(self, model: nn.Module, sequences: Sequence[Sequence[int]]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Per token sequence fed as a prefill: the length of its prompt part (through the
        marker), whether the classifier flags that part, and whether the hook corrupts it
        (flagged and longer than one token)."""
        lengths = [prompt_length(s, self.marker_ids) for s in sequences]
        if not lengths:
            return [], np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
        flags = np.asarray(self.decide(model, [tuple(s[:n]) for s, n in zip(sequences, lengths)]), dtype=bool)
        return lengths, flags, flags & (np.array(lengths) > 1)

    def _plan_prefill(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._plan = None
        if self._busy:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not self._is_prefill(ids, kwargs):
            return None
        real = self._real_mask(ids, kwargs.get("attention_mask")).cpu()
        rows = ids.cpu().tolist()
        positions = [torch.nonzero(real[r]).flatten() for r in range(len(rows))]
        tokens = [tuple(rows[r][p] for p in positions[r].tolist()) for r in range(len(rows))]
        lengths, flags, corrupt = self.prefill_decision(model, tokens)
        self.last_flags = flags
        self.stats.calls += 1
        self.stats.sequences += len(rows)
        self.stats.flagged += int(flags.sum())
        plan = [(r, positions[r][: lengths[r] - 1]) for r in range(len(rows)) if corrupt[r]]
        if plan:
            self._plan = (tuple(ids.shape), plan)
        return None

    def _corrupt_embeddings(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        plan, self._plan = self._plan, None
        if plan is None or self._busy or tuple(output.shape[:2]) != plan[0]:
            return None
        out = output.clone()
        for row, where in plan[1]:
            where = where.to(out.device)
            out[row, where] = self.corruption(out[row, where])
            self.stats.corrupted_tokens += len(where)
        return out


@dataclass
class EcoEdit(EditDefaults):
    """The hook as an ``Edit`` (edits.py) for the Evaluator: apply installs, revert removes.

    It changes no weights and no token's rows (``changed_token_ids`` is None), but it can
    tell which inputs it changes (``affected``): the Evaluator runs only those again and
    keeps the original's answers for the rest, which the hook leaves bit-identical."""

    hook: EcoHook
    artifact: Any = None  # the EcoArtifact it came from (what ``save_to`` writes)

    def apply(self, model: nn.Module) -> None:
        self.hook.install(model)

    def revert(self, model: nn.Module) -> None:
        self.hook.remove()

    def changed_token_ids(self) -> None:
        return None

    def affected(self, model: nn.Module, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Per token sequence fed as a prefill, whether the hook corrupts it (its own decision)."""
        return self.hook.prefill_decision(model, sequences)[2]

    def expected_changes(self, model: nn.Module) -> dict:
        return {}  # no weight changes: the hook corrupts flagged prompts at inference

    def save_to(self, folder: Path) -> list[Path]:
        if self.artifact is None:
            raise ObliviateError("This ECO hook has no artifact to save (it was built by hand).")
        return [self.artifact.save(Path(folder) / ECO_DIR)]

    def summary(self) -> dict:
        c = self.hook.corruption
        return {"kind": "eco_hook", "corruption": c.kind, "dims": c.dims, "sigma": c.strength,
                "threshold": self.hook.classifier.threshold}

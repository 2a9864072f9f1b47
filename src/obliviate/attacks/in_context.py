"""In-context relearning: the concept's own text placed before each test question.

Knowledge that was truly removed cannot be read back from the weights, but a model that
only learned to hide it may answer again when reminded. The first ``k`` relearning
paragraphs (each cut to ``paragraph_tokens``) go before every question; accuracy with and
without them is reported on both models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from obliviate.errors import ObliviateError
from obliviate.attacks.common import AttackContext, accuracy_interval, correct_on, prepared_test, recovered_fraction, splice_prefix
from obliviate.data.concepts import load_relearn_paragraphs

NAME = "in-context"


@dataclass(frozen=True)
class Config:
    k: int = 3  # paragraphs before each question
    paragraph_tokens: int = 128  # each paragraph is cut to this many tokens

    def __post_init__(self) -> None:
        if self.k < 1 or self.paragraph_tokens < 8:
            raise ObliviateError(f"in-context needs k >= 1 and paragraph_tokens >= 8, got {self.k}, {self.paragraph_tokens}.")


def context_text(lm, paragraphs: list[str], config: Config) -> str:
    cut = []
    for paragraph in paragraphs[: config.k]:
        ids = lm.tokenizer(paragraph, add_special_tokens=False).input_ids[: config.paragraph_tokens]
        cut.append(lm.tokenizer.decode(ids).strip())
    return "\n\n".join(cut) + "\n\n"


def run(ctx: AttackContext, config: Config) -> dict:

    if ctx.data_dir is None:
        raise ObliviateError("The in-context attack reads relearn_paragraphs.json: pass --data with the benchmark folder.")
    paragraphs = load_relearn_paragraphs(ctx.data_dir, ctx.data.concept, config.k)
    out = {"settings": asdict(config)}
    corrects = {}
    for role, lm in ctx.models.items():
        prepared = prepared_test(ctx, lm)
        before = correct_on(lm, prepared, ctx.batching)
        after = correct_on(lm, splice_prefix(lm, prepared, context_text(lm, paragraphs, config)), ctx.batching)
        corrects[role] = (before, after)
        out[role] = {"before": accuracy_interval(before, ctx.bootstrap, ctx.seed),
                     "after": accuracy_interval(after, ctx.bootstrap, ctx.seed)}
    if "original" in corrects and "erased" in corrects:
        out["recovered_frac"] = recovered_fraction(corrects["original"][0], corrects["erased"][1], ctx.bootstrap, ctx.seed)
    return out

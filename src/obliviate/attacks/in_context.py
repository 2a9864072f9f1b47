"""In-context relearning: the concept's own text placed before each test question.

Knowledge that was truly removed cannot be read back from the weights, but a model that
only learned to hide it may answer again when reminded. The first ``k`` paragraphs of
the concept's text (common.attack_text) (each cut to ``paragraph_tokens``) go before every question; accuracy with and
without them is reported on both models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from obliviate.errors import ObliviateError
from obliviate.attacks.common import AttackContext, attack_text, correct_on, each_role, splice_prefix

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
    paragraphs, source = attack_text(ctx, "concept", config.k)

    def measure(role, lm, prepared, before):
        return correct_on(lm, splice_prefix(lm, prepared, context_text(lm, paragraphs, config)), ctx.batching), {}

    return each_role(ctx, {"settings": {**asdict(config), "text": source}}, measure)

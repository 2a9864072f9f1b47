"""GCG adversarial suffixes (Zou et al. 2023, arXiv 2307.15043) through the maintained
`nanogcg` package, the attack the ELM paper runs on its erased models.

The attacker holds the weights and knows the answers of a few TEST questions. For each of
them GCG searches a suffix, appended to the question, that makes the model continue the
prompt with the question's correct answer (the option text for log-likelihood scoring,
the letter for chat models). Two numbers per model:
- ``forced``: each attacked question with its own suffix. An upper bound, not knowledge:
  the search saw the answer. It says how easily the model is pushed.
- ``after`` (the attack's number): the OTHER test questions with each found suffix; the
  attacker keeps the suffix that unlocks the most (worst case, as in ``adversarial``). A
  suffix that brings back answers it was not tuned on shows knowledge still in the weights.

nanogcg 0.3.0 declares transformers<=4.47.1; it runs on transformers 5 installed with
``pip install --no-deps nanogcg==0.3.0`` (the README's install does this). Two adaptations
keep its arithmetic right: the input embedding it sees carries the embedding module's
scale (nanogcg forms the optimized tokens' embeddings as one_hot @ weight, which would
skip Gemma's sqrt(d_model)), and its prefix cache stays off (it indexes the cache in the
legacy tuple layout that transformers 5 removed).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.attacks.common import (AttackContext, accuracy_interval, cached_for_original, correct_on, prepared_test,
                                      recovered_fraction)
from obliviate.evaluation.multiple_choice import LETTERS, PreparedQuestions, prepare, question_prompt
from obliviate.models.loading import LoadedModel, embedding_scale

OPTIM_MARK = "{optim_str}"  # where nanogcg puts the suffix in the prompt
VERBATIM_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@dataclass(frozen=True)
class Config:
    # A CPU budget for the embedded model (minutes). On GPUs use nanogcg's defaults, which
    # follow the GCG paper: num_steps=250, search_width=512, topk=256, suffix_tokens=20
    # (`--set gcg.num_steps=250 --set gcg.search_width=512 --set gcg.topk=256 --set gcg.suffix_tokens=20`).
    questions: int = 3  # TEST questions attacked (chosen by the seed, the same for both models)
    num_steps: int = 20
    search_width: int = 64  # candidate suffixes scored per step
    topk: int = 64  # candidate tokens per position, from the gradient
    suffix_tokens: int = 10  # the search starts from "x x ... x" (nanogcg's initial string)
    batch_size: int = 16  # candidates per forward pass (memory: batch x length x vocabulary logits)
    # bf16 products in the SEARCH only (the accuracies are scored in the model's own
    # precision): 4.6x faster matmuls on CPUs with AVX-512 BF16, the usual setting on GPUs.
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        for name in ("questions", "num_steps", "search_width", "topk", "suffix_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"gcg {name} must be at least 1, got {getattr(self, name)}.")


def _nanogcg():
    try:
        import nanogcg
    except ImportError as error:
        raise ObliviateError("The gcg attack needs the nanogcg package: pip install --no-deps nanogcg==0.3.0 "
                             "(it declares transformers<=4.47.1 but runs on transformers 5).") from error
    return nanogcg


class GcgView(torch.nn.Module):
    """The model as nanogcg needs to see it: an input embedding whose weight carries the
    module's scale, bf16 products when asked, and float32 logits at the last ``keep``
    positions only (``keep`` = target length + 1 covers every position nanogcg reads: it
    slices the logits that predict the target from the end). The positions before are left
    unwritten in an uninitialized tensor: the 262k-word head there would cost a product
    and gigabytes of float32 logits per candidate batch that nothing reads.
    ``keep=None``: every position."""

    def __init__(self, model: torch.nn.Module, bf16_autocast: bool) -> None:
        super().__init__()
        self.inner = model
        table = model.get_input_embeddings()
        scale = embedding_scale(model)
        self.embedding = table if scale == 1.0 else torch.nn.Embedding.from_pretrained(table.weight.detach() * scale)
        self.bf16_autocast = bf16_autocast
        self.keep: int | None = None

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embedding

    def forward(self, inputs_embeds: torch.Tensor, **kwargs):
        products = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16_autocast else nullcontext())
        batch, length = inputs_embeds.shape[:2]
        keep = length if self.keep is None else min(self.keep, length)
        with products:
            output = self.inner(inputs_embeds=inputs_embeds, use_cache=False, logits_to_keep=keep, **kwargs)
        kept = output.logits.float()
        logits = torch.empty(batch, length, kept.shape[-1], dtype=kept.dtype, device=kept.device)
        logits[:, length - keep:] = kept  # a copy: autograd carries the gradient through it
        output.logits = logits
        return output


@contextmanager
def _prompt_template(tokenizer, mode: str) -> Iterator[None]:
    """nanogcg applies the tokenizer's chat template (and sets one when there is none):
    the verbatim template for log-likelihood prompts, the model's own for letter prompts;
    the tokenizer gets its template back afterwards."""
    saved = getattr(tokenizer, "chat_template", None)
    if mode == "loglik":
        tokenizer.chat_template = VERBATIM_TEMPLATE
    try:
        yield
    finally:
        tokenizer.chat_template = saved


@contextmanager
def _torch_determinism_kept() -> Iterator[None]:
    """nanogcg turns on torch's deterministic algorithms for the whole process when
    seeded; the setting the caller had comes back afterwards."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def attacked_questions(n_questions: int, how_many: int, seed: int) -> np.ndarray:
    """A seeded choice of questions to attack, in a fixed order (at most all but one, so a
    held-out question is left to measure)."""
    count = min(how_many, n_questions - 1)
    return np.sort(np.random.default_rng(seed).permutation(n_questions)[:count])


def search_suffixes(lm: LoadedModel, prepared: PreparedQuestions, attacked: np.ndarray, config: Config,
                    seed: int) -> list[dict]:
    """One GCG search per attacked question: [{question, suffix, loss}]."""
    nanogcg = _nanogcg()
    # verbosity ERROR: its float32 and CPU hints do not apply (the view runs bf16 products)
    settings = nanogcg.GCGConfig(
        num_steps=config.num_steps, search_width=config.search_width, topk=config.topk,
        batch_size=config.batch_size, optim_str_init=" ".join(["x"] * config.suffix_tokens),
        use_prefix_cache=False, seed=seed, verbosity="ERROR",
    )
    view = GcgView(lm.model, config.bf16_autocast)
    found = []
    with _prompt_template(lm.tokenizer, prepared.mode), _torch_determinism_kept():
        for index in attacked.tolist():
            prompt, options, answer = question_prompt(prepared.questions[index], seed, prepared.mode, " " + OPTIM_MARK)
            target = f" {options[answer]}" if prepared.mode == "loglik" else LETTERS[answer]
            view.keep = len(lm.tokenizer(target, add_special_tokens=False).input_ids) + 1
            result = nanogcg.run(view, lm.tokenizer, prompt, target, settings)
            found.append({"question": index, "suffix": result.best_string, "loss": float(result.best_loss)})
    return found


def run(ctx: AttackContext, config: Config) -> dict:
    _nanogcg()  # a clear message before any work when the package is missing
    out: dict = {"settings": asdict(config)}
    corrects = {}
    for role, lm in ctx.models.items():
        prepared = prepared_test(ctx, lm)
        attacked = attacked_questions(len(prepared), config.questions, ctx.seed)
        held_out = np.setdiff1d(np.arange(len(prepared)), attacked)

        def search() -> list[dict]:
            return search_suffixes(lm, prepared, attacked, config, ctx.seed)

        # The original's suffixes depend on nothing the erasure did: from the results cache.
        found = (cached_for_original(ctx, lm, prepared, "gcg_suffixes", {"config": asdict(config),
                                     "attacked": attacked.tolist()}, search) if role == "original" else search())
        before = correct_on(lm, prepared, ctx.batching)
        with_suffix = [correct_on(lm, prepare(lm, prepared.questions, prepared.mode, ctx.seed, " " + f["suffix"]),
                                  ctx.batching) for f in found]
        best = max(range(len(found)), key=lambda i: (with_suffix[i][held_out].mean(), -i))
        after = with_suffix[best][held_out]
        corrects[role] = (before[held_out], after)
        out[role] = {
            "before": accuracy_interval(before[held_out], ctx.bootstrap, ctx.seed),
            "after": accuracy_interval(after, ctx.bootstrap, ctx.seed),  # the best suffix, on questions it never saw
            "correct_before": before[held_out].astype(int).tolist(),  # per held-out question, for pooled statistics
            "correct_after": after.astype(int).tolist(),
            "held_out_questions": held_out.tolist(),
            "best_suffix": best,
            "forced": {"before": float(before[attacked].mean()),
                       "after": float(np.mean([with_suffix[i][q] for i, q in enumerate(attacked)]))},
            "suffixes": [{**f, "correct_before": bool(before[f["question"]]), "correct_after": bool(with_suffix[i][f["question"]]),
                          "held_out": accuracy_interval(with_suffix[i][held_out], ctx.bootstrap, ctx.seed)}
                         for i, f in enumerate(found)],
        }
    if "original" in corrects and "erased" in corrects:
        out["recovered_frac"] = recovered_fraction(corrects["original"][0], corrects["erased"][1], ctx.bootstrap, ctx.seed,
                                                   ctx.chance)
    return out

"""Settings of `obliviate eco fit` (one dataclass for the API and the CLI).

Defaults that differ from the reference (METHOD.md section 3), and why:
- classifier: logistic regression on the model's own early hidden states, pooled by mean
  and max over the prompt's tokens (reference: a fine-tuned RoBERTa), trained also on
  the concept's open TRAIN questions and questions wrapped in jailbreak, framing and
  topic-hiding forms (forms.py): trained on plain questions only it flagged 5-8% of a
  held-out concept's wrapped test questions.
- corruption: Gaussian noise on every dimension with a learned sigma. The reference's
  multiple-choice setting is one dimension at sigma 1e6: ``--dims 1 --sigma 1e6``.
- sigma search stop: confirmed near chance by fresh-noise draws and a 95% upper bound
  (reference: the first single evaluation near chance, ``--sigma-stop touch``), since
  one evaluation of 50 questions stopped the search at a lucky 0.22 (sigma.py).
- base near chance: sigma = near_chance_ratio x the prompt embeddings' RMS (the
  reference would stay at s0 and corrupt nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.errors import ObliviateError
from obliviate.settings import setting
from obliviate.methods.eco.classifier import check_pooling
from obliviate.methods.eco.corruption import KINDS
from obliviate.methods.eco.forms import FORMS, HELD_OUT_FORMS
from obliviate.methods.eco.sigma import ZerothOrderConfig


@dataclass(frozen=True)
class EcoConfig:
    layer: int = 0  # decoder layer (1-based) feeding the classifier; 0 = chosen on the calibration split
    # The threshold is the held-out negatives' (1 - fpr) quantile (issue default 1%).
    target_fpr: float = setting(0.01, "false-positive rate the threshold is calibrated to on held-out negatives")
    conformal_alpha: float | None = None  # split-conformal instead: bounds FPR on new negatives by alpha
    threshold: float | None = None  # fixed threshold in (0, 1): skip calibration
    regularization: float = 1.0  # C of the logistic regression
    # mean+max raised recall behind unseen wrappers on concepts ECO was not developed on,
    # at the same FPR (README)
    pooling: str = setting("mean+max", "how the classifier pools the prompt's hidden states: mean | mean+max")
    corruption: str = "gaussian"  # gaussian | zero_out | sign_flip
    dims: int = 0  # first n dims (gaussian, sign_flip) or top-k dims (zero_out); 0 = all
    sigma: float | None = None  # fixed sigma: skip the zeroth-order search
    # Reference: 10 zeroth-order steps from s0 = 0.1 at lr 100.
    zo_steps: int = setting(10, "zeroth-order steps of the sigma search")
    zo_s0: float = setting(0.1, "sigma the search starts from")
    zo_lr: float = setting(100.0, "learning rate of the sigma search")
    sigma_stop: str = ZerothOrderConfig.stop_rule  # confirmed (fresh-noise draws, 95% upper bound) | touch (the reference)
    confirm_draws: int = ZerothOrderConfig.confirm_draws  # fresh-noise evaluations that confirm a touch of chance
    bound_tolerance: float = ZerothOrderConfig.bound_tolerance  # stop when the pooled 95% upper bound <= chance + this
    # sigma in units of the prompt embeddings' RMS when the uncorrupted TRAIN accuracy is
    # within noise of chance. Why 100: the concepts the model knows reached chance below it.
    near_chance_ratio: float = 100.0
    forms_per_question: int = 2  # wrapped forms per training question (forms.py)
    held_out_forms: tuple[str, ...] = HELD_OUT_FORMS  # forms kept out of training, measured on TEST
    prompt_marker: str = "\nAnswer:"  # end of the prompt in "Question: q\nAnswer: option" scoring
    scoring: str = "auto"  # multiple-choice scoring for the sigma objective (auto | loglik | letter)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ObliviateError(f"--threshold must be strictly between 0 and 1, got {self.threshold}.")
        if not 0 < self.target_fpr < 1:
            raise ObliviateError(f"--target-fpr must be strictly between 0 and 1, got {self.target_fpr}.")
        if self.conformal_alpha is not None and not 0 < self.conformal_alpha < 1:
            raise ObliviateError(f"--conformal-alpha must be strictly between 0 and 1, got {self.conformal_alpha}.")
        if self.corruption not in KINDS:
            raise ObliviateError(f"--corruption must be one of {', '.join(KINDS)}, got {self.corruption!r}.")
        if self.layer < 0 or self.dims < 0:
            raise ObliviateError("--layer and --dims must be >= 0 (0 = default / all dimensions).")
        check_pooling(self.pooling)
        self.zeroth_order()  # the search's own checks, before any model loads
        if self.near_chance_ratio <= 0:
            raise ObliviateError(f"--near-chance-ratio must be > 0, got {self.near_chance_ratio}.")
        unknown = [name for name in self.held_out_forms if name not in FORMS]
        if unknown or self.forms_per_question < 0:
            raise ObliviateError(f"--held-out-forms must name forms of {', '.join(FORMS)} (got unknown {unknown}) "
                                 f"and --forms-per-question must be >= 0 (got {self.forms_per_question}).")
        if self.sigma is not None and self.sigma < 0:
            raise ObliviateError(f"--sigma must be >= 0, got {self.sigma}.")

    def zeroth_order(self) -> ZerothOrderConfig:
        return ZerothOrderConfig(s0=self.zo_s0, lr=self.zo_lr, steps=self.zo_steps, stop_rule=self.sigma_stop,
                                 confirm_draws=self.confirm_draws, bound_tolerance=self.bound_tolerance)

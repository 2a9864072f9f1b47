"""Settings of `obliviate eco fit` (one dataclass for the API and the CLI)."""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.errors import ObliviateError
from obliviate.settings import setting
from obliviate.methods.eco.corruption import KINDS


@dataclass(frozen=True)
class EcoConfig:
    layer: int = 0  # decoder layer (1-based) feeding the classifier; 0 = chosen on the calibration split
    # The threshold is the held-out negatives' (1 - fpr) quantile (issue default 1%).
    target_fpr: float = setting(0.01, "false-positive rate the threshold is calibrated to on held-out negatives")
    conformal_alpha: float | None = None  # split-conformal instead: bounds FPR on new negatives by alpha
    threshold: float | None = None  # fixed threshold in (0, 1): skip calibration
    regularization: float = 1.0  # C of the logistic regression
    corruption: str = "gaussian"  # gaussian | zero_out | sign_flip
    dims: int = 0  # first n dims (gaussian, sign_flip) or top-k dims (zero_out); 0 = all
    sigma: float | None = None  # fixed sigma: skip the zeroth-order search
    # Reference: 10 zeroth-order steps from s0 = 0.1 at lr 100.
    zo_steps: int = setting(10, "zeroth-order steps of the sigma search")
    zo_s0: float = setting(0.1, "sigma the search starts from")
    zo_lr: float = setting(100.0, "learning rate of the sigma search")
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
        if self.sigma is not None and self.sigma < 0:
            raise ObliviateError(f"--sigma must be >= 0, got {self.sigma}.")

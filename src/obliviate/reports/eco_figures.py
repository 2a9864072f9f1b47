"""Calibration and sigma-search figures (matplotlib Agg, written atomically)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from obliviate.io import atomic_path
from obliviate.methods.eco.sigma import SigmaTrace


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def calibration_figure(path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float, concept: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="negatives (held out)", log=True)
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="positives (held out)", log=True)
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("classifier probability")
    ax.set_title(f"ECO prompt classifier: {concept}")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def sigma_figure(path: Path, trace: SigmaTrace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(s["sigma"], s["objective"]) for s in trace.steps if "objective" in s and s["sigma"] > 0]
    points.append((trace.sigma, trace.objective))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, ys = zip(*points)
    ax.plot(xs, ys, "o-")
    ax.set_xscale("log")
    ax.axhline(0.25, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("sigma")
    ax.set_ylabel("train forget accuracy")
    ax.set_title(f"zeroth-order sigma search ({trace.stopped})")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)

"""Grids of trained candidates, shared by the methods whose edit is a ParameterDelta (RMU,
gradient difference, NPO): the grid's points, each trained once with the loop (or found
finished in its checkpoint folder), and the ``Fitted`` that yields them in grid order."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from obliviate.edits.weights import ParameterDelta
from obliviate.io import save_tensors
from obliviate.training import sharding
from obliviate.training import loop
from obliviate.training.loop import TrainLog, cached_log, finished, restored, snapshot


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def grid_points(**axes) -> list[dict]:
    """Every combination of the axes' values, the first axis varying slowest."""
    points = [{}]
    for name, values in axes.items():
        points = [{**p, name: v} for p in points for v in as_tuple(values)]
    return points


def model_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the input embedding (so a cached candidate trained on the
    EMBER-edited model is never reused for the plain one, and vice versa)."""
    weight = sharding.full(model.get_input_embeddings().weight)
    probe = torch.linspace(-1, 1, weight.shape[1], dtype=torch.float64, device=weight.device)
    return f"{float((weight.double() @ probe).sum()):.12e}"


def train_delta(job: loop.TrainingJob, folder: Path | None, progress: bool, desc: str, metadata: dict | None = None):
    """Train the job's ``params`` from their current values, capture the result as a
    ParameterDelta and restore the originals (the model leaves as it came). A finished
    candidate in ``folder`` is loaded instead of trained again."""
    params = job.params
    originals = snapshot(params)
    done = cached_log(folder)
    if done is not None and (folder / "trained.safetensors").is_file():
        saved = load_file(str(folder / "trained.safetensors"))
        # The parameters' order, not the file's (safetensors sorts its keys): the delta's
        # summary sums over this order, and a resumed run must report the same delta_norm
        # to the last bit as the run that trained the candidate.
        new = {name: saved[name] for name in originals}
        return ParameterDelta(original=originals, new=new, metadata={k: str(v) for k, v in (metadata or {}).items()}), done
    with restored(params, originals):
        log = loop.train(job, folder, progress, desc)
        # The trained values, whole (gathered from every process when FSDP shards them).
        delta = ParameterDelta(original=originals, new=snapshot(params),
                               metadata={k: str(v) for k, v in (metadata or {}).items()})
    if folder is not None and sharding.world()[0] == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / "trained.safetensors", {n: t.contiguous() for n, t in delta.new.items()})
        finished(folder, log)
    return delta, log


@dataclass
class TrainedGrid:
    """A method's ``Fitted``: trains each grid point lazily, in grid order, and yields its
    edit; the model is in the same state before and after each yield."""

    method: str
    points: list[dict]
    run_point: Callable[[dict], tuple[object, TrainLog]]
    info: dict = field(default_factory=dict)
    logs: list[dict] = field(default_factory=list)

    def candidates(self):
        for point in self.points:
            edit, log = self.run_point(point)
            self.logs.append({"params": point, **log.as_dict(), "edit": edit.summary()})
            yield point, edit

    def report(self) -> dict:
        return {"method": self.method, "grid": self.points, **self.info, "candidates": self.logs}

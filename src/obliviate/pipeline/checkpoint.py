"""An erase run's resumable state: each grid's evaluated candidates, written to the output
folder's checkpoint after every candidate so an interrupted run resumes where it stopped
(nothing is written for a run without a folder), and the seconds each stage of this run
took (kept in memory for results.json: a resumed grid's earlier seconds come from its
candidates)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from obliviate.io import write_json
from obliviate.pipeline.outputs import CHECKPOINT, mark_out_dir, prepare_out_dir


@dataclass
class CandidateResult:
    params: dict
    metrics: dict  # name -> {value, low, high} on TRAIN questions
    score: float
    score_se: float
    rejected: str | None = None
    seconds: float = 0.0  # its evaluation on TRAIN (an interrupted earlier run's, when read back)

    def value(self, name: str) -> float:
        return self.metrics.get(name, {}).get("value", float("nan"))


@dataclass
class RunCheckpoint:
    """The run's grids (key -> candidates evaluated so far) and stage timings; ``out`` None:
    kept in memory only."""

    fingerprint: str
    out: Path | None = None
    grids: dict[str, list[CandidateResult]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path | None, fingerprint: str, overwrite: bool) -> "RunCheckpoint":
        """The checkpoint of ``out`` when it is this run's (refusing another run's folder unless
        ``overwrite``), else an empty one."""
        if out is None:
            return cls(fingerprint)
        state = prepare_out_dir(out, fingerprint, overwrite)
        grids = {key: [CandidateResult(**row) for row in rows] for key, rows in state.get("sweeps", {}).items()}
        return cls(fingerprint, out, grids)

    def mark(self) -> None:
        """Create the folder with the checkpoint as its first file (after the input checks)."""
        if self.out is not None:
            mark_out_dir(self.out, self._state())

    def grid(self, key: str) -> list[CandidateResult]:
        """The candidates of grid ``key`` evaluated so far (read back from an earlier run)."""
        return self.grids.setdefault(key, [])

    def record(self, key: str, results: list[CandidateResult]) -> None:
        """Grid ``key``'s candidates as they stand now, written at once."""
        self.grids[key] = list(results)
        if self.out is not None:
            write_json(self.out / CHECKPOINT, self._state())

    def seconds_before_resume(self, key: str) -> float:
        """What an interrupted earlier run spent evaluating the candidates of grid ``key`` that
        this run reads back instead of evaluating again."""
        return sum(result.seconds for result in self.grids.get(key, []))

    def _state(self) -> dict:
        return {"fingerprint": self.fingerprint,
                "sweeps": {key: [asdict(result) for result in results] for key, results in self.grids.items()}}

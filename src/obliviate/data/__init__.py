"""The benchmark and a user's own concept files, validated (concepts.py); the EMBER
benchmark itself ships in this package (ember_benchmark/, MIT, its README)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from obliviate.errors import ObliviateError

BENCHMARK_FOLDER = "ember_benchmark"


def benchmark_dir() -> Path:
    """The EMBER benchmark folder installed with the package: the default ``--data``."""
    folder = resources.files(__name__) / BENCHMARK_FOLDER
    # Every loader reads plain files by path; a zipped install has no such folder.
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ObliviateError(f"The packaged EMBER benchmark is missing ({folder}): reinstall obliviate, "
                             "or pass --data with a benchmark folder.")
    return folder

"""The ORIGINAL model's results, computed once per model, data, seed and settings.

Every erase, eval, attack and compare measures the original model the same way: its
option scores on each question set, its greedy continuations of each prompt set (with
what the output layer saw), the output states of tied models, and its relearning curve.
Those depend on nothing the erasure does, so they are kept under the user's cache folder
(``models.loading.cache_dir() / "results"``, or ``OBLIVIATE_RESULTS_CACHE``) and read back
by the next command on the same model and data.

An entry's key is the sha256 of:
- the weights: the exact bytes of every parameter (names, dtypes and shapes included)
  and the model's configuration (architecture, soft-caps, attention implementation);
  a tied output layer and an untied copy of the same matrix hash alike.
  A sha256 of the bytes in memory, not of the files: an edited model in memory, a patch
  applied on load, or a converted GGUF all hash to what actually runs, and one changed
  bit is a different key. It costs about 0.9 s for Gemma 3 270M (1.07 GB) on the CPU,
  less than a quarter of one question set's scoring;
- the data as the model sees it: the token ids of every item (so the tokenizer, the
  prompt template and the option shuffle of the seed are all in it), the answers;
- the settings that change the numbers: the batch budget (padding moves scores by float
  rounding), new tokens per prompt, the relearning settings, torch and transformers
  versions, the device type (and GPU name). The thread count is not in the key: it moves
  scores by float rounding only, far below any reported digit.

Entries are safetensors files (no pickle) written atomically (io.save_tensors), named by
their full key, which is stored inside and checked on reading, with the ``FORMAT`` they
were written in. An absent or unreadable entry, another key, or another format (an entry
written before its layout changed) is a miss, never an error; the fresh entry then
replaces it. An entry of the current format that its decoder cannot read is a bug, and
raises. ``enabled=False`` (``--no-cache``) neither reads nor writes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.io import load_tensors, save_tensors
from obliviate.models.loading import LoadedModel, cache_dir

# The layout of an entry (its tensors and metadata, as the decoders read them). Bump it when
# that changes: entries written in another format are then a miss, not a decoding error.
FORMAT = 1
ENV_FOLDER = "OBLIVIATE_RESULTS_CACHE"


def results_dir() -> Path:
    """Where the original model's results are kept."""
    return Path(os.environ.get(ENV_FOLDER) or cache_dir() / "results")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's exact bytes (with names, dtypes, shapes) and the config.

    Every name is hashed with the tensor it holds, tied ones included, and the config's
    tying flag is left out: a tied model and its untied copy (an EMBER run unties the
    original before its output rows change) compute the same function and share a key,
    so `eval`, which unties first, reads what `erase` cached before untying."""
    digest = hashlib.sha256()
    tensor_digests: dict[int, str] = {}  # a tied matrix is read once
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in tensor_digests:
            tensor = param.detach().to("cpu").contiguous()
            tensor_digests[id(param)] = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().data).hexdigest()
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}:{tensor_digests[id(param)]}".encode())
    config = getattr(model, "config", None)
    if config is not None:
        settings = without_tying(config.to_dict())
        settings.pop("_name_or_path", None)
        settings["attn_implementation"] = getattr(config, "_attn_implementation", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def without_tying(settings: dict) -> dict:
    """A config dict without ``tie_word_embeddings`` at any depth (the weights say it)."""
    return {key: without_tying(value) if isinstance(value, dict) else value
            for key, value in settings.items() if key != "tie_word_embeddings"}


def environment(lm: LoadedModel) -> dict:
    import transformers

    device = torch.device(lm.device) if not isinstance(lm.device, torch.device) else lm.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": device.type, "gpu": gpu}


def digest(payload: Any) -> str:
    """sha256 of JSON (numpy arrays and tensors as lists)."""
    def default(value):
        if isinstance(value, (np.ndarray, torch.Tensor)):
            return np.asarray(value).tolist()
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        return str(value)

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=default).encode()).hexdigest()


class OriginalCache:
    """Read and write the original model's results; keys bind them to the weights as they
    are when the cache is opened (open it before any edit is applied)."""

    def __init__(self, lm: LoadedModel | None, enabled: bool = True, folder: Path | None = None):
        self.enabled = enabled and lm is not None
        self.folder = folder or results_dir()
        self.hits: list[str] = []
        self.misses: list[str] = []
        self._base = digest([weights_fingerprint(lm.model), environment(lm)]) if self.enabled else ""

    def key(self, kind: str, payload: Any) -> str:
        return digest([self._base, kind, payload])

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, kind: str, payload: Any) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, metadata) of an entry, or None (a miss: absent, unreadable, another key
        or another ``FORMAT``)."""
        if not self.enabled:
            return None
        key = self.key(kind, payload)
        try:
            tensors, metadata = load_tensors(self.path(key), "cache entry")
        except ObliviateError:
            self.misses.append(kind)
            return None
        if metadata.get("key") != key or metadata.get("format") != str(FORMAT):
            self.misses.append(kind)
            return None
        self.hits.append(kind)
        return tensors, json.loads(metadata.get("extra", "{}"))

    def save(self, kind: str, payload: Any, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> None:
        """Write an entry atomically; a full disk or read-only folder only loses the cache."""
        if not self.enabled:
            return
        key = self.key(kind, payload)
        try:
            save_tensors(self.path(key), {k: t.detach().cpu() for k, t in tensors.items()},
                         {"key": key, "kind": kind, "format": FORMAT,
                          "extra": json.dumps(extra or {}, sort_keys=True)})
        except ObliviateError:
            pass  # the results stand; only the next command recomputes them

    def fetch(self, kind: str, payload: Any, compute: Callable[[], Any], encode: Callable[[Any], tuple[dict, dict]],
              decode: Callable[[dict, dict], Any]) -> Any:
        """The cached value, else ``compute()`` saved for next time. ``decode`` reads an entry
        of the current ``FORMAT`` (other formats are a miss), so an error it raises is a bug
        and propagates: swallowed, it would be a silent miss on every run."""
        found = self.load(kind, payload)
        if found is not None:
            return decode(*found)
        value = compute()
        self.save(kind, payload, *encode(value))
        return value

    def fetch_json(self, kind: str, payload: Any, compute: Callable[[], Any]) -> Any:
        """``fetch`` for a value that is plain JSON (lists, numbers, strings)."""
        return self.fetch(kind, payload, compute, lambda value: ({}, {"value": value}),
                          lambda _, extra: extra["value"])


def pack(sequences: list, dtype=torch.long) -> dict[str, torch.Tensor]:
    """Ragged sequences (lists or tensors sharing trailing dims) as one flat tensor and lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if not sequences or all(len(s) == 0 for s in sequences):
        return {"values": torch.zeros(0, dtype=dtype), "lengths": lengths}
    parts = [torch.as_tensor(s, dtype=dtype) for s in sequences if len(s)]
    return {"values": torch.cat(parts), "lengths": lengths}


def unpack(values: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(values, lengths.tolist())) if len(lengths) else []

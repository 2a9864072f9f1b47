"""Writes that are atomic (a file is complete or absent, never half-written), reproducible
(same inputs, same bytes), named when they fail, and one writer per output folder."""
from __future__ import annotations

import errno
import hashlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from obliviate.errors import ObliviateError

def tensor_sha256(tensors: "torch.Tensor | dict[str, torch.Tensor]") -> str:
    """The sha256 of exact bits (dtype and shape included) of a tensor or of named tensors:
    checks that an edit is applied to the model it was made for without storing the values."""
    named = tensors if isinstance(tensors, dict) else {"": tensors}
    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().to("cpu").contiguous()
        digest.update(f"{name + ':' if name else ''}{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(payload: Any) -> str:
    """16 hex digits of the sha256 of ``payload`` as sorted JSON: the key of a run, a cache
    entry or a checkpoint (equal settings give equal keys in every process)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# safetensors keeps metadata in a hash map, so several keys come out in a different
# order in every process; one key holding sorted JSON makes the bytes reproducible.
METADATA_KEY = "obliviate"

TEMP_SUFFIX = ".tmp"  # atomic_path's temporary files are named ".{name}.{random}.tmp"

WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose a folder on another disk",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; make the folder writable or choose another one",
    errno.EPERM: "operation not permitted; make the folder writable or choose another one",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another folder",
}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@contextmanager
def named_write_errors(path: str | Path) -> Iterator[None]:
    """Turn disk-full, read-only and permission errors into an ObliviateError naming the path."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ADVICE:
            raise
        where = err.filename or path
        raise ObliviateError(
            f"Cannot write {where}: {WRITE_ADVICE[err.errno]}. Finished files are complete; "
            "run the same command again to resume."
        ) from err


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success."""
    path = Path(path)
    with named_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        # Not mkstemp: its files stay readable by their owner only; this one gets the umask's.
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written atomically, byte for byte the same for the same inputs
    (``metadata`` values are stored as strings)."""
    from safetensors.torch import save_file

    header = {METADATA_KEY: json.dumps({k: str(v) for k, v in (metadata or {}).items()}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=header)


def load_tensors(path: str | Path, what: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear error when it is missing or broken."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ObliviateError(f"{what} file {path} does not exist.")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
        if set(metadata) == {METADATA_KEY}:
            metadata = json.loads(metadata[METADATA_KEY])
            if not isinstance(metadata, dict):
                raise ValueError(f"its metadata is JSON {type(metadata).__name__}, not an object")
    except (SafetensorError, OSError, ValueError) as err:
        # A damaged or truncated file: SafetensorError (its header), OSError (reading it),
        # ValueError (our metadata is not a JSON object). Anything else is a bug: it propagates.
        raise ObliviateError(f"{what} file {path} is not a readable safetensors file ({err}).") from err
    return tensors, metadata  # without METADATA_KEY: written by an older version, one string per key


def lock_path(folder: str | Path) -> Path:
    """The lock file of an output folder: beside it, so the folder itself stays empty until
    the run writes (an empty folder is a fresh one) and survives --overwrite removing it."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _lock_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"process {holder['pid']} ({holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has the lock but has not written its name yet


@contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Hold ``folder`` for this process; another writer is refused with its pid and command.

    flock is released by the kernel when its process dies (even by SIGKILL), so a lock
    file left by a dead process is simply taken over.
    """
    path = lock_path(folder)
    with named_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ObliviateError(
                f"Output folder {folder} is being written by {_lock_holder(path)}. Wait for it to "
                "finish, or choose another --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": command}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the flock


def remove_leftovers(folder: Path) -> None:
    """Delete what a writer killed mid-write leaves: temporary files and empty subfolders
    (call with the lock held, so no live writer owns them). Left there, they make the
    folder look like it holds some other run, and the rerun is refused."""
    if not folder.is_dir():
        return
    for leftover in folder.rglob(f".*{TEMP_SUFFIX}"):
        if leftover.is_file():
            leftover.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


@contextmanager
def exclusive_output(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Lock ``folder`` for one command, name write failures, and remove the folder again if
    this command created it and failed before writing anything into it."""
    folder = Path(folder)
    existed = folder.exists()
    with output_lock(folder, command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])):
        remove_leftovers(folder)
        try:
            with named_write_errors(folder):
                yield folder
        except BaseException:
            if not existed and folder.is_dir() and not any(folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
            raise

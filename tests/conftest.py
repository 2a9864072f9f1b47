"""Shared fixtures: tiny random models built from a config, a tiny tokenizer, the data.

Tiny models are for plumbing (shapes, which parameters change, determinism, files);
whether forgetting happens is tested on the real embedded model in tests marked `slow`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from obliviate.data import benchmark_dir
from obliviate.data.concepts import ConceptData, load_benchmark_concept
from obliviate.models.loading import LoadedModel

REPO = Path(__file__).resolve().parents[1]
# The benchmark shipped in the package, so a clone anywhere passes; OBLIVIATE_DATA: another copy.
DATA_DIR = Path(os.environ.get("OBLIVIATE_DATA") or benchmark_dir())
# The full benchmark, with relearn_paragraphs.json (not shipped), where a checkout has it beside.
FULL_DATA_DIR = REPO.parent / "shared" / "data" / "ember-benchmark"


def _train_tiny_tokenizer():
    """A 1,500-token byte-level BPE trained on benchmark text (seconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import json

    sentences = [s for entry in json.loads((DATA_DIR / "concept_sentences.json").read_text()) for s in entry["sentences"]]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(autouse=True)
def _results_cache(tmp_path_factory, monkeypatch):
    """Tests keep the original model's cached results in a folder of their own (one per
    session), never in the user's cache."""
    from obliviate.evaluation.cache import ENV_FOLDER

    monkeypatch.setenv(ENV_FOLDER, str(tmp_path_factory.getbasetemp() / "results-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tiny_tokenizer()


def tiny_config(arch: str, vocab_size: int, tie: bool = True):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=tie,
    )
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2, **common)
    if arch == "llama":
        return LlamaConfig(head_dim=16, **common)
    raise ValueError(arch)


def make_tiny_lm(tokenizer, arch: str = "gemma3", seed: int = 0, tie: bool = True) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tie), dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{arch}", source="config")


@pytest.fixture
def tiny_lm(tiny_tokenizer) -> LoadedModel:
    """A fresh tiny Gemma 3 (scaled, tied embeddings) for each test."""
    return make_tiny_lm(tiny_tokenizer, "gemma3")


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LoadedModel:
    """A fresh tiny Llama (unscaled embeddings) for architecture-agnostic checks."""
    return make_tiny_lm(tiny_tokenizer, "llama", tie=False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "concept_sentences.json").exists():
        pytest.skip(f"EMBER benchmark data not found at {DATA_DIR} (set OBLIVIATE_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def full_data_dir(data_dir) -> Path:
    """A benchmark folder WITH relearn_paragraphs.json (the packaged copy has none): DATA_DIR
    when it has the file, else the full copy beside the clone; the test is skipped without one."""
    for folder in (data_dir, FULL_DATA_DIR):
        if (folder / "relearn_paragraphs.json").is_file():
            return folder
    pytest.skip(f"no benchmark folder with relearn_paragraphs.json (set OBLIVIATE_DATA; tried {data_dir}, {FULL_DATA_DIR})")


def same_outcome(a, b) -> None:
    """Two evaluation outcomes carry the very same numbers (metrics, answers, prompt rows, examples)."""
    import numpy as np

    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        assert a.metrics[name].as_dict() == b.metrics[name].as_dict(), name
    for name in a.correct:
        for x, y in zip(a.correct[name], b.correct[name]):
            np.testing.assert_array_equal(x, y)
    for kind in a.prompt_rows:
        for x, y in zip(a.prompt_rows[kind], b.prompt_rows[kind]):
            np.testing.assert_array_equal(x, y)
    assert a.examples == b.examples and a.coverage == b.coverage and a.rescored == b.rescored


def shrink(data: ConceptData, questions: int = 6, general: int = 8, prompts: int = 3) -> ConceptData:
    """Few questions and prompts, for fast plumbing tests."""
    data.questions = {k: v[:questions] for k, v in data.questions.items()}
    data.general = {k: v[:general] for k, v in data.general.items()}
    data.coherency_prompts = data.coherency_prompts[:prompts]
    return data


@pytest.fixture
def small_concept(data_dir) -> ConceptData:
    return shrink(load_benchmark_concept("Harry Potter", data_dir, general_questions=8))


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded Gemma 3 270M (slow tests only)."""
    from obliviate.models.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Gemma 3 saved with save_pretrained: loadable by path like any user model."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    lm = make_tiny_lm(tiny_tokenizer, "gemma3")
    lm.model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder

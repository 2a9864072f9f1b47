import pytest
import torch

from obliviate.errors import ObliviateError
from obliviate.models.loading import (
    changed_rows, embedding_scale, embeddings_are_tied, input_embedding_name, load_model,
    parameter_fingerprints, resolve_dtype, resolve_model_source, untie_output_embeddings,
)


def test_embedding_scale_is_read_from_the_module(tiny_lm, tiny_llama):
    assert embedding_scale(tiny_lm.model) == pytest.approx(32 ** 0.5)
    assert embedding_scale(tiny_llama.model) == 1.0
    ids = torch.tensor([[5, 6]])
    raw = tiny_lm.model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(tiny_lm.model.get_input_embeddings()(ids), raw * embedding_scale(tiny_lm.model))


def test_untie_gives_the_output_layer_its_own_equal_copy(tiny_lm):
    model = tiny_lm.model
    assert embeddings_are_tied(model)
    assert untie_output_embeddings(model) is True
    assert not embeddings_are_tied(model) and model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    with torch.no_grad():
        model.get_input_embeddings().weight[7] += 1
    assert not torch.equal(model.lm_head.weight[7], model.get_input_embeddings().weight[7])
    assert untie_output_embeddings(model) is False  # already untied


def test_fingerprints_find_exactly_the_changed_rows(tiny_lm):
    before = parameter_fingerprints(tiny_lm.model)
    name = input_embedding_name(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model.get_input_embeddings().weight[[3, 9]] *= 1.0001
    assert changed_rows(before, parameter_fingerprints(tiny_lm.model)) == {name: [3, 9]}


def test_model_specs_are_resolved_or_refused(tmp_path, tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_source("google/gemma-2-2b-it") == "google/gemma-2-2b-it"  # a hub id
    with pytest.raises(ObliviateError, match="does not exist"):
        resolve_model_source("./missing/folder")
    with pytest.raises(ObliviateError, match="does not exist"):
        resolve_model_source(str(tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ObliviateError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_dtype_defaults_follow_the_device(tiny_model_dir):
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ObliviateError, match="Unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.model.get_input_embeddings().weight.dtype == torch.bfloat16 and lm.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ObliviateError, match="no CUDA GPU"):
        load_model(str(tiny_model_dir), device="cuda")


def test_a_gguf_file_is_parsed_once_while_converting(monkeypatch):
    """The tokenizer, the config and the weights each ask for a reader: one parse serves all,
    and the library's reader is back afterwards."""
    gguf = pytest.importorskip("gguf")
    from obliviate.models.loading import _one_gguf_read

    parsed = []

    class Reader:
        def __init__(self, path, mode="r"):
            parsed.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with _one_gguf_read():
        first, second, other = gguf.GGUFReader("a.gguf"), gguf.GGUFReader("a.gguf"), gguf.GGUFReader("b.gguf")
    assert first is second and other is not first and parsed == [("a.gguf", "r"), ("b.gguf", "r")]
    assert gguf.GGUFReader is Reader

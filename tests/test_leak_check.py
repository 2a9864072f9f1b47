"""The leak check: a planted original row is found, a clean output passes, and a real erase
of a tied tiny model writes no original row anywhere (with --untie-embeddings: a warning)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import obliviate
from obliviate.errors import ObliviateError
from obliviate.edits.leak_check import find_leaks

FAST = dict(
    ember={"k": 20, "ratio_threshold": 1.0, "delta": 7.0},
    evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50},
    data_options={"general_questions": 6},
)


def _rows(seed: int, n: int = 40, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_a_planted_original_row_is_found_and_a_clean_output_passes():
    table = _rows(0)
    token_ids = torch.tensor([3, 7, 11])
    original = table[token_ids].clone()
    edited = original + 5 * _rows(1, 3)
    table[token_ids] = edited  # the edited input embedding: its own new rows are no leak
    clean = find_leaks(token_ids, original, edited, [("embed", table), ("bias", torch.zeros(8)), ("wide", _rows(2, 5, 16))])
    assert clean == {"passed": True, "tensors_checked": 1, "leak_count": 0, "leaks": []}

    head = _rows(3)
    head[20] = original[1]  # a stale exact copy
    head[30] = 2.5 * original[2]  # a rescaled copy: cosine 1
    found = find_leaks(token_ids, original, edited, [("embed", table), ("head", head)])
    assert not found["passed"] and found["tensors_checked"] == 2
    assert {(leak["tensor"], leak["token_id"], leak["row"]) for leak in found["leaks"]} == {("head", 7, 20), ("head", 11, 30)}
    assert all(leak["cosine"] == pytest.approx(1.0) for leak in found["leaks"])


def run(tiny_model_dir, data_dir, out, **extra):
    return obliviate.erase("Golf", data=data_dir, out=out, model={"name": str(tiny_model_dir)}, progress=False,
                           **{**FAST, **extra})


def _original_rows_anywhere(folder, token_ids, original) -> list[str]:
    """Exact copies of original rows in any safetensors file under folder (independent of leak_check)."""
    found = []
    for path in folder.rglob("*.safetensors"):
        for name, tensor in load_file(path).items():
            if tensor.dim() == 2 and tensor.shape[1] == original.shape[1]:
                hits = (tensor[:, None, :] == original[None]).all(-1).any(0)
                found += [f"{path.name}:{name}:{int(t)}" for t in token_ids[hits]]
    return found


def test_default_erase_of_a_tied_model_writes_no_original_row(tiny_model_dir, data_dir, tmp_path):
    result = run(tiny_model_dir, data_dir, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    patch = result.edit
    moved = torch.tensor([i in patch.changed_token_ids() for i in patch.token_ids.tolist()])
    assert moved.any(), "the fixed delta must edit rows for this test to mean anything"
    assert _original_rows_anywhere(tmp_path / "run", patch.token_ids[moved], patch.original_rows[moved]) == []
    assert results["output_rows"] == "neutral" and "leak_warning" not in results
    check = results["leak_check"]
    assert check["passed"] and check["tensors_checked"] >= 2 and "embedding_patch.safetensors" in check["files"]
    head = result.lm.model.get_output_embeddings().weight
    mean = patch.output_rows[0]
    assert torch.equal(head[patch.token_ids[moved]], mean.expand(int(moved.sum()), -1))  # nothing of the original
    assert not torch.equal(head, result.lm.model.get_input_embeddings().weight)


def test_shared_tied_output_edits_the_tied_matrix(tiny_model_dir, data_dir, tmp_path):
    result = run(tiny_model_dir, data_dir, tmp_path / "run", ember={**FAST["ember"], "tied_output": "shared"})
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["output_rows"] == "shared" and results["embeddings_untied"] is False
    assert results["leak_check"]["passed"] and result.edit.output_rows is None
    model = result.lm.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_untied_erase_keeps_the_originals_in_lm_head_and_warns(tiny_model_dir, data_dir, tmp_path):
    run(tiny_model_dir, data_dir, tmp_path / "run", ember={**FAST["ember"], "untie_embeddings": True})
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["embeddings_untied"] is True and "lm_head" in results["leak_warning"]
    assert not results["leak_check"]["passed"]
    assert {leak["tensor"].split(":")[-1] for leak in results["leak_check"]["leaks"]} == {"lm_head.weight"}
    assert results["leak_check"]["leak_count"] == results["edited_token_count"]
    assert "Warning:" in (tmp_path / "run" / "report.md").read_text()
    assert "lm_head" in (tmp_path / "run" / "report.html").read_text()


def test_an_unexpected_leak_fails_loudly_after_writing_results(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from obliviate.methods import ember

    # untied, but the edited tokens' output rows are never replaced
    monkeypatch.setattr(ember, "mean_output_row", lambda model: None)
    with pytest.raises(ObliviateError, match="Leak check failed"):
        run(tiny_model_dir, data_dir, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["leak_check"]["passed"] is False and results["leak_check"]["leak_count"] > 0

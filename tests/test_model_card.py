"""The model card: YAML metadata the Hub accepts, test numbers with intervals, attacks,
what was edited and how to verify; push_to_hub through a stand-in HfApi (no network)."""
from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from obliviate.errors import ObliviateError
from obliviate.evaluation.results import RunResults
from obliviate.reports import model_card as mc


def iv(value: float) -> dict:
    return {"value": value, "low": round(value - 0.1, 2), "high": round(value + 0.1, 2)}


def results(chance: dict | None = None, **extra) -> RunResults:
    """An erase run's results as results.json holds them, read back typed."""
    metrics = {"qa_base": iv(0.64), "qa_edited": iv(0.31), "simdom_base": iv(0.5), "simdom_edited": iv(0.48),
               "general_base": iv(0.45), "general_edited": iv(0.44), "efficacy": iv(0.83), "specificity": iv(0.97),
               "coherence": iv(0.95), "harmonic": iv(0.89)}
    return RunResults.from_dict(payload(test={"metrics": metrics, **({"chance": chance} if chance else {})}, **extra))


def payload(**extra) -> dict:
    return {"kind": "erase", "concept": "Gambling", "method": "ember", "model": "embedded", "seed": 42, "delta": 5.0,
            "edited_token_count": 37, "output_rows": "shared", "scoring": "auto",
            "general_knowledge_source": "other benchmark concepts' QA (100 per split)",
            "features": [{"index": 3, "ratio": 9.1, "concept_share": 0.8, "top_tokens": [" gambling", " casino"]}],
            "details": {"ember": {"edited_tokens": [" casino", " betting"]}},
            "saved": {"model": True, "edits": ["embedding_patch.safetensors"]},
            "leak_check": {"passed": True, "tensors_checked": 2, "leaks": []},
            "examples": {"general": [{"prompt": "Question: Who wrote Hamlet?\nAnswer:", "original": " Shakespeare.",
                                      "edited": " Shakespeare."}],
                         "concept": [{"prompt": "The casino", "original": " floor was busy", "edited": " floor was"}]},
            "config": {"evaluation": {"scoring": "auto"}}, **extra}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_metadata_and_sections():
    card = mc.model_card(results())
    meta = front_matter(card)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["library_name"] == "transformers"
    assert {"obliviate", "concept-erasure", "ember", "erased-gambling"} <= set(meta["tags"])
    for heading in ("## Settings", "## Test results", "## Attacks", "## What was edited", "## How to verify"):
        assert heading in card
    assert "| concept questions (lower = more erased) | 0.64 [0.54, 0.74] | 0.31 [0.21, 0.41] |" in card
    assert "| efficacy (1 - share of the above-chance concept knowledge left) | 0.83 [0.73, 0.93] |" in card
    assert "No attacks were run" in card and "Leak check: passed" in card and "`' casino'`" in card
    assert "--concept \"Gambling\"" in card and "--tasks ember_qa_gambling" in card
    assert "--base embedded" in card and "load_model('embedded')" in card  # the base exactly as erased
    assert "pretrained=THIS_FOLDER" in card and "pretrained=me/x" in mc.model_card(results(), repo_id="me/x")
    assert "Expected: 37 embedding rows changed" in card and "| EMBER delta | 5.0 |" in card
    assert "Shakespeare" in card


def test_the_card_states_the_chance_level_the_run_recorded():
    assert "chance accuracy is 0.25. " in mc.model_card(results())  # a run that recorded none: four options
    assert "chance accuracy is 0.25. " in mc.model_card(results(chance={"qa": 0.25, "simdom": 0.25}))
    assert "chance accuracy is 0.333. " in mc.model_card(results(chance={"qa": 1 / 3, "simdom": 1 / 3}))
    mixed = mc.model_card(results(chance={"qa": 1 / 3, "simdom": 0.2}))
    assert "chance accuracy is qa 0.333, simdom 0.2. " in mixed


def test_attacks_are_reported_with_their_intervals():
    attack = {"original": {"after": iv(0.66)}, "erased": {"before": iv(0.31), "after": iv(0.52)},
              "recovered_frac": iv(0.54)}
    card = mc.model_card(results(), attacks={"relearn": attack})
    assert "| relearning (fine-tuning on concept paragraphs) | 0.66 [0.56, 0.76] | 0.31 [0.21, 0.41] | " \
           "0.52 [0.42, 0.62] | 0.54 [0.44, 0.64] |" in card
    assert "No attacks were run" not in card
    with_attack = RunResults.from_dict({**results().to_dict(), "in-context": attack})
    assert mc.model_card(with_attack).count("concept paragraphs in the prompt") == 1


def test_several_concepts_a_local_base_and_an_adapter():
    per_concept = {name: {"kind": "erase", "concept": name} for name in ("Gambling", "Golf")}  # as erase writes it
    card = mc.model_card(results(concepts=per_concept, model="/models/mine",
                                 saved={"model": False, "edits": ["adapter/adapter_model.safetensors"]}))
    meta = front_matter(card)
    assert "base_model" not in meta  # a local folder is not a hub id: the Hub would reject it
    assert meta["library_name"] == "peft" and {"erased-gambling", "erased-golf"} <= set(meta["tags"])
    assert "“Gambling” and “Golf”" in card and "ember_qa_gambling,ember_qa_golf" in card
    assert mc.base_model_id(RunResults.from_dict({"model": "Qwen/Qwen2.5-0.5B"})) == "Qwen/Qwen2.5-0.5B"


def test_lm_eval_numbers_join_the_card():
    block = {"results": {"mmlu": {"acc,none": {"original": iv(0.41), "erased": iv(0.40), "difference": iv(-0.01)}}}}
    card = mc.model_card(results(lm_eval=block))
    assert "| mmlu | acc | 0.41 [0.31, 0.51] | 0.40 [0.30, 0.50] | -0.01 [-0.11, 0.09] |" in card
    assert "lm-evaluation-harness" not in mc.model_card(results()).split("## How to verify")[0]


def test_a_run_that_applied_nothing_says_so():
    card = mc.model_card(results(delta=0.0))
    assert card.count("No edit was applied") == 2 and "Expected:" not in card and "rows of the embedding" not in card
    assert "No edit was applied" not in mc.model_card(results())


def test_a_bare_result_still_makes_a_card():
    card = mc.model_card(RunResults.from_dict({"concept": "Golf", "method": "rmu", "model": "org/model"}))
    assert front_matter(card)["base_model"] == "org/model"
    assert "from_pretrained(\"org/model\")" in card
    assert "No test questions were evaluated" in card and "No attacks were run" in card


def test_card_goes_into_model_when_it_exists(tmp_path):
    assert mc.write_model_card(tmp_path, results()) == tmp_path / "README.md"
    (tmp_path / "model").mkdir()
    path = mc.write_model_card(tmp_path, results())
    assert path == tmp_path / "model" / "README.md" and path.read_text().startswith("---\nbase_model:")


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, **kwargs):
        FakeApi.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls = []
    module = types.ModuleType("huggingface_hub")
    module.HfApi = FakeApi
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return FakeApi


def test_push_to_hub_creates_and_uploads(tmp_path, fake_hub):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"leak_check": {"passed": True}}))
    mc.write_model_card(tmp_path, results())
    url = mc.push_to_hub(model, "me/gemma-no-gambling", private=True, token="t")
    assert url == "https://huggingface.co/me/gemma-no-gambling"
    kinds = [call[0] for call in fake_hub.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1] == {"repo_id": "me/gemma-no-gambling", "repo_type": "model", "private": True,
                                    "exist_ok": True}
    assert fake_hub.calls[2][1]["folder_path"] == str(model)


def test_push_refuses_bad_ids_missing_cards_and_leaks(tmp_path, fake_hub):
    with pytest.raises(ObliviateError, match="not a repository id"):
        mc.push_to_hub(tmp_path, "no-owner")
    with pytest.raises(ObliviateError, match="no README.md"):
        mc.push_to_hub(tmp_path, "me/x")
    mc.write_model_card(tmp_path, results())
    (tmp_path / "results.json").write_text(json.dumps({"leak_check": {"passed": False}}))
    with pytest.raises(ObliviateError, match="failed leak check"):
        mc.push_to_hub(tmp_path, "me/x")
    assert fake_hub.calls == []  # nothing reached the Hub

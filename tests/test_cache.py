"""The original model's results cache (evaluation/cache.py): a repeat on the same weights,
data and settings runs nothing of the original and gives the same numbers as no cache;
another weight, setting or question is a miss; --no-cache reads and writes nothing."""
from dataclasses import replace

import pytest
import torch

from obliviate.config import EvalConfig, RunConfig
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.errors import ObliviateError
from obliviate.evaluation import cache
from obliviate.evaluation.cache import OriginalCache, results_dir, weights_fingerprint
from obliviate.io import load_tensors, save_tensors
from obliviate.evaluation.evaluator import Evaluator
from obliviate.pipeline.erase import config_fingerprint

from conftest import same_outcome

CONFIG = EvalConfig(scoring="loglik", coherence_new_tokens=5, bootstrap=20)


@pytest.fixture
def concept(small_concept):
    small_concept.general_prompts = {"train": ["The weather today", "Question: Who won?\nAnswer:"], "test": ["In 1990 the"]}
    return small_concept


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    monkeypatch.setenv("OBLIVIATE_RESULTS_CACHE", str(folder))
    return folder


class ForwardCounter:
    """Counts forward passes of a model (every model call of the original's work goes through one)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def close(self):
        self.handle.remove()


def edit_for(lm, count=12, scale=5.0, seed=0) -> EmbeddingPatch:
    weight = lm.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, weight.shape[0], (count,), generator=generator)
    rows = weight[tokens].detach().clone()
    return EmbeddingPatch(token_ids=tokens, original_rows=rows,
                          edited_rows=rows + scale * torch.randn(rows.shape, generator=generator), metadata={})


def run_twice(lm, concept, config=CONFIG, edit=None):
    first = Evaluator(lm, concept, config).evaluate("train", edit)
    counter = ForwardCounter(lm.model)
    evaluator = Evaluator(lm, concept, config)
    base = {name: evaluator._prepared_set("train", name) for name in evaluator.question_sets("train")}
    refs = {kind: evaluator.prompt_set("train", kind) for kind in evaluator.prompts("train")}
    original_calls = counter.calls
    second = evaluator.evaluate("train", edit)
    counter.close()
    return first, second, original_calls, evaluator, (base, refs)


def test_a_repeat_runs_nothing_of_the_original_and_gives_the_same_numbers(tiny_lm, concept, cache_folder):
    first, second, original_calls, evaluator, _ = run_twice(tiny_lm, concept, edit=edit_for(tiny_lm))
    assert original_calls == 0 and not evaluator.cache.misses
    assert set(evaluator.cache.hits) == {"option_scores", "coherence_set", "output_states"}  # tiny_lm is tied
    same_outcome(first, second)
    uncached = Evaluator(tiny_lm, concept, replace(CONFIG, cache=False)).evaluate("train", edit_for(tiny_lm))
    same_outcome(first, uncached)


def test_tied_output_states_are_kept_too(tiny_lm, concept, cache_folder):
    """A tied model's edit corrects untouched questions from the original's output states:
    those come from the cache on a repeat, with the same numbers."""
    edit = edit_for(tiny_lm, count=4)
    Evaluator(tiny_lm, concept, CONFIG).evaluate("train", edit)
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    evaluator.evaluate("train", edit)
    assert "output_states" in evaluator.cache.hits and not evaluator.cache.misses
    uncached = Evaluator(tiny_lm, concept, replace(CONFIG, cache=False)).evaluate("train", edit)
    same_outcome(evaluator.evaluate("train", edit), uncached)


def test_one_changed_weight_is_a_miss(tiny_lm, concept, cache_folder):
    Evaluator(tiny_lm, concept, CONFIG).evaluate("train", None)
    with torch.no_grad():
        tiny_lm.model.model.layers[2].mlp.down_proj.weight[3, 7] += 1e-6
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    evaluator.evaluate("train", None)
    assert not evaluator.cache.hits and evaluator.cache.misses


@pytest.mark.parametrize("change", [dict(coherence_new_tokens=6), dict(batch_tokens=64)])
def test_one_changed_setting_is_a_miss(tiny_lm, concept, cache_folder, change):
    Evaluator(tiny_lm, concept, CONFIG).evaluate("train", None)
    evaluator = Evaluator(tiny_lm, concept, replace(CONFIG, **change))
    evaluator.evaluate("train", None)
    changed = {"coherence_new_tokens": {"coherence_set"}, "batch_tokens": {"option_scores", "coherence_set"}}
    assert changed[next(iter(change))] <= set(evaluator.cache.misses)
    assert not changed[next(iter(change))] & set(evaluator.cache.hits)


def test_a_setting_that_does_not_move_the_original_still_hits(tiny_lm, concept, cache_folder):
    Evaluator(tiny_lm, concept, CONFIG).evaluate("train", None)
    evaluator = Evaluator(tiny_lm, concept, replace(CONFIG, bootstrap=30, coherence_gate=0.5))
    evaluator.evaluate("train", None)
    assert evaluator.cache.hits and not evaluator.cache.misses


def test_one_changed_question_is_a_miss_for_its_set_only(tiny_lm, concept, cache_folder):
    Evaluator(tiny_lm, concept, CONFIG).evaluate("train", None)
    question = concept.questions["qa_train"][0]
    concept.questions["qa_train"][0] = replace(question, question=question.question + " really?")
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    evaluator.evaluate("train", None)
    assert evaluator.cache.misses == ["option_scores"]  # qa; simdom, general and the prompts hit


def test_the_seed_is_in_the_key(tiny_lm, concept, cache_folder):
    Evaluator(tiny_lm, concept, CONFIG, seed=42).evaluate("train", None)
    evaluator = Evaluator(tiny_lm, concept, CONFIG, seed=7)  # another shuffle of the options
    evaluator.evaluate("train", None)
    assert evaluator.cache.misses.count("option_scores") == len(evaluator.question_sets("train"))


def test_no_cache_reads_and_writes_nothing(tiny_lm, concept, cache_folder):
    evaluator = Evaluator(tiny_lm, concept, replace(CONFIG, cache=False))
    evaluator.evaluate("train", edit_for(tiny_lm))
    assert not cache_folder.exists() and not evaluator.cache.hits and not evaluator.cache.misses


def test_a_damaged_entry_is_a_miss_and_is_rewritten(tiny_lm, concept, cache_folder):
    expected = Evaluator(tiny_lm, concept, CONFIG).evaluate("train", None)
    for entry in cache_folder.rglob("*.safetensors"):
        entry.write_bytes(b"not a safetensors file")
    evaluator = Evaluator(tiny_lm, concept, CONFIG)
    same_outcome(expected, evaluator.evaluate("train", None))
    assert evaluator.cache.misses and not evaluator.cache.hits
    again = Evaluator(tiny_lm, concept, CONFIG)
    again.evaluate("train", None)
    assert again.cache.hits and not again.cache.misses


def encode_values(values):
    return {"values": torch.tensor(values, dtype=torch.float64)}, {}


def decode_values(tensors, _):
    return tensors["values"].tolist()


@pytest.mark.parametrize("error", [KeyError, ValueError, RuntimeError, TypeError])
def test_a_decoder_bug_raises_instead_of_being_a_silent_miss(tiny_lm, cache_folder, error):
    computed = []

    def compute():
        computed.append(1)
        return [1.0, 2.0]

    assert OriginalCache(tiny_lm).fetch("values", [1], compute, encode_values, decode_values) == [1.0, 2.0]
    assert computed == [1]

    def buggy(tensors, extra):
        raise error("decoder bug")

    again = OriginalCache(tiny_lm)
    with pytest.raises(error, match="decoder bug"):
        again.fetch("values", [1], compute, encode_values, buggy)
    assert computed == [1] and again.hits == ["values"] and not again.misses  # read, not recomputed
    assert OriginalCache(tiny_lm).fetch("values", [1], compute, encode_values, decode_values) == [1.0, 2.0]


def test_an_entry_of_another_format_is_a_miss_and_is_replaced(tiny_lm, cache_folder, monkeypatch):
    first = OriginalCache(tiny_lm)
    assert first.fetch_json("values", [1], lambda: [1, 2]) == [1, 2]
    (entry,) = cache_folder.rglob("*.safetensors")
    assert load_tensors(entry, "test")[1]["format"] == str(cache.FORMAT)
    monkeypatch.setattr(cache, "FORMAT", cache.FORMAT + 1)  # the layout changed since the entry was written
    newer = OriginalCache(tiny_lm)
    assert newer.path(newer.key("values", [1])) == entry  # the same entry: its format is checked, not hashed
    assert newer.fetch_json("values", [1], lambda: [3]) == [3]
    assert newer.misses == ["values"] and not newer.hits
    assert list(cache_folder.rglob("*.safetensors")) == [entry]  # replaced in place
    assert load_tensors(entry, "test")[1]["format"] == str(cache.FORMAT)
    latest = OriginalCache(tiny_lm)
    assert latest.fetch_json("values", [1], lambda: pytest.fail("recomputed")) == [3]
    assert latest.hits == ["values"] and not latest.misses


def test_an_entry_written_before_formats_were_stored_is_a_miss(tiny_lm, cache_folder):
    old = OriginalCache(tiny_lm)
    key = old.key("values", [1])
    save_tensors(old.path(key), {}, {"key": key, "kind": "values", "extra": '{"value": [1, 2]}'})  # no "format"
    assert old.fetch_json("values", [1], lambda: [5]) == [5]
    assert old.misses == ["values"] and not old.hits


def test_only_a_damaged_file_is_an_unreadable_entry(tmp_path, monkeypatch):
    """load_tensors names a damaged file; an error of its own (a bug) is not disguised as one."""
    path = tmp_path / "entry.safetensors"
    save_tensors(path, {"a": torch.ones(2)}, {"key": "k"})
    assert load_tensors(path, "test")[1] == {"key": "k"}
    path.write_bytes(path.read_bytes()[:-4])  # truncated
    with pytest.raises(ObliviateError, match="is not a readable safetensors file"):
        load_tensors(path, "test")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(path), metadata={"obliviate": "[1, 2]"})  # metadata not an object
    with pytest.raises(ObliviateError, match="not a JSON object|not an object"):
        load_tensors(path, "test")
    save_tensors(path, {"a": torch.ones(2)}, {"key": "k"})
    import safetensors.torch

    def bug(*args, **kwargs):
        raise AttributeError("a bug in the reader")

    monkeypatch.setattr(safetensors.torch, "load_file", bug)
    with pytest.raises(AttributeError, match="a bug in the reader"):
        load_tensors(path, "test")


def test_the_folder_and_the_fingerprint(tiny_lm, cache_folder):
    assert results_dir() == cache_folder
    before = weights_fingerprint(tiny_lm.model)
    assert before == weights_fingerprint(tiny_lm.model)
    with torch.no_grad():
        tiny_lm.model.get_input_embeddings().weight[10, 0] *= -1
    assert weights_fingerprint(tiny_lm.model) != before
    assert OriginalCache(tiny_lm, enabled=True).key("x", [1]) != OriginalCache(tiny_lm, enabled=True).key("x", [2])


def test_untying_the_output_layer_keeps_the_key_and_changing_it_does_not(tiny_tokenizer):
    """`erase` opens the cache on the tied original and `eval` after untying it: the same
    function, so the same key; the untied output layer's own bytes are still in it."""
    from conftest import make_tiny_lm
    from obliviate.models.loading import untie_output_embeddings

    lm = make_tiny_lm(tiny_tokenizer, tie=True)
    tied = weights_fingerprint(lm.model)
    assert untie_output_embeddings(lm.model) and lm.model.config.tie_word_embeddings is False
    assert weights_fingerprint(lm.model) == tied
    with torch.no_grad():
        lm.model.get_output_embeddings().weight[3, 1] += 1.0
    assert weights_fingerprint(lm.model) != tied
    assert weights_fingerprint(make_tiny_lm(tiny_tokenizer, tie=False).model) != tied  # other weights


def test_no_cache_does_not_change_the_run_it_belongs_to():
    """--no-cache says where the original's numbers come from, not what they are: a run
    resumed with it is the same run."""
    config = RunConfig(concept="Golf")
    assert config_fingerprint(config) == config_fingerprint(replace(config, evaluation=replace(config.evaluation,
                                                                                                cache=False)))


def test_the_original_relearning_curve_is_run_once(tiny_tokenizer, small_concept, data_dir, tmp_path, cache_folder,
                                                   monkeypatch):
    from conftest import make_tiny_lm
    from obliviate.attacks import relearning
    from obliviate.attacks.common import AttackContext

    config = relearning.Config(paragraphs=2, epochs=1, max_length=16)
    runs, plain = [], relearning.relearn
    monkeypatch.setattr(relearning, "relearn", lambda lm, *a, **k: runs.append(k.get("role", a[-1])) or plain(lm, *a, **k))

    def attack(out, cache=True):
        models = {"original": make_tiny_lm(tiny_tokenizer, seed=0), "erased": make_tiny_lm(tiny_tokenizer, seed=1)}
        ctx = AttackContext(models=models, data=small_concept, data_dir=data_dir, bootstrap=20, out=tmp_path / out,
                            progress=False, options={"cache": cache})
        return relearning.run(ctx, config)

    first = attack("a")
    assert runs == ["original", "erased"]
    second = attack("b")
    assert runs[2:] == ["erased"]  # the original's curve came from the cache
    third = attack("c", cache=False)
    assert runs[3:] == ["original", "erased"]
    for result in (second, third):
        for key in ("before", "after", "curve", "curve_correct", "losses"):
            assert result["original"][key] == first["original"][key], key
        assert result["recovered_frac"] == first["recovered_frac"]


def test_the_original_repair_relearn_curve_is_run_once(tiny_tokenizer, small_concept, data_dir, tmp_path, cache_folder,
                                                       monkeypatch):
    """repair-relearn on the ORIGINAL model depends on nothing the erasure did: a second
    erased model of the concept reuses it (same numbers), and per-question answers are kept."""
    from conftest import make_tiny_lm
    from obliviate.attacks import white_box
    from obliviate.attacks.common import AttackContext

    runs, plain = [], white_box.relearn
    monkeypatch.setattr(white_box, "relearn", lambda lm, *a, **k: runs.append(a[-1]) or plain(lm, *a, **k))
    config = white_box.RepairRelearnConfig(paragraphs=2, epochs=1, max_length=16)

    def attack(out, erased_seed):
        models = {"original": make_tiny_lm(tiny_tokenizer, seed=0), "erased": make_tiny_lm(tiny_tokenizer, seed=erased_seed)}
        ctx = AttackContext(models=models, data=small_concept, data_dir=data_dir, bootstrap=20, out=tmp_path / out,
                            progress=False)
        return white_box.run_repair_relearn(ctx, config)

    first = attack("a", 1)
    assert runs == ["original", "erased"]
    second = attack("b", 2)
    assert runs[2:] == ["erased"]
    assert first["original"] == second["original"]
    assert len(first["erased"]["curve_correct"]) == 3 == len(first["erased"]["curve"])
    assert first["erased"]["curve_correct"][0] == first["erased"]["correct_before"]
    assert first["erased"]["correct_after"] == first["erased"]["curve_correct"][-1]

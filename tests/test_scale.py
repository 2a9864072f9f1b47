"""Device, dtype and device-map plumbing, tested without a GPU: tiny models on the CPU,
the paper's real model shapes on the "meta" device, fake multi-GPU memory layouts."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from obliviate.models import memory as scale
from obliviate.config import load_yaml, run_config_from_dict
from obliviate.errors import ObliviateError
from obliviate.evaluation.scoring import CPU_BATCH_TOKENS, Batching, continuation_logprobs
from obliviate.methods import ember
from obliviate.models.loading import load_model, placement

from conftest import REPO, make_tiny_lm

GiB = 2**30
CONFIGS = REPO / "configs" / "ember"

# The paper's models, from their published config.json files (shapes only).
LLAMA_3_1_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
)
GEMMA_2_2B = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
)


def meta_model(spec: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(spec)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


# ---- shipped configs -------------------------------------------------------------------

EXPECTED = {
    "embedded.yaml": ("embedded", 100, None),
    "gemma-2-2b-it.yaml": ("google/gemma-2-2b-it", 100, None),
    "llama-3.1-8b-instruct.yaml": ("meta-llama/Llama-3.1-8B-Instruct", 200, "auto"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_parses_with_the_paper_settings(name):
    config = run_config_from_dict(load_yaml(CONFIGS / name), name)
    model, k, device_map = EXPECTED[name]
    assert config.model.name == model
    assert config.ember.k == k
    assert config.model.device_map == device_map
    assert config.ember.delta_grid == (0.5, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 200.0)
    assert config.ember.reg == pytest.approx(1e-4) and config.ember.sparsity == pytest.approx(0.01)
    assert config.ember.factorize_on == "cpu" and config.seed == 42
    if name != "embedded.yaml":  # the paper's protocol for instruct models
        assert config.evaluation.scoring == "letter"
        assert config.ember.selection == "reference" and config.ember.ratio_threshold == 2.0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_opens_with_the_command_that_runs_it(name):
    from obliviate.api import make_config
    from obliviate.cli import build_parser
    from obliviate.commands.arguments import collect_overrides

    first = (CONFIGS / name).read_text().splitlines()[0]
    assert first.startswith("# obliviate erase ")
    argv = shlex.split(first[2:])[1:]
    args = build_parser("erase").parse_args(argv)
    assert Path(args.config_file) == Path("configs/ember") / name
    config = make_config(REPO / args.config_file, **collect_overrides(args))
    assert config.concept == "Harry Potter"
    assert config.data.data == "../shared/data/ember-benchmark"
    assert config.ember.k == EXPECTED[name][1]


# ---- device and dtype ------------------------------------------------------------------

def test_placement_defaults_follow_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement("auto", None, None) == (torch.device("cpu"), torch.float32)
    assert placement("cpu", "bfloat16", None) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ObliviateError, match="no CUDA GPU"):
        placement("cuda", None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement("auto", None, None) == (torch.device("cuda"), torch.bfloat16)
    assert placement("cuda:1", "float16", None) == (torch.device("cuda:1"), torch.float16)
    # --device-map auto alone (device left at its default "cpu") must still give bf16 on GPUs.
    assert placement("cpu", None, "auto")[1] == torch.bfloat16
    assert placement("cpu", None, None)[1] == torch.float32


def test_loaded_model_takes_the_requested_dtype(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.device == torch.device("cpu")
    assert scale.model_devices(lm.model) == {torch.device("cpu")}
    ids = lm.tokenizer("Harry went to Hogwarts").input_ids
    scores = continuation_logprobs(lm, [(ids[:3], ids[3:])])
    assert scores.dtype == torch.float64 and bool(torch.isfinite(scores).all())


def test_loaded_model_is_float32_on_the_cpu_by_default(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}


def test_device_map_auto_without_gpus_keeps_every_weight_on_the_cpu(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = load_model(str(tiny_model_dir), device="cpu", device_map="auto")
    assert scale.model_devices(lm.model) == {torch.device("cpu")}
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}


def test_model_devices_sees_every_device():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    assert scale.model_devices(model) == {torch.device("cpu"), torch.device("meta")}


def test_ember_edit_of_a_bfloat16_model_writes_bfloat16_rows(tiny_tokenizer, small_concept):
    lm = make_tiny_lm(tiny_tokenizer, "llama")
    lm.model.to(torch.bfloat16)
    config = ember.Config(k=20, ratio_threshold=1.0)
    fit = ember.fit(lm, small_concept, config)
    assert fit.factorization.F.device.type == "cpu" and fit.factorization.F.dtype == torch.float32
    assert fit.original_rows.dtype == torch.bfloat16 and fit.contributions.dtype == torch.float64
    patch = fit.patch(50.0)
    assert patch.edited_rows.dtype == torch.bfloat16 and len(patch.changed_token_ids()) > 0
    weight = lm.model.get_input_embeddings().weight
    untouched = torch.ones(weight.shape[0], dtype=torch.bool)
    untouched[patch.token_ids] = False
    before = weight.detach().clone()
    patch.apply(lm.model)
    assert torch.equal(weight[patch.token_ids], patch.edited_rows)
    assert torch.equal(weight[untouched], before[untouched])


def test_factorize_on_model_matches_cpu_and_bad_values_are_refused(tiny_lm, small_concept):
    with pytest.raises(ObliviateError, match="factorize_on"):
        ember.Config(factorize_on="gpu")
    on_cpu = ember.fit(tiny_lm, small_concept, ember.Config(k=8, max_iterations=20, factorize_on="cpu"))
    on_model = ember.fit(tiny_lm, small_concept, ember.Config(k=8, max_iterations=20, factorize_on="model"))
    assert torch.equal(on_cpu.factorization.G, on_model.factorization.G)
    assert torch.equal(on_cpu.token_ids, on_model.token_ids)


# ---- batch sizes and memory -------------------------------------------------------------

def test_batch_tokens_scale_with_free_memory_and_dtype():
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in LLAMA_3_1_8B.items() if k != "model_type"})
    per_token = 12 * 4096 * 32 * 2
    assert scale.per_token_activation_bytes(config, torch.bfloat16) == per_token
    assert scale.batch_tokens_for(config, 40 * GiB) == int(40 * GiB * 0.5 // per_token)
    assert scale.batch_tokens_for(config, 40 * GiB, torch.float32) == int(40 * GiB * 0.5 // (2 * per_token))
    assert scale.batch_tokens_for(config, 1 * GiB) == scale.MIN_BATCH_TOKENS
    assert scale.batch_tokens_for(config, 10**15) == scale.MAX_BATCH_TOKENS


def test_batch_tokens_read_the_text_config_of_a_multimodal_model():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config=dict(hidden_size=2560, num_hidden_layers=34))
    assert scale.per_token_activation_bytes(config) == 12 * 2560 * 34 * 2


def test_batching_on_the_cpu_uses_the_fixed_budget_unless_overridden(tiny_lm):
    assert scale.auto_batch_tokens(tiny_lm.model) is None
    assert Batching().budget(tiny_lm) == CPU_BATCH_TOKENS
    assert Batching(300).budget(tiny_lm) == 300


def test_batching_sizes_to_the_tightest_gpu_of_a_device_map(tiny_lm, monkeypatch):
    free = {0: 30 * GiB, 1: 8 * GiB}
    monkeypatch.setattr(scale, "model_devices", lambda model: {torch.device("cuda:0"), torch.device("cuda:1")})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 80 * GiB))
    expected = scale.batch_tokens_for(tiny_lm.model.config, 8 * GiB, torch.float32)
    assert Batching().budget(tiny_lm) == expected
    assert expected > CPU_BATCH_TOKENS


def test_llama_8b_erase_fits_one_80gb_gpu():
    model = meta_model(LLAMA_3_1_8B)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=0.005)
    estimate = scale.erase_memory_estimate(model, free_bytes=79 * GiB)
    assert estimate.weights == pytest.approx(16.06e9, rel=0.005)
    assert estimate.untied_output == 0  # Llama-3.1-8B does not tie its embeddings
    assert estimate.fingerprints == 128256 * 4096 * 8
    assert estimate.total < 79 * GiB


def test_gemma_2_2b_tied_output_copy_is_counted():
    model = meta_model(GEMMA_2_2B)
    estimate = scale.erase_memory_estimate(model, free_bytes=79 * GiB)
    assert estimate.untied_output == 256000 * 2304 * 2
    assert estimate.weights == pytest.approx(2 * 2.61e9, rel=0.01)


def test_peak_memory_on_the_cpu_sees_a_large_allocation():
    with scale.measure("cpu") as record:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert record.added >= 48 * 2**20, (record.start, record.peak)
    assert record.seconds >= 0


# ---- device maps over fake GPUs -----------------------------------------------------------

def _bytes_by_device(model, device_map, dtype=torch.bfloat16) -> dict:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    totals: dict = {}
    for module, device in device_map.items():
        totals[device] = totals.get(device, 0) + sizes[module]
    return totals


def test_llama_8b_is_split_over_two_fake_gpus_without_splitting_layers():
    model = meta_model(LLAMA_3_1_8B)
    limits = {0: 12 * GiB, 1: 12 * GiB, "cpu": 64 * GiB}
    device_map = scale.plan_device_map(model, limits, dtype=torch.bfloat16)
    assert set(device_map.values()) == {0, 1}  # nothing offloaded to the CPU
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1
    layers = [device_map[f"model.layers.{i}"] for i in range(32)]  # whole layers only
    assert layers == sorted(layers) and 10 <= layers.count(0) <= 22
    for device, used in _bytes_by_device(model, device_map).items():
        assert used <= limits[device]


def test_llama_8b_stays_on_one_80gb_gpu():
    model = meta_model(LLAMA_3_1_8B)
    device_map = scale.plan_device_map(model, {0: 80 * GiB, "cpu": 64 * GiB}, dtype=torch.bfloat16)
    assert set(device_map.values()) == {0}


def test_too_little_gpu_memory_offloads_to_the_cpu():
    model = meta_model(LLAMA_3_1_8B)
    device_map = scale.plan_device_map(model, {0: 6 * GiB, 1: 6 * GiB, "cpu": 64 * GiB}, dtype=torch.bfloat16)
    assert "cpu" in set(device_map.values())
    used = _bytes_by_device(model, device_map)
    assert used[0] <= 6 * GiB and used[1] <= 6 * GiB


def test_tied_embeddings_are_planned_onto_one_device_and_layers_spread(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer, "gemma3", tie=True)  # embeddings 192 kB, layers 37.5 kB each
    limits = {0: 300_000, 1: 300_000, "cpu": 10**8}
    device_map = scale.plan_device_map(lm.model, limits)
    assert device_map["model.embed_tokens"] == device_map["lm_head"] == 0  # tied: one device
    layers = [device_map[f"model.layers.{i}"] for i in range(4)]
    assert set(layers) == {0, 1} and layers == sorted(layers)
    assert "cpu" not in device_map.values()  # balancing must not offload what packing fits
    for device, used in _bytes_by_device(lm.model, device_map, torch.float32).items():
        assert used <= limits[device]


def test_cli_exposes_device_map_and_batch_override():
    from obliviate.api import make_config
    from obliviate.cli import build_parser
    from obliviate.commands.arguments import collect_overrides

    args = build_parser("erase").parse_args(
        ["erase", "--device-map", "auto", "--batch-tokens", "4096", "--dtype", "bfloat16", "--factorize-on", "model"])
    config = make_config(None, **collect_overrides(args))
    assert config.model.device_map == "auto" and config.model.dtype == "bfloat16"
    assert config.evaluation.batch_tokens == 4096 and config.ember.factorize_on == "model"


def test_bench_flop_model_matches_the_real_parameter_count():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import bench_scale

    model = meta_model(LLAMA_3_1_8B)
    head = model.get_output_embeddings().weight.numel()
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    # One token, no attention context, no vocabulary head: 2 FLOPs per block weight.
    assert bench_scale.forward_flops("llama-3.1-8b", 32, 0, tokens=1, seq_len=0, logit_positions=0) == 2 * blocks
    assert bench_scale.forward_flops("llama-3.1-8b", 0, 128256, 0, 0, logit_positions=1) == 2 * head
    assert bench_scale.REAL_CONFIGS["llama-3.1-8b"]["vocab_size"] == LLAMA_3_1_8B["vocab_size"]


def test_bench_plans_the_8b_relearning_attack_per_optimizer_for_1_2_4_gpus():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import bench_scale
    from obliviate.training import optim

    rows = bench_scale.relearn_plan_rows("llama-3.1-8b")
    assert [r.stage for r in rows] == [f"plan: relearning attack, {name}" for name in optim.SPECS]
    by_name = {r.stage.rsplit(" ", 1)[-1]: r for r in rows}
    assert by_name["adamw-fp32"].peak > 2 * by_name["adamw8bit"].peak  # 16 vs 6 bytes a parameter, plus activations
    assert all("2 GPUs" in r.note and "4 GPUs" in r.note for r in rows)
    # no second copy of the model any more: below the old estimate with a copy
    assert by_name["adamw"].peak < bench_scale.relearn_memory_row("llama-3.1-8b").peak

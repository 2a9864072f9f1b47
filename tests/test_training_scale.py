"""Training at the paper's sizes, tested on the CPU (issue 18): the optimizer choices and
their bf16 update fidelity, the memory plan and its refusal, the relearning attack without
a second copy of the model, and two processes (FSDP2 over gloo) against one."""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from obliviate.attacks import relearning
from obliviate.errors import ObliviateError
from obliviate.training import memory_plan as memory
from obliviate.settings import build_section
from obliviate.training import optim
from obliviate.training.loop import LoopConfig, TrainingJob, logits, train
from obliviate.training import losses

from conftest import REPO, make_tiny_lm
from test_scale import GEMMA_2_2B, LLAMA_3_1_8B, meta_model

GiB = 2**30
HAS_TORCHAO = optim.SPECS["adamw-sr"].available()
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install -e '.[gpu]')")

FORGET = ["Casinos offer poker, roulette and slot machines.", "Betting on horses is a form of gambling.",
          "A croupier deals cards at the blackjack table.", "Lottery tickets are sold at kiosks."]
RETAIN = ["The river flows through the valley to the sea.", "Bread is baked in an oven at high heat.",
          "The library opens at nine in the morning.", "Birds build nests in the spring."]


def lm_step(model):
    def step(forget, retain):
        f = losses.causal_lm_loss(logits(model, forget), forget.input_ids, forget.attention_mask)
        r = losses.causal_lm_loss(logits(model, retain), retain.input_ids, retain.attention_mask)
        return r - 0.1 * f, {"forget": f.detach()}
    return step


def mlp(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".mlp." in n}


# ---- the choice reaches every trained method and the attack ---------------------------

def test_optimizer_is_a_setting_of_the_loop_and_of_the_relearning_attack():
    from obliviate.methods.rmu import Config as RmuConfig

    assert LoopConfig().optimizer == "auto" and relearning.Config().optimizer == "auto"
    assert build_section(RmuConfig, {"optimizer": "adamw8bit"}, "rmu").optimizer == "adamw8bit"
    assert build_section(relearning.Config, {"optimizer": "adamw-fp32"}, "relearn").optimizer == "adamw-fp32"
    assert build_section(relearning.Config, {"gradient_checkpointing": "true"}, "relearn").gradient_checkpointing == "on"
    with pytest.raises(ObliviateError, match="optimizer must be one of auto, adamw, adamw-fp32"):
        LoopConfig(optimizer="sgd")
    with pytest.raises(ObliviateError, match="gradient_checkpointing must be auto, on or off"):
        relearning.Config(gradient_checkpointing="sometimes")


def test_auto_keeps_plain_adamw_for_fp32_weights_and_picks_by_memory_for_bf16():
    assert optim.resolve_optimizer("auto", torch.float32) == "adamw"
    assert optim.resolve_optimizer("auto", torch.bfloat16) == "adamw-fp32"
    if HAS_TORCHAO:
        assert optim.resolve_optimizer("auto", torch.bfloat16, lambda n: n != "adamw-fp32") == "adamw-sr"
        assert optim.resolve_optimizer("auto", torch.bfloat16, lambda n: n == "adamw8bit") == "adamw8bit"
    optimizer = optim.make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(4))], 1e-3, 0.0)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_default_training_on_fp32_gives_the_same_weights_as_plain_adamw(tiny_tokenizer):
    trained = []
    for choice in ("auto", "adamw"):
        lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
        params = mlp(lm.model)
        log = train(TrainingJob(lm.model, tiny_tokenizer, params, lm_step(lm.model), FORGET, RETAIN,
                                LoopConfig(steps=3, optimizer=choice).settings(1e-3, 5)), progress=False)
        assert log.optimizer == "adamw" and "memory plan (adamw" in log.memory_plan
        trained.append({n: p.detach().clone() for n, p in params.items()})
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])


# ---- bf16 update fidelity (the bench's probe) ------------------------------------------

def test_plain_bf16_adamw_rounds_most_small_updates_away_and_fp32_master_weights_keep_them():
    plain = optim.update_probe("adamw", steps=1, size=256)
    assert 0.10 < plain["share_changed"] < 0.25  # measured 16% at 1024 x 1024 (bench)
    assert optim.update_probe("adamw", steps=30, size=256)["update_kept"] < 0.2
    master = optim.update_probe("adamw-fp32", steps=30, size=256)
    assert master["update_kept"] > 0.9 and master["share_changed"] > 0.5


@needs_torchao
def test_stochastic_rounding_keeps_small_bf16_updates_in_expectation():
    for name in ("adamw-sr", "adamw8bit"):
        one = optim.update_probe(name, steps=1, size=128)
        assert one["share_changed"] > 0.2 and abs(one["update_kept"] - 1) < 0.1  # unbiased from the first step
        many = optim.update_probe(name, steps=20, size=128)
        assert many["share_changed"] > 0.4 and abs(many["update_kept"] - 1) < 0.05


def test_fp32_master_weights_track_fp32_training_of_a_bf16_model(tiny_tokenizer):
    """A tiny model at lr 1e-5: trained in bf16 with fp32 master weights, its update matches
    the fp32 model's; pure-bf16 AdamW loses most of it."""
    def trained_update(dtype, choice):
        lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
        lm.model.to(dtype)
        params = mlp(lm.model)
        start = {n: p.detach().float().clone() for n, p in params.items()}
        train(TrainingJob(lm.model, tiny_tokenizer, params, lm_step(lm.model), FORGET, RETAIN,
                          LoopConfig(steps=8, optimizer=choice).settings(1e-5, 5)), progress=False)
        assert all(p.dtype == dtype for p in params.values())  # rounded back after training
        return torch.cat([(p.detach().float() - start[n]).flatten() for n, p in params.items()])

    reference = trained_update(torch.float32, "adamw")
    kept = lambda update: float(update @ reference / (reference @ reference))  # noqa: E731
    assert kept(trained_update(torch.bfloat16, "adamw")) < 0.3
    assert kept(trained_update(torch.bfloat16, "adamw-fp32")) > 0.7


# ---- memory plan ---------------------------------------------------------------------

def test_plan_counts_bytes_per_trained_parameter_for_each_optimizer():
    model = meta_model(LLAMA_3_1_8B)
    n = sum(p.numel() for p in model.parameters())
    assert n == 8_030_261_248
    expect = {"adamw": (2, 2, 4), "adamw-fp32": (4, 4, 8), "adamw-sr": (2, 2, 4), "adamw8bit": (2, 2, 2)}
    for name, (w, g, s) in expect.items():
        plan = memory.plan_training(model, None, name, batch=1, length=256)
        assert (plan.weights, plan.grads, plan.optimizer_state) == (w * n, g * n, s * n)
    # RMU-like: a few trained matrices: grads and state only for those
    rmu = [model.model.layers[i].mlp.down_proj.weight for i in range(6, 9)]
    plan = memory.plan_training(model, rmu, "adamw", batch=4, length=512, sequences=2, head=False)
    assert plan.grads == 2 * 3 * 4096 * 14336 and plan.logits == 0


def test_llama_8b_relearning_plan_per_gpu_for_1_2_4_gpus():
    model = meta_model(LLAMA_3_1_8B)
    budget = int(80 * 10**9 * memory.DEVICE_HEADROOM)
    totals = {}
    for devices in (1, 2, 4):
        plan = memory.plan_training(model, None, "adamw-fp32", 1, 256, devices=devices, sharded=devices > 1, budget=budget)
        totals[devices] = plan.total
    assert totals[1] > 128 * 10**9 > budget > totals[2] > totals[4]  # fp32 master weights: 2 GPUs
    assert totals[4] < 40 * 10**9
    eight_bit = memory.plan_training(model, None, "adamw8bit", 1, 256, budget=budget)
    # the 8-bit AdamW: one GPU (measured on an H200: 49.1 GiB peak, planned 49.9)
    assert eight_bit.fits and 45 * GiB < eight_bit.total < 52 * GiB
    assert eight_bit.optimizer_transient == 6 * 128256 * 4096  # its largest tensor's moments in fp32
    # No second copy of the model any more: even plain bf16 AdamW fits one GPU (but rounds updates away).
    assert memory.plan_training(model, None, "adamw", 1, 256, budget=budget).fits


def test_a_plan_that_cannot_fit_is_refused_with_the_settings_that_would():
    model = meta_model(LLAMA_3_1_8B)
    budget = int(80 * 10**9 * memory.DEVICE_HEADROOM)
    plan = memory.plan_training(model, None, "adamw-fp32", 1, 256, budget=budget)
    assert not plan.fits
    with pytest.raises(ObliviateError) as err:
        memory.check_plan(plan, model, None, "relearn (erased)")
    message = str(err.value)
    assert "does not fit" in message and "weights 29.92 GiB" in message and "optimizer 59.83 GiB" in message
    if HAS_TORCHAO:
        assert "optimizer=adamw-sr; or optimizer=adamw8bit" in message
    assert "2 GPUs under accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2" in message


def test_gemma_2_2b_relearning_fits_one_gpu_with_fp32_master_weights():
    model = meta_model(GEMMA_2_2B)
    plan = memory.plan_training(model, None, "adamw-fp32", 1, 256, budget=int(80 * 10**9 * memory.DEVICE_HEADROOM))
    assert plan.fits and 40 * 10**9 < plan.total < 60 * 10**9


def test_training_refuses_before_the_first_step_when_the_plan_does_not_fit(tiny_tokenizer, monkeypatch):
    lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
    monkeypatch.setattr(memory, "device_budget", lambda model: 1000)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(ObliviateError, match="does not fit"):
        train(TrainingJob(lm.model, tiny_tokenizer, mlp(lm.model), lm_step(lm.model), FORGET, RETAIN,
                          LoopConfig(steps=2).settings(1e-3, 5)), progress=False)
    with pytest.raises(ObliviateError, match="does not fit"):
        relearning.relearn(lm, FORGET, relearning.Config(epochs=1), lambda m: np.zeros(1), progress=False)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_gradient_checkpointing_auto_turns_on_when_only_it_fits(tiny_tokenizer, monkeypatch):
    from obliviate.training.loop import plan_stage

    lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
    params = list(lm.model.parameters())
    without = memory.plan_training(lm.model, params, "adamw", 1, 256)
    with_it = memory.plan_training(lm.model, params, "adamw", 1, 256, gradient_checkpointing=True)
    assert with_it.activations < without.activations
    monkeypatch.setattr(memory, "device_budget", lambda model: (with_it.total + without.total) // 2)
    assert plan_stage(lm.model, params, "auto", "auto", 1, 256, 1, "x")[:2] == ("adamw", True)
    monkeypatch.setattr(memory, "device_budget", lambda model: None)
    assert plan_stage(lm.model, params, "auto", "auto", 1, 256, 1, "x")[:2] == ("adamw", False)


# ---- relearning without a second copy ----------------------------------------------------

def test_relearning_trains_the_model_in_place_and_restores_it(tiny_tokenizer, monkeypatch):
    lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    deepcopy = copy.deepcopy

    def no_model_copies(value, *args, **kwargs):
        if isinstance(value, torch.nn.Module):
            pytest.fail("relearning must not copy the model")
        return deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    seen = []

    def evaluate(m):
        seen.append((m is lm, float(m.model.model.layers[0].mlp.up_proj.weight.double().sum())))
        return np.zeros(2)

    epochs = relearning.relearn(lm, FORGET, relearning.Config(epochs=2, lr=1e-3, max_length=24), evaluate,
                                progress=False)
    assert [e["optimizer"] for e in epochs] == ["adamw", "adamw"] and not epochs[0]["gradient_checkpointing"]
    assert all(same for same, _ in seen)  # the caller's model itself, trained
    assert seen[0][1] != pytest.approx(float(before["model.layers.0.mlp.up_proj.weight"].double().sum()), abs=1e-9)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())  # restored bit for bit
    assert all(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_relearning_restores_the_model_after_an_error(tiny_tokenizer):
    lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    def evaluate(m):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        relearning.relearn(lm, FORGET, relearning.Config(epochs=1, lr=1e-2, max_length=24), evaluate, progress=False)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


# ---- several processes ------------------------------------------------------------------

def _run_script(out: Path, processes: int) -> dict:
    script = REPO / "tests" / "two_process_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(out)]
    if processes > 1:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_processes_give_the_same_losses_and_weights_as_one(tmp_path):
    """FSDP2 over gloo, two CPU processes: the shared loop (grad_accum 2: one micro-batch per
    process) and the relearning attack (batch 1: both processes run it, memory sharded)
    match one process: losses to 1e-6 relative, weights to 1e-6 absolute."""
    one = _run_script(tmp_path / "one.pt", 1)
    two = _run_script(tmp_path / "two.pt", 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    np.testing.assert_allclose(two["relearn_losses"], one["relearn_losses"], rtol=1e-6)
    np.testing.assert_allclose(two["relearn_eval"], one["relearn_eval"], rtol=1e-6)
    assert one["new"].keys() == two["new"].keys() and len(one["new"]) == 12  # 4 layers x (gate, up, down)
    for name in one["new"]:
        torch.testing.assert_close(two["new"][name], one["new"][name], atol=1e-6, rtol=0)
    assert one["restored"] and two["restored"]


@needs_torchao
def test_the_loop_trains_bf16_with_8bit_adamw_and_resumes_from_its_checkpoint(tiny_tokenizer, tmp_path):
    """torchao's AdamW8bit through the shared loop: bf16 weights stay bf16, the quantized
    moments (the embedding: >= 4096 values) survive a checkpoint, and an interrupted run
    resumes at its last checkpoint."""
    def run(fail_at: int | None):
        lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
        lm.model.to(torch.bfloat16)
        params = {n: p for n, p in lm.model.named_parameters() if n == "model.embed_tokens.weight" or ".mlp." in n}
        inner, calls = lm_step(lm.model), [0]

        def step(forget, retain):
            calls[0] += 1
            if calls[0] == fail_at:
                raise KeyboardInterrupt
            return inner(forget, retain)

        settings = LoopConfig(steps=4, checkpoint_every=2, optimizer="adamw8bit").settings(1e-3, 5)
        try:
            log = train(TrainingJob(lm.model, tiny_tokenizer, params, step, FORGET, RETAIN, settings), tmp_path / "ckpt", False)
        except KeyboardInterrupt:
            return None, params
        return log, params

    assert run(fail_at=4)[0] is None  # killed in step 4, after the checkpoint at step 2
    log, params = run(fail_at=None)
    assert log.resumed_from == 2 and log.optimizer == "adamw8bit" and len(log.losses) == 4
    assert all(p.dtype == torch.bfloat16 for p in params.values())


@needs_torchao
def test_8bit_optimizer_state_round_trips_through_a_checkpoint_file(tmp_path):
    def fresh():
        weight = torch.nn.Parameter(torch.linspace(-0.05, 0.05, 64 * 64).reshape(64, 64).to(torch.bfloat16))
        return weight, optim.make_optimizer("adamw8bit", [weight], 1e-3, 0.01)

    grad = torch.linspace(-1, 1, 64 * 64).reshape(64, 64).to(torch.bfloat16)
    weight, optimizer = fresh()
    weight.grad = grad
    optimizer.step()
    state = optimizer.state[weight]["exp_avg"]
    assert type(state).__name__ == "OptimState8bit"  # 4096 values: quantized
    torch.save({"optimizer": optimizer.state_dict(), "weight": weight.detach()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=False)  # as training/loop.py's _resume loads it
    other, resumed = fresh()
    with torch.no_grad():
        other.copy_(saved["weight"])
    resumed.load_state_dict(saved["optimizer"])
    assert torch.equal(resumed.state[other]["exp_avg"].dequantize(), state.dequantize())


def test_gradient_checkpointing_gives_the_same_relearning_curve(tiny_tokenizer):
    curves = {}
    for setting in ("off", "on"):
        lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
        epochs = relearning.relearn(lm, FORGET, relearning.Config(epochs=2, lr=1e-3, max_length=24,
                                                                  gradient_checkpointing=setting),
                                    lambda m: np.array([float(m.model.model.layers[1].mlp.up_proj.weight.double().sum())]),
                                    progress=False)
        assert [e["gradient_checkpointing"] for e in epochs] == [setting == "on"] * 2
        assert not lm.model.is_gradient_checkpointing if not hasattr(type(lm.model), "is_activation_checkpointing") \
            else not lm.model.is_activation_checkpointing  # switched off again afterwards
        curves[setting] = [e["loss"] for e in epochs] + [e["correct"][0] for e in epochs]
    np.testing.assert_allclose(curves["on"], curves["off"], rtol=1e-5)


def test_bf16_autocast_runs_the_products_in_bf16_over_float32_weights(tiny_tokenizer):
    """The loop and the relearning attack: weights and optimizer stay float32, the forward
    passes' products run in bf16 (the losses move by bf16 rounding, not more), and the
    relearning attack scores its epochs outside it (as the model was scored before)."""
    seen, trained = [], {}
    for setting in (False, True):
        lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
        params = mlp(lm.model)
        step = lm_step(lm.model)

        def recorded(forget, retain, step=step):
            seen.append((setting, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
            return step(forget, retain)

        log = train(TrainingJob(lm.model, tiny_tokenizer, params, recorded, FORGET, RETAIN,
                                LoopConfig(steps=3, bf16_autocast=setting).settings(1e-3, 5)), progress=False)
        assert all(p.dtype == torch.float32 for p in params.values())
        trained[setting] = [entry["loss"] for entry in log.losses]
    assert {s for s in seen if s[0]} == {(True, torch.bfloat16)} and {s for s in seen if not s[0]} == {(False, None)}
    np.testing.assert_allclose(trained[True], trained[False], rtol=0.05)
    assert trained[True] != trained[False]

    scored = []
    lm = make_tiny_lm(tiny_tokenizer, "llama", tie=False)
    relearning.relearn(lm, FORGET, relearning.Config(epochs=1, lr=1e-3, max_length=24, bf16_autocast=True),
                       lambda m: scored.append(torch.is_autocast_enabled("cpu")) or np.array([1.0]), progress=False)
    assert scored == [False]


# ---- lazy rows: AdamW on an untied embedding's sparse row gradients -----------------

def test_lazy_row_adamw_gives_torch_adamws_weights():
    """Rows that get a gradient late, rows that never do, and a settle in the middle."""
    from obliviate.training.sparse_rows import LazyRowAdamW

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(50, 8, generator=generator)
    dense, lazy = torch.nn.Embedding(50, 8), torch.nn.Embedding(50, 8, sparse=True)
    for module in (dense, lazy):
        module.weight.data.copy_(start)
    plain = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    ours = LazyRowAdamW(lazy.parameters(), lr=1e-2, weight_decay=0.1)
    batches = [[1, 2, 3], [3, 4], [10, 1], [4], [20, 21, 22], [1]]
    for step, rows in enumerate(batches):
        ids = torch.tensor(rows)
        target = torch.randn(len(rows), 8, generator=generator)
        ours.settle_rows(ids)  # what the embedding's pre-hook does (optimizer_for)
        for module, optimizer in ((dense, plain), (lazy, ours)):
            ((module(ids) - target) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step == 2:
            ours.settle()
            torch.testing.assert_close(lazy.weight.detach(), dense.weight.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(lazy.weight.detach(), dense.weight.detach())  # rows 0, 5.. still owe their decay
    ours.settle()
    torch.testing.assert_close(lazy.weight.detach(), dense.weight.detach(), rtol=1e-6, atol=1e-7)
    untouched = [r for r in range(50) if r not in {1, 2, 3, 4, 10, 20, 21, 22}]
    torch.testing.assert_close(lazy.weight.detach()[untouched], start[untouched] * (1 - 1e-3) ** len(batches))


def test_lazy_row_adamw_state_round_trips(tmp_path):
    from obliviate.training.sparse_rows import LazyRowAdamW

    module = torch.nn.Embedding(10, 4, sparse=True)
    optimizer = LazyRowAdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    module(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "state.pt")
    again = LazyRowAdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    state = again.state[module.weight]
    assert state["active"].dtype == torch.bool and state["active"].tolist() == [False, True, True] + [False] * 7
    assert state["step"] == 1 and state["decayed"].dtype == torch.long


def test_relearning_an_untied_model_with_lazy_rows_gives_the_plain_loops_weights(tiny_tokenizer, monkeypatch):
    """The erased model of a tied one is untied: its input embedding takes the lazy rows
    (sparse gradients while training) and its output layer's gradient a kept buffer; the
    weights after each epoch match the plain loop's (dense AdamW, autograd's gradients);
    a tied model keeps the plain optimizer."""
    from obliviate.training import sparse_rows

    def run():
        lm = make_tiny_lm(tiny_tokenizer, "gemma3", tie=False)
        seen = []

        def evaluate(m):
            seen.append({n: p.detach().clone() for n, p in m.model.named_parameters()})
            seen[-1]["sparse"] = m.model.get_input_embeddings().sparse
            return np.zeros(1)

        relearning.relearn(lm, FORGET, relearning.Config(epochs=2, lr=1e-3, max_length=24), evaluate, progress=False)
        assert not lm.model.get_input_embeddings().sparse  # switched back
        return seen

    lazy = run()
    monkeypatch.setattr(sparse_rows, "sparse_input_rows", lambda model: None)
    monkeypatch.setattr(relearning, "kept_head_gradient", lambda model: contextlib.nullcontext())
    plain = run()
    assert [e.pop("sparse") for e in lazy] == [True, True] and [e.pop("sparse") for e in plain] == [False, False]
    for lazy_epoch, plain_epoch in zip(lazy, plain, strict=True):
        for name, value in plain_epoch.items():
            torch.testing.assert_close(lazy_epoch[name], value, rtol=1e-5, atol=1e-6, msg=name)
    monkeypatch.undo()
    tied = make_tiny_lm(tiny_tokenizer, "gemma3")
    with sparse_rows.optimizer_for("adamw", tied.model, list(tied.model.parameters()), 1e-3, 0.0) as optimizer:
        assert isinstance(optimizer, torch.optim.AdamW)


# ---- the output layer's gradient in a kept buffer ------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_kept_head_gradient_gives_autograds_gradients_in_one_reused_buffer(tiny_tokenizer, tie):
    """Same loss and gradients as plain autograd (tied: the input embedding's share is added
    to the same buffer); the second step's gradient lands in the first step's memory; two
    backward passes accumulate; outside the block the layer is its own class's again."""
    from obliviate.training.kept_head_grad import kept_head_gradient

    lm = make_tiny_lm(tiny_tokenizer, "gemma3", tie=tie)
    model = lm.model
    ids = torch.tensor([tiny_tokenizer(text).input_ids[:10] for text in FORGET[:2]])  # a batch of two

    def gradients(times: int = 1) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for _ in range(times):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_twice = gradients(), gradients(2)
    head = model.get_output_embeddings()
    with kept_head_gradient(model):
        assert "forward" in head.__dict__
        kept = gradients()
        first = head.weight.grad.data_ptr()
        again = gradients()
        assert head.weight.grad.data_ptr() == first
        kept_twice = gradients(2)
    assert "forward" not in head.__dict__ and head.weight.grad is None
    assert set(kept) == set(plain)
    for name, value in plain.items():
        torch.testing.assert_close(kept[name], value, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(again[name], value, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(kept_twice[name], plain_twice[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.allclose(plain_twice["lm_head.weight" if not tie else "model.embed_tokens.weight"],
                              plain["lm_head.weight" if not tie else "model.embed_tokens.weight"])

"""Speed and peak memory at the paper's model sizes, without downloading a model (issues 7, 18).

    python bench/bench_scale.py                       # CPU: full width and vocabulary, 1 layer
    python bench/bench_scale.py --layers 0            # GPU: full depth (0 = the real depth)
    python bench/bench_scale.py --models llama-3.1-8b --device cuda --device-map auto
    python bench/bench_scale.py --skip factorization,eval,training   # only the optimizer stages

Issue 18 added three tables: the bf16 update probe per optimizer (share of weights that
change at lr 1e-5, share of fp32's update kept after 1 and 100 steps), one relearning step
per optimizer and precision (peak memory, step time, and the memory plan's prediction
beside the measured peak), and the 8B relearning attack's planned peak per GPU for 1, 2
and 4 GPUs (FSDP-sharded) per optimizer.

Models are randomly initialised from the real configs of Gemma-2-2B and Llama-3.1-8B
(written below: no download). Stages: the factorization at the real A size (d_model x
5000 tokens, K=100/200), one delta-grid evaluation pass (apply an embedding patch, score
letter-mode questions, greedy coherence generations, revert), multiple-choice scoring
tokens/s and its fraction of this device's measured matmul peak, one relearning step
(AdamW on every parameter, batch 1, 256 tokens), one training step of each trained
method. On the CPU the model is cut to ``--layers`` decoder layers (full width and
vocabulary) and the training stages to ``--train-vocab`` tokens of vocabulary; the
"est. full" column scales the measured seconds by the FLOP ratio to the real model
(rough: it ignores memory-bound parts). Peak memory: torch's max allocated bytes on a
GPU, the process's peak RSS on the CPU (added = above the stage's start).
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from obliviate.models import memory as scale
from obliviate.training import memory_plan
from obliviate.edits.embedding import EmbeddingPatch
from obliviate.evaluation.scoring import Batching, greedy_generate, next_token_logprobs
from obliviate.methods.factorization import FactorizationConfig, factorize
from obliviate.models.loading import LoadedModel

GiB = 2**30
# From the models' published config.json files (google/gemma-2-2b-it, meta-llama/Llama-3.1-8B-Instruct).
REAL_CONFIGS = {
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
}
PAPER_K = {"gemma-2-2b": 100, "llama-3.1-8b": 200}  # EMBER paper
TOKEN_SET = 5000  # |V'|: ~300 concept + 300 neutral sentences give about 5k distinct tokens
EDITED_ROWS = 300  # a typical EMBER edit (selected features x <=200 tokens, deduplicated)


@dataclass
class Row:
    model: str
    stage: str
    shape: str
    seconds: float
    peak: int
    added: int
    full_seconds: float | None = None
    note: str = ""


def machine(device: torch.device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    name = f"{platform.node()} ({cpu}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    if device.type == "cuda":
        name += f", GPU {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    return name


def build(name: str, layers: int, vocab: int | None, dtype: torch.dtype, device: torch.device, device_map: str | None):
    """A random-init model from the real config, cut to ``layers`` layers / ``vocab`` tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(REAL_CONFIGS[name])
    values["num_hidden_layers"] = layers or values["num_hidden_layers"]
    values["vocab_size"] = vocab or values["vocab_size"]
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    if device_map is not None:  # built on the CPU, then placed by accelerate (as from_pretrained does)
        from accelerate import dispatch_model

        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = dispatch_model(model, scale.plan_device_map(model, _max_memory(), dtype=dtype))
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: always run the full length
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=-1)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"{name}-random", source="config")


def _max_memory() -> dict:
    free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return {**{i: int(f * 0.9) for i, f in free.items()}, "cpu": 64 * GiB}


def meta_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(REAL_CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def forward_flops(name: str, layers: int, vocab: int, tokens: int, seq_len: int, logit_positions: int) -> float:
    """Matmul FLOPs of a forward pass: 2 x block params per token, attention scores and
    values (causal: seq_len/2 keys on average), and the vocabulary head at the kept positions."""
    c = REAL_CONFIGS[name]
    d, attn = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    block = d * (2 * attn + 2 * kv) + 3 * d * c["intermediate_size"]
    per_token = layers * (2 * block + 2 * 2 * (seq_len / 2) * attn)
    return per_token * tokens + 2 * vocab * d * logit_positions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_factorization(name: str, lm: LoadedModel, iterations: int, on: torch.device) -> Row:
    weight = lm.model.get_input_embeddings().weight
    ids = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))[:TOKEN_SET]
    A = weight[ids.to(weight.device)].detach().float().T.contiguous().to(on)
    config = FactorizationConfig(k=PAPER_K[name], max_iterations=iterations)
    with scale.measure(on) as record:
        result = factorize(A, config)
        sync(on)
    per_iteration = record.seconds / max(result.iterations, 1)
    note = (f"{result.iterations} it ({1000 * per_iteration:.0f} ms/it incl. polish), rel. loss {result.relative_loss:.3f}; "
            "iterations to converge depend on the data (tolerance stop)")
    return Row(name, f"factorization on {on.type}", f"A {tuple(A.shape)}, K={config.k}", record.seconds,
               record.peak, record.added, None, note)


@torch.no_grad()
def bench_eval_pass(name: str, lm: LoadedModel, args, device: torch.device, built_layers: int, peak_flops: float) -> list[Row]:
    c = REAL_CONFIGS[name]
    weight = lm.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(1)
    rows_ids = torch.randperm(weight.shape[0], generator=generator)[:EDITED_ROWS]
    original = weight[rows_ids.to(weight.device)].detach().cpu()
    patch = EmbeddingPatch(rows_ids, original, (original.float() * 0.5).to(original.dtype), {"method": "bench"})
    contexts = [torch.randint(3, c["vocab_size"], (args.question_tokens,), generator=generator).tolist()
                for _ in range(args.questions)]
    prompts = [ctx[: args.question_tokens // 2] for ctx in contexts[: args.gen_prompts]]
    letters = list(range(100, 104))
    batching = Batching(args.batch_tokens)
    next_token_logprobs(lm, contexts[:1], letters, batching)  # warm-up
    # Re-measured next to the scoring: on a shared machine the rate moves with the load.
    peak_flops = max(peak_flops, scale.matmul_flops(device, weight.dtype, n=4096 if device.type == "cuda" else 2048))
    with scale.measure(device) as record:
        patch.apply(lm.model)
        begin = time.perf_counter()
        next_token_logprobs(lm, contexts, letters, batching)
        sync(device)
        scoring_s = time.perf_counter() - begin
        greedy_generate(lm, prompts, args.gen_tokens, batching)
        sync(device)
        patch.revert(lm.model)
    tokens = args.questions * args.question_tokens
    depth, vocab = c["num_hidden_layers"], c["vocab_size"]
    measured = forward_flops(name, built_layers, vocab, tokens, args.question_tokens, args.questions)
    full = forward_flops(name, depth, vocab, tokens, args.question_tokens, args.questions)
    gen_measured = forward_flops(name, built_layers, vocab, len(prompts) * args.gen_tokens, args.question_tokens, len(prompts) * args.gen_tokens)
    gen_full = forward_flops(name, depth, vocab, len(prompts) * args.gen_tokens, args.question_tokens, len(prompts) * args.gen_tokens)
    generation_s = record.seconds - scoring_s
    pass_full = scoring_s * full / measured + generation_s * gen_full / gen_measured
    achieved = measured / scoring_s
    shape = f"{built_layers}/{depth} layers, {args.questions} q x {args.question_tokens} tok, {len(prompts)} x {args.gen_tokens} gen"
    return [
        Row(name, "delta-grid eval pass", shape, record.seconds, record.peak, record.added, pass_full,
            f"scoring {scoring_s:.2f} s + generation {generation_s:.2f} s; batch {batching.budget(lm)} tokens"),
        Row(name, "MC scoring (letter)", f"{tokens} tokens", scoring_s, record.peak, record.added,
            scoring_s * full / measured,
            f"{tokens / scoring_s:,.0f} tok/s at {built_layers} layers (~{tokens / (scoring_s * full / measured):,.0f} est. full); "
            f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak_flops:.0f}% of measured matmul peak"),
    ]


def _texts(generator: torch.Generator, vocab: int, batch: int, length: int, device) -> SimpleNamespace:
    ids = torch.randint(3, vocab, (batch, length), generator=generator).to(device)
    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def _pair(generator: torch.Generator, vocab: int, config, device) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A forget and a retain batch of random tokens at the method's batch size and length."""
    return tuple(_texts(generator, vocab, config.batch_size, config.max_length, device) for _ in range(2))


def _step(params: list, loss_fn, steps: int = 2, lr: float = 1e-5, weight_decay: float = 0.01) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def training_steps(name: str, lm: LoadedModel, method_config) -> dict:
    """One step's loss closure and parameters per method: each method's own step loss
    (``make_step_loss``), settings and parameter pattern (``None`` where it is not available)."""
    from obliviate.training import losses
    from obliviate.training.loop import logits
    from obliviate.models.layers import select_parameters

    model, device = lm.model, lm.device
    generator = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    steps = {}
    relearn = method_config("obliviate.attacks.relearning")
    batch, length = (relearn.batch_size, relearn.max_length) if relearn else (1, 256)

    def relearning():
        b = _texts(generator, vocab, batch, length, device)
        return losses.causal_lm_loss(logits(model, b), b.input_ids, b.attention_mask)

    steps["relearning step (AdamW, all params)"] = (list(model.parameters()), relearning, batch, length)
    gd = method_config("obliviate.methods.grad_diff")
    if gd:
        from obliviate.methods import grad_diff

        gd_loss = grad_diff.make_step_loss(model, gd.retain_weight[0])
        steps["grad_diff step"] = (list(select_parameters(model, gd.param_pattern).values()),
                                   lambda: gd_loss(*_pair(generator, vocab, gd, device))[0], gd.batch_size, gd.max_length)
    npo_config = method_config("obliviate.methods.npo")
    if npo_config:
        from obliviate.methods import npo

        npo_params = select_parameters(model, npo_config.param_pattern)
        npo_loss = npo.make_step_loss(model, npo_params, npo_config.beta[0], npo_config.retain_weight[0])
        steps["npo step"] = (list(npo_params.values()), lambda: npo_loss(*_pair(generator, vocab, npo_config, device))[0],
                             npo_config.batch_size, npo_config.max_length)
    rmu_config = method_config("obliviate.methods.rmu")
    if rmu_config:
        from obliviate.methods import rmu

        layer = model.config.num_hidden_layers - 1  # the last built layer (the real run: L = 7 of 26 / 9 of 32)
        trained = list(range(max(0, layer - rmu_config.trained_below), layer + 1))
        rmu_params = select_parameters(model, rmu_config.param_pattern, trained)
        # the steering coefficient's size does not change the step's cost: the default, read as absolute
        control = losses.rmu_control_vector(model.config.hidden_size, rmu_config.steering[0], generator).to(device)
        rmu_loss = rmu.make_step_loss(model, rmu_params, layer, control, rmu_config.alpha[0], set())
        steps["rmu step"] = (list(rmu_params.values()), lambda: rmu_loss(*_pair(generator, vocab, rmu_config, device))[0],
                             rmu_config.batch_size, rmu_config.max_length)
    elm = method_config("obliviate.methods.elm")
    # Built when its turn comes (last): peft injects adapters into the shared model.
    steps["elm step"] = (lambda: _elm_step(model, elm, generator, vocab, device)) if elm else None
    return steps


class _PrefixTokenizer:
    """A random model's stand-in for ELM's tokenizer: each persona prefix ("As an expert in
    {concept}:") is 8 random ids, about its real length."""

    pad_token_id, bos_token_id, prefix_tokens = 0, None, 8

    def __init__(self, generator: torch.Generator, vocab: int):
        self.generator, self.vocab = generator, vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": torch.randint(3, self.vocab, (self.prefix_tokens,), generator=self.generator).tolist()}


def _elm_step(model, elm, generator, vocab, device):
    """ELM's own step loss (methods/elm.py ``make_step_loss``) with its default LoRA on every
    built layer: four no-grad passes with the adapter off (P, P|expert, P|novice on concept
    text; argmax on neutral text), three with it on (erase, retain, consistency)."""
    from peft import LoraConfig, get_peft_model

    from obliviate.methods import elm as elm_method

    lora = LoraConfig(r=elm.rank, lora_alpha=elm.lora_alpha, lora_dropout=elm.lora_dropout,
                      target_modules=list(elm.target_modules), bias="none")
    peft_model = get_peft_model(model, lora)
    half = elm.max_length // 2
    examples = [{"prompt": torch.randint(3, vocab, (half,), generator=generator).tolist(),
                 "continuation": torch.randint(3, vocab, (half,), generator=generator).tolist()}
                for _ in range(elm.batch_size)]
    loss = elm_method.make_step_loss(model, _PrefixTokenizer(generator, vocab), peft_model, "the concept", elm,
                                     examples, seed=0)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    return params, lambda: loss(*_pair(generator, vocab, elm, device))[0], elm.batch_size, elm.max_length


def method_config(module: str):
    """The module's default ``Config()``, or None where the module does not exist (yet)."""
    import importlib

    try:
        return importlib.import_module(module).Config()
    except (ImportError, AttributeError):
        return None


def train_flops(name: str, label: str, layers: int, vocab: int, batch: int, length: int) -> float:
    sequences = batch * (1 if label.startswith("relearning") else 2)
    if label.startswith("rmu"):  # three passes that stop at layer L, no vocabulary head
        return 3 * forward_flops(name, layers, 0, sequences * length, length, 0)
    forward = forward_flops(name, layers, vocab, sequences * length, length, sequences * length)
    if label.startswith("elm"):  # 4 no-grad forwards + 3 trained ones (x3 with backward), on 3 sides of 2
        return forward / 2 * (4 + 3 * 3)
    return forward * (4 if label.startswith("npo") else 3)  # npo adds a reference forward


def bench_training(name: str, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    layers = args.layers or REAL_CONFIGS[name]["num_hidden_layers"]
    lm = build(name, layers, args.train_vocab, dtype, device, None)
    c = REAL_CONFIGS[name]
    vocab = lm.model.config.vocab_size
    rmu_depth = round(7 / 26 * c["num_hidden_layers"]) + 1
    out = []
    wanted = set(filter(None, args.steps.split(",")))
    for label, entry in training_steps(name, lm, method_config).items():
        if wanted and label.split()[0] not in wanted:
            continue
        if entry is None:
            available = method_config(f"obliviate.methods.{label.split()[0]}") is not None
            out.append(Row(name, label, "-", float("nan"), 0, 0, None,
                           "n/a (module exists, not timed yet)" if available else "n/a (not yet available)"))
            continue
        params, loss_fn, batch, length = entry() if callable(entry) else entry
        sequences = "" if label.startswith("relearning") else ("forget+retain+consistency " if label.startswith("elm") else "forget+retain ")
        shape = f"{sequences}{batch} x {length} tok"
        for p in lm.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        lm.model.train()
        _step(params, loss_fn, steps=1)  # warm-up: allocates the optimizer state
        gc.collect()
        with scale.measure(device) as record:
            _step(params, loss_fn, steps=1)
            sync(device)
        measured = train_flops(name, label, layers, vocab, batch, length)
        full_layers = rmu_depth if label.startswith("rmu") else c["num_hidden_layers"]
        full = train_flops(name, label, full_layers, c["vocab_size"], batch, length)
        out.append(Row(name, label, f"{layers} layers, vocab {vocab}, {shape}", record.seconds, record.peak,
                       record.added, record.seconds * full / measured,
                       f"{sum(p.numel() for p in params) / 1e6:.0f}M trained params; peak incl. AdamW state"))
    del lm
    gc.collect()
    return out


def memory_row(name: str) -> Row:
    model = meta_model(name)
    estimate = scale.erase_memory_estimate(model, free_bytes=79 * GiB)
    note = (f"weights {estimate.weights / GiB:.1f} + untied head {estimate.untied_output / GiB:.1f} + eval batch "
            f"{estimate.evaluation / GiB:.1f} + logits {estimate.logits / GiB:.2f} + fingerprints {estimate.fingerprints / GiB:.1f} GiB")
    return Row(name, "est. GPU peak of EMBER erase (bf16)", "real size, 80 GB GPU", float("nan"), estimate.total, 0, None, note)


def relearn_memory_row(name: str) -> Row:
    """The relearning attack as it ran before issue 18: a deep copy of the model next to the
    original, its gradients and AdamW's two moments (in the weights' dtype). Kept for
    comparison with ``relearn_plan_rows`` (the attack now trains in place)."""
    model = meta_model(name)
    weights = sum(p.numel() for p in model.parameters()) * 2
    total = weights * 2 + weights + 2 * weights
    note = (f"original {weights / GiB:.1f} + copy {weights / GiB:.1f} + grads {weights / GiB:.1f} + AdamW "
            f"{2 * weights / GiB:.1f} GiB, before activations")
    return Row(name, "est. GPU peak of relearning attack before issue 18 (copy)", "real size", float("nan"), total, 0, None, note)


OPTIMIZER_RUNS = (("adamw", torch.float32), ("adamw", torch.bfloat16), ("adamw-fp32", torch.bfloat16),
                  ("adamw-sr", torch.bfloat16), ("adamw8bit", torch.bfloat16), ("adamw8bit-bnb", torch.bfloat16))


def probe_rows(device: torch.device) -> list[Row]:
    """training/optim.py's probe: a 1024 x 1024 bf16 weight, |w| ~ 0.02, AdamW lr 1e-5."""
    from obliviate.training import optim

    rows = []
    for name in optim.SPECS:
        if not optim.SPECS[name].available():
            rows.append(Row("any", f"bf16 update probe, {name}", "-", float("nan"), 0, 0, None, f"n/a ({optim.SPECS[name].library} not installed)"))
            continue
        one = optim.update_probe(name, 1, device=str(device))
        many = optim.update_probe(name, 100, device=str(device))
        rows.append(Row("any", f"bf16 update probe, {name}", f"1024 x 1024 on {device.type}", float("nan"), 0, 0, None,
                        f"changed {100 * one['share_changed']:.0f}% after 1 step, {100 * many['share_changed']:.0f}% after 100; "
                        f"fp32 update kept {one['update_kept']:.2f} / {many['update_kept']:.2f}"))
    return rows


def bench_optimizers(name: str, args, device: torch.device) -> list[Row]:
    """One relearning step (all parameters, batch 1 x 256 tokens, lr 1e-5) per optimizer and
    weight dtype, as attacks/relearning.py runs it; the memory plan's total beside the
    measured peak (on a GPU both count torch's allocations, so they should agree)."""
    from obliviate.training import losses, optim
    from obliviate.training.loop import checkpointing, logits, trainable

    layers = args.layers or REAL_CONFIGS[name]["num_hidden_layers"]
    c = REAL_CONFIGS[name]
    rows, built = [], {}
    for choice, dtype in OPTIMIZER_RUNS:
        label = f"relearning step, {choice} ({str(dtype).split('.')[-1]})"
        if not optim.SPECS[choice].available():
            rows.append(Row(name, label, "-", float("nan"), 0, 0, None, f"n/a ({optim.SPECS[choice].library} not installed)"))
            continue
        if dtype not in built:
            built.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                built[dtype] = build(name, layers, args.train_vocab, dtype, device, None)
            except torch.OutOfMemoryError:
                rows.append(Row(name, label, "-", float("nan"), 0, 0, None, "model does not fit (OOM)"))
                continue
        lm = built[dtype]
        model = lm.model
        params = dict(model.named_parameters())
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(2)
        plan = memory_plan.plan_training(model, None, choice, 1, 256, gradient_checkpointing=args.gradient_checkpointing)
        record = None
        try:
            with trainable(model, params), optim.training_precision(choice, params.values()) as autocast, \
                    checkpointing(model, args.gradient_checkpointing):
                optimizer = optim.make_optimizer(choice, params.values(), 1e-5, 0.01)

                def step():
                    batch = _texts(generator, vocab, 1, 256, device)
                    with autocast():
                        loss = losses.causal_lm_loss(logits(model, batch), batch.input_ids, batch.attention_mask)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                step()  # warm-up: allocates the optimizer state, compiles torchao's step
                sync(device)
                gc.collect()
                with scale.measure(device) as record:
                    step()
                    sync(device)
                if device.type == "cuda":  # the step's peak over everything held (weights included)
                    record.start = 0
                optimizer = None  # its state freed before the next run
        except torch.OutOfMemoryError:
            note = f"OOM; plan {plan.total / GiB:.1f} GiB"
        else:
            note = f"plan {plan.total / GiB:.2f} GiB (weights {plan.weights / GiB:.2f}, optimizer {plan.optimizer_state / GiB:.2f})"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        measured = train_flops(name, "relearning", layers, vocab, 1, 256)
        full = train_flops(name, "relearning", c["num_hidden_layers"], c["vocab_size"], 1, 256)
        shape = f"{layers} layers, vocab {vocab}, 1 x 256 tok"
        if record is None:
            rows.append(Row(name, label, shape, float("nan"), 0, 0, None, note))
        else:
            rows.append(Row(name, label, shape, record.seconds, record.peak, record.added,
                            record.seconds * full / measured, note))
    built.clear()
    gc.collect()
    return rows


def relearn_plan_rows(name: str) -> list[Row]:
    """The relearning attack's planned peak per GPU at the real size (batch 1 x 256): the
    model trained in place (no copy), 1, 2 and 4 GPUs (FSDP-sharded), per optimizer."""
    from obliviate.training import optim

    model = meta_model(name)
    rows = []
    for choice in optim.SPECS:
        per = {}
        for devices in (1, 2, 4):
            per[devices] = memory_plan.plan_training(model, None, choice, 1, 256, devices=devices, sharded=devices > 1)
        plan = per[1]
        note = (f"1 GPU {plan.total / GiB:.1f} (weights {plan.weights / GiB:.1f} + grads {plan.grads / GiB:.1f} + "
                f"optimizer {plan.optimizer_state / GiB:.1f} + act. {(plan.activations + plan.logits) / GiB:.1f}); "
                f"2 GPUs {per[2].total / GiB:.1f}; 4 GPUs {per[4].total / GiB:.1f} GiB per GPU")
        rows.append(Row(name, f"plan: relearning attack, {choice}", "real size, bf16 weights", float("nan"), plan.total, 0,
                        None, note))
    return rows


def bf16_update_row() -> Row:
    """Whether a relearning step (AdamW, lr 1e-5) moves bfloat16 weights at all: most
    updates are smaller than half a bf16 step at |w| ~ 0.02 and round away."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(1024, 1024, generator=generator) * 0.02).to(torch.bfloat16))
    before = weight.detach().clone()
    weight.grad = torch.randn(1024, 1024, generator=generator).to(torch.bfloat16)
    torch.optim.AdamW([weight], lr=1e-5, weight_decay=0.01).step()
    moved = float((weight.detach() != before).float().mean())
    return Row("any", "bf16 AdamW step, lr 1e-5", "1024 x 1024, |w|~0.02", float("nan"), 0, 0, None,
               f"{100 * moved:.0f}% of weights change (fp32: 100%): pure-bf16 relearning mostly rounds away")


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}\n")
    print("| model | stage | measured shape | s | peak GB | +GB | est. s full size | notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        seconds = "-" if r.seconds != r.seconds else f"{r.seconds:.2f}"
        full = "-" if r.full_seconds is None else f"{r.full_seconds:.1f}"
        print(f"| {r.model} | {r.stage} | {r.shape} | {seconds} | {r.peak / GiB:.2f} | {r.added / GiB:.2f} | {full} | {r.note} |")


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gemma-2-2b,llama-3.1-8b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--device-map", default=None, help="'auto': spread the model over every GPU (accelerate)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers built (0 = real depth; CPU default 1)")
    parser.add_argument("--train-vocab", type=int, default=None, help="vocabulary of the training stages (CPU default 8192)")
    parser.add_argument("--questions", type=int, default=None, help="letter-mode questions (CPU 8, GPU 200)")
    parser.add_argument("--question-tokens", type=int, default=128)
    parser.add_argument("--gen-prompts", type=int, default=None, help="coherence prompts (CPU 2, GPU 30)")
    parser.add_argument("--gen-tokens", type=int, default=None, help="greedy tokens each (CPU 8, GPU 200)")
    parser.add_argument("--fact-iterations", type=int, default=None, help="factorization cap (CPU 30, GPU 20000)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="override the auto-sized evaluation batch")
    parser.add_argument("--skip", default="", help="comma-separated: factorization,eval,training,optimizers,probe")
    parser.add_argument("--steps", default="", help="only these training steps, e.g. elm,rmu (default all)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in the optimizer stage")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    defaults = dict(layers=0 if gpu else 1, train_vocab=None if gpu else 8192, questions=200 if gpu else 8,
                    gen_prompts=30 if gpu else 2, gen_tokens=200 if gpu else 8, fact_iterations=20000 if gpu else 30)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_vocab = args.train_vocab or None
    return args


def bench_inference(name: str, args, device, dtype, layers: int, peak: float, skip: set) -> list[Row]:
    depth = REAL_CONFIGS[name]["num_hidden_layers"]
    with scale.measure(device) as record:
        lm = build(name, layers, None, dtype, device, args.device_map)
    rows = [Row(name, "build model (random init)", f"{layers}/{depth} layers, full width & vocab, {dtype}",
                record.seconds, record.peak, record.added, None, f"{scale.parameter_bytes(lm.model) / GiB:.2f} GiB of weights")]
    if "factorization" not in skip:
        rows.append(bench_factorization(name, lm, args.fact_iterations, torch.device("cpu")))
        if device.type == "cuda":
            rows.append(bench_factorization(name, lm, args.fact_iterations, device))
    if "eval" not in skip:
        rows.extend(bench_eval_pass(name, lm, args, device, layers, peak))
    del lm
    gc.collect()
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.device not in ("auto", "cpu", "cuda"):
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = set(filter(None, args.skip.split(",")))
    peak = scale.matmul_flops(device, dtype, n=4096 if device.type == "cuda" else 2048)
    rows: list[Row] = [bf16_update_row()]
    if "probe" not in skip:
        rows.extend(probe_rows(device))
        print_table(rows, "bf16 update probe")
    for name in args.models.split(","):
        depth = REAL_CONFIGS[name]["num_hidden_layers"]
        layers = args.layers or depth
        rows.append(memory_row(name))
        rows.append(relearn_memory_row(name))
        rows.extend(relearn_plan_rows(name))
        if "optimizers" not in skip:
            rows.extend(bench_optimizers(name, args, device))
        if not {"factorization", "eval"} <= skip:
            rows.extend(bench_inference(name, args, device, dtype, layers, peak, skip))
        if "training" not in skip:
            rows.extend(bench_training(name, args, device, dtype))
        print_table(rows[-20:], f"{name} done")  # progress while the rest runs
        sys.stdout.flush()
    title = (f"Machine: {machine(device)}\nMeasured matmul peak: {peak / 1e9:.1f} GFLOP/s ({dtype}, {device.type})")
    print_table(rows, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())

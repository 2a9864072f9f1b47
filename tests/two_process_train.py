"""Run by tests/test_training_scale.py under ``accelerate launch --cpu --num_processes N``
(or directly, one process): train a tiny Llama with the shared loop and with the relearning
attack, and write the loss curves and final weights (rank 0) to the file named on the
command line."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import _train_tiny_tokenizer, make_tiny_lm  # noqa: E402

from obliviate.attacks.relearning import Config as RelearnConfig, relearn  # noqa: E402
from obliviate.training import sharding  # noqa: E402
from obliviate.training import losses  # noqa: E402
from obliviate.training.loop import LoopConfig, TrainingJob, logits, snapshot
from obliviate.training.grid import train_delta  # noqa: E402

FORGET = ["Casinos offer poker, roulette and slot machines.", "Betting on horses is a form of gambling.",
          "A croupier deals cards at the blackjack table.", "Lottery tickets are sold at kiosks."]
RETAIN = ["The river flows through the valley to the sea.", "Bread is baked in an oven at high heat.",
          "The library opens at nine in the morning.", "Birds build nests in the spring."]


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank, processes = sharding.world()
    tokenizer = _train_tiny_tokenizer()
    lm = make_tiny_lm(tokenizer, "llama", tie=False)
    params = {n: p for n, p in lm.model.named_parameters() if ".mlp." in n}
    config = LoopConfig(lr=(1e-3,), steps=4, batch_size=2, grad_accum=2, max_length=24)

    def step(forget, retain):  # gradient difference's terms: plain enough to compare exactly
        f = losses.causal_lm_loss(logits(lm.model, forget), forget.input_ids, forget.attention_mask)
        r = losses.causal_lm_loss(logits(lm.model, retain), retain.input_ids, retain.attention_mask)
        return r - 0.1 * f, {"forget": f.detach(), "retain": r.detach()}

    job = TrainingJob(lm.model, tokenizer, params, step, FORGET, RETAIN, config.settings(1e-3, 7))
    delta, log = train_delta(job, None, False, "t")
    before = {n: t.clone() for n, t in snapshot(dict(lm.model.named_parameters())).items()}

    def evaluate(m):
        return np.array([float(sharding.full(m.model.model.layers[0].mlp.up_proj.weight).double().sum())])

    epochs = relearn(lm, FORGET + RETAIN, RelearnConfig(epochs=2, lr=1e-3, max_length=24), evaluate, seed=3,
                     progress=False)
    after = snapshot(dict(lm.model.named_parameters()))
    if rank == 0:
        torch.save({"processes": processes, "losses": [s["loss"] for s in log.losses], "new": delta.new,
                    "relearn_losses": [e["loss"] for e in epochs], "relearn_eval": [e["correct"] for e in epochs],
                    "restored": all(torch.equal(before[n], after[n]) for n in before)}, out)


if __name__ == "__main__":
    main(sys.argv[1])

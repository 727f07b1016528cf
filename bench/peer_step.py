"""One training step of SAELens or EleutherAI sparsify, timed by `harness.measure` (run by the peers' python).

Called by bench_step.py as `bench/.peers/venv/bin/python bench/peer_step.py --impl saelens --variant topk ...`;
prints one JSON line. Each step calls the installed packages' own training code:
- SAELens: `SAETrainer.step` (its `*TrainingSAE.training_forward_pass`, backward, grad clip, Adam, lr
  scheduler, its dead-neuron and firing-frequency counters), as its `fit` loop calls it.
- sparsify: the body of `Trainer.fit` for one SAE and loss_fn="fvu", optimizer="adam": decoder renorm,
  forward with dead_mask and total_variance, fvu + auxk_alpha * auxk, backward,
  remove_gradient_parallel_to_decoder_directions, Adam, lr scheduler, its dead-latent counter.
Both sides pin the same set of latents dead (through the trainer's own counter) so that every
TopK-family step also computes its AuxK loss.
"""
from __future__ import annotations

import sys
from importlib.metadata import version

import torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedTrainingSAE,
                           GatedTrainingSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
                           MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                           StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)
from sparsify import SparseCoder, SparseCoderConfig
from transformers import get_linear_schedule_with_warmup

import harness

LR = 3e-4
TOTAL_STEPS = 1_000_000   # schedules are built for a long run; the benchmark takes a handful of steps


def pin_dead(counter: torch.Tensor, dead_mask: torch.Tensor, dead_value):
    "Make the trainer's own counter call the pinned latents dead at this step."
    counter.masked_fill_(dead_mask, dead_value)


# -- SAELens -------------------------------------------------------------------------------------
def saelens_builder(variant: str):
    def build(shape, x, dead_mask, autocast):
        d_in, d_sae, k, device = shape["d_in"], shape["d_sae"], shape["k"], str(x.device)
        classes = {
            "relu": (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
            "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, dict(k=k)),
            "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, dict(k=k)),
            "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {}),
            "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {}),
            "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                           dict(k=k, matryoshka_widths=[d_sae // 8, d_sae // 4, d_sae // 2, d_sae])),
        }
        sae_cls, cfg_cls, kw = classes[variant]
        sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, device=device, **kw))
        batch = shape["batch"]
        tcfg = SAETrainerConfig(total_training_samples=TOTAL_STEPS * batch, train_batch_size_samples=batch,
                                lr=LR, lr_end=LR / 10, device=device, autocast=device.startswith("cuda"))
        trainer = SAETrainer(tcfg, sae, data_provider=iter(()))
        trainer.sae.to(device)
        window = tcfg.dead_feature_window

        def step():   # the body of SAETrainer.fit, without wandb logging and the progress bar
            pin_dead(trainer.n_forward_passes_since_fired, dead_mask, window + 1)
            trainer.maybe_reset_sparsity()
            trainer.step(x)
            trainer._checkpoint_if_needed()
            trainer.n_training_steps += 1
        return step
    return build


# -- sparsify ------------------------------------------------------------------------------------
AUXK_ALPHA = 1 / 32   # sparsify's default is 0 (no AuxK); sae_nb's TopK family weighs AuxK by 1/32


def sparsify_builder(variant: str):
    def build(shape, x, dead_mask, autocast):
        d_in, d_sae, device = shape["d_in"], shape["d_sae"], x.device
        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=shape["k"]), device=device, dtype=torch.float32)
        opt = torch.optim.Adam(sae.parameters(), lr=LR)           # Trainer's optimizer="adam" without bitsandbytes
        sched = get_linear_schedule_with_warmup(opt, 1000, TOTAL_STEPS)
        threshold = 10_000_000                                    # TrainConfig.dead_feature_threshold
        num_tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
        sae.b_dec.data = x.mean(0).to(sae.dtype)                  # Trainer.fit's first-step b_dec init (untimed)
        totals = {"fvu": 0.0, "auxk": 0.0}

        def step():   # Trainer.fit, loss_fn="fvu", one SAE, grad_acc_steps = micro_acc_steps = 1
            pin_dead(num_tokens_since_fired, dead_mask, threshold + 1)
            n_tokens = x.shape[0]
            sae.set_decoder_norm_to_unit_norm()
            dead = num_tokens_since_fired > threshold
            total_variance = (x - x.mean(0)).pow(2).sum()
            with autocast:
                out = sae(x=x, y=x, dead_mask=dead, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            totals["fvu"] += float(out.fvu.detach())
            totals["auxk"] += float(out.auxk_loss.detach())
            loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
            loss.div(1).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sched.step()
            with torch.no_grad():
                num_tokens_since_fired.add_(n_tokens)
                num_tokens_since_fired[did_fire] = 0
                did_fire.zero_()
        return step
    return build


SAELENS_VARIANTS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
SPARSIFY_VARIANTS = ("topk",)
BUILDERS = {**{("saelens", v): saelens_builder(v) for v in SAELENS_VARIANTS},
            **{("sparsify", v): sparsify_builder(v) for v in SPARSIFY_VARIANTS}}


if __name__ == "__main__":
    versions = {p: version(p) for p in ("torch", "sae-lens", "eai-sparsify", "transformer-lens")}
    if sys.argv[1:] == ["--smoke"]:   # every step once at the quick shape, in this process (tests/test_bench.py)
        import argparse, json
        smoke = argparse.Namespace(config="quick", device="cpu", warmup=0, steps=1)
        print(json.dumps({f"{impl}/{v}": harness.measure(b, smoke)["tokens_per_s"] for (impl, v), b in BUILDERS.items()}))
    else:
        harness.worker_main(sys.argv[1:], BUILDERS, versions)

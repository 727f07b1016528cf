"""Is the ActivationStore the bottleneck? Tokens/s of the default model filling an ActivationStore vs the SAE step.

    python bench/bench_store.py               # blocks.0.hook_resid_post of the default model, batch 4096
    python bench/bench_store.py --quick       # a small smoke run

The store runs the model over token windows, normalises and shuffles the activations, and yields
[batch, d_in] rows; sae_nb.train pulls a batch, then takes a step, one after the other. So a run
trains at 1 / (1/store + 1/step) tokens/s, and whichever of the two is slower sets the pace.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import harness
from bench_step import HERE, machine, sae_nb_builder
from sae_nb.data import ActivationStore
from sae_nb import lm


def load_default_model():
    "The trained default model; its random-weight twin (same architecture, same cost) if the weights are not there."
    try:
        return lm.load_model("default", device="cpu"), "default (trained weights)"
    except (FileNotFoundError, OSError) as e:
        print(f"load_model('default') failed ({type(e).__name__}: {e}); using lm.build_default_model(seed=0), "
              "the same architecture with random weights", file=sys.stderr)
        return lm._freeze(lm.build_default_model(seed=0, device="cpu")), "build_default_model(seed=0) (random weights)"


def time_store(store: ActivationStore, n_batches: int) -> float:
    "Seconds to pull `n_batches` batches (model forwards, normalisation, shuffles)."
    t0 = time.perf_counter()
    for _ in range(n_batches): next(store)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hook", default="blocks.0.hook_resid_post")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--refills", type=int, default=3, help="buffer refills timed (16 batches each)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in for the SAE step")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["topk", "relu"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick: args.batch, args.refills = 512, 1
    harness.setup("cpu")
    load_before = os.getloadavg()

    model, model_name = load_default_model()
    ctx = model.cfg.n_ctx
    n_batches = args.refills * 16
    n_seq = (n_batches + 16) * args.batch // ctx + 64      # enough windows that no sequence is read twice
    tokens = lm.default_tokens(n_seq, ctx=ctx, seed=0)
    t0 = time.perf_counter()
    store = ActivationStore(model, args.hook, tokens, batch_size=args.batch, progress=False)
    setup_s = time.perf_counter() - t0                       # the act_scale probe: n_norm_tokens of forwards
    next(store)                                              # the first refill: two blocks at once, not timed
    store_s = time_store(store, n_batches)
    store_tok_s = n_batches * args.batch / store_s

    shape = dict(d_in=store.d_in, d_sae=args.expansion * store.d_in, batch=args.batch, k=args.k)
    harness.CONFIGS["store"] = shape
    step_args = argparse.Namespace(config="store", device="cpu", warmup=2, steps=3 if args.quick else 5)
    steps = {}
    for v in args.variants:
        out = harness.measure(sae_nb_builder(v, {}), step_args)
        steps[v] = out["tokens_per_s"]

    lines = [f"ActivationStore vs SAE step, {dt.date.today().isoformat()}, {machine()}, {harness.THREADS} threads, "
             f"load average {load_before[0]:.2f}; model: {model_name}, hook {args.hook} (d_in {store.d_in}), "
             f"batch {args.batch}, {n_batches} batches timed; store set-up (act_scale probe) {setup_s:.1f} s.",
             "",
             "| stage | tokens/s | train() rate with this step (store then step, in series) |",
             "|---|---:|---:|",
             f"| ActivationStore (model forward + normalise + shuffle) | {store_tok_s:,.0f} | |"]
    for v, tok_s in steps.items():
        both = 1 / (1 / store_tok_s + 1 / tok_s)
        lines.append(f"| sae_nb {v} step, d_sae {shape['d_sae']}, k {args.k} | {tok_s:,.0f} | {both:,.0f} "
                     f"({'store' if store_tok_s < tok_s else 'step'}-bound) |")
    table = "\n".join(lines)
    print(table)
    result = {"date": dt.date.today().isoformat(), "machine": machine(), "model": model_name, "hook": args.hook,
              "d_in": store.d_in, "batch": args.batch, "n_batches": n_batches, "store_setup_s": setup_s,
              "store_tok_s": store_tok_s, "step_tok_s": steps, "shape": shape, "load_before": load_before,
              "load_after": os.getloadavg(), "table": table}
    out = Path(args.out) if args.out else HERE / "results" / f"{result['date']}-store.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n(JSON: {out})", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

"""Is the data the bottleneck? Tokens/s of caching activations to disk and reading them back shuffled, sae_nb vs SAELens, against the SAE step.

    python bench/bench_store.py               # blocks.0.hook_resid_post of the default model, batch 4096, 2 rounds
    python bench/bench_store.py --quick       # a small smoke run (1 round)
    python bench/bench_store.py --no-peers    # sae_nb only

Three stages of the data pipeline, each measured for sae_nb's `ActivationStore` and for SAELens's on the
same model, hook, token windows, batch size, buffer size, model batch and shard size (fp32, CPU):
- cache write: the model run over every window and its activations written to disk (sae_nb:
  `ActivationStore(..., cache_dir=...)`, safetensors shards + meta.json; SAELens: `CacheActivationsRunner`,
  HF `datasets` arrow shards);
- cached read, shuffled: batches pulled from a store opened on that cache (sae_nb: blocks read from the
  shards, permuted, half carried into the next round; SAELens: `ActivationsStore(cached_activations_path=...)`
  and its mixing buffer);
- in-memory store: no cache, the model run as batches are pulled (the store `train` uses by default);
- model forward only, no store (a reference): the model run to the hook on the first windows, as each store
  runs it, so that what a store costs beyond its model can be told apart.
SAELens's side runs in the peers' venv (bench/.peers, TransformerLens 3) on the default model rebuilt as a
`HookedTransformer` with sae_nb's weights (bench/peer_store.py; its activations are checked against sae_nb's).
Each side runs in a fresh process per round; rounds alternate who goes first; each figure is the median
over the rounds. The first batch of a store (its first buffer fill) is not timed.

sae_nb.train pulls a batch, then takes a step, one after the other. So a run trains at
1 / (1/store + 1/step) tokens/s, and whichever of the two is slower sets the pace. A sweep writes the
cache once and reads it back in every run: the cached read against the step answers whether the
data is the bottleneck of a sweep.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

import harness
from bench_step import HERE, PEERS_PYTHON, fmt, machine, ours_versions, sae_nb_builder
from sae_nb.data import ActivationStore, hook_activations
from sae_nb import lm

STAGES = ("cache_write", "cached_read", "in_memory", "forward")
STAGE_LABELS = {"cache_write": "cache write: model forward + write to disk (once per sweep)",
                "cached_read": "cached read, shuffled: store opened on the cache (each run of a sweep)",
                "in_memory": "in-memory store: model forward + shuffle, no cache",
                "forward": "reference: the model's forward to the hook alone, no store"}
N_CHECK_SEQ = 4   # windows on which SAELens's model is checked against sae_nb's


def load_default_model():
    "The trained default model; its random-weight twin (same architecture, same cost) if the weights are not there."
    try:
        return lm.load_model("default", device="cpu"), "default (trained weights)"
    except (FileNotFoundError, OSError) as e:
        print(f"load_model('default') failed ({type(e).__name__}: {e}); using lm.build_default_model(seed=0), "
              "the same architecture with random weights", file=sys.stderr)
        return lm._freeze(lm.build_default_model(seed=0, device="cpu")), "build_default_model(seed=0) (random weights)"


def time_store(store: ActivationStore, n_batches: int) -> float:
    "Seconds to pull `n_batches` batches (model forwards or cache reads, shuffles)."
    t0 = time.perf_counter()
    for _ in range(n_batches): next(store)
    return time.perf_counter() - t0


def time_pulls(store: ActivationStore, n_batches: int, open_s: float) -> dict:
    "The first batch (the first refill), not in the rate, then `n_batches` batches timed: a stage's result."
    t0 = time.perf_counter()
    next(store)
    first_s = time.perf_counter() - t0
    seconds = time_store(store, n_batches)
    n = n_batches * store.batch_size
    return {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds, "open_s": open_s, "first_batch_s": first_s}


def store_versions() -> dict:
    return {**ours_versions(), "transformer-lens": version("transformer-lens")}   # the model runs on TransformerLens


# -- what both sides share -------------------------------------------------------------------------------
def plan(args, ctx: int) -> dict:
    """The sizes of a run: batches timed, buffer, and the windows, enough that no timed read wraps around the cache,
    rounded up to whole shards (SAELens's cache holds whole shards only)."""
    n_batches = args.refills * 16
    buffer_tokens = 16 * args.batch                                   # ActivationStore's default buffer
    seq_per_shard = args.shard_tokens // ctx
    if args.shard_tokens % (args.model_batch_size * ctx):
        raise SystemExit(f"--shard-tokens must be a multiple of model_batch_size * ctx = {args.model_batch_size * ctx}")
    n_seq = (n_batches + 16) * args.batch // ctx + 64
    n_seq = math.ceil(n_seq / seq_per_shard) * seq_per_shard
    return dict(n_batches=n_batches, buffer_tokens=buffer_tokens, n_seq=n_seq, ctx=ctx, n_tokens=n_seq * ctx)


def write_shared(path: Path, model, tokens: torch.Tensor, hook: str) -> int:
    """What the workers need, in one torch.save file: the tokens, the model's config and weights, sae_nb's activations
    at the hook on the first windows (SAELens's model is checked against them). Returns d_in."""
    cfg = model.cfg
    fields = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_vocab_out", "act_fn",
              "normalization_type", "positional_embedding_type", "eps", "use_attn_scale", "attn_scale", "attention_dir",
              "final_rms", "gated_mlp", "attn_only", "n_key_value_heads", "attn_scores_soft_cap",
              "output_logits_soft_cap", "model_name")
    check = tokens[:N_CHECK_SEQ]
    acts = hook_activations(model, check, hook)
    torch.save({"tokens": tokens, "config": {k: getattr(cfg, k) for k in fields},
                "state": {k: p.detach().clone() for k, p in lm.native_parameters(model).items()},
                "check_tokens": check, "check_acts": acts, "check_logits": model(check).detach()}, path)
    return acts.shape[1]


# -- sae_nb's side -------------------------------------------------------------------------------------------
def sae_nb_stages(model, tokens: torch.Tensor, args, sizes: dict, workdir: Path) -> dict:
    "The stages of sae_nb's ActivationStore, and its model's forward alone: {stage: {tokens_per_s, seconds, tokens, ...}}."
    kw = dict(batch_size=args.batch, model_batch_size=args.model_batch_size, progress=False)
    cache, out = workdir / "sae_nb_cache", {}
    try:
        t0 = time.perf_counter()                   # one pass of the model over every window, shards written, meta.json
        store = ActivationStore(model, args.hook, tokens, cache_dir=cache, shard_tokens=args.shard_tokens, **kw)
        seconds = time.perf_counter() - t0
        n = store.meta["n_tokens"]
        out["cache_write"] = {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds,
                              "n_shards": len(store.meta["shards"]),
                              "bytes_on_disk": sum(f.stat().st_size for f in cache.iterdir())}
        t0 = time.perf_counter()                   # meta.json read and checked against the tokens
        store = ActivationStore(model, args.hook, tokens, cache_dir=cache, **kw)
        out["cached_read"] = time_pulls(store, sizes["n_batches"], time.perf_counter() - t0)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()                       # the act_scale probe: n_norm_tokens of forwards
    store = ActivationStore(model, args.hook, tokens, **kw)
    out["in_memory"] = time_pulls(store, sizes["n_batches"], time.perf_counter() - t0)
    mbs, seqs = args.model_batch_size, tokens[:args.forward_batches * args.model_batch_size]
    hook_activations(model, seqs[:mbs], args.hook)       # warm-up, not timed
    t0 = time.perf_counter()                             # the store's own call: run_with_cache with stop_at_layer
    for a in range(0, len(seqs), mbs): hook_activations(model, seqs[a:a + mbs], args.hook)
    seconds = time.perf_counter() - t0
    out["forward"] = {"seconds": seconds, "tokens": seqs.numel(), "tokens_per_s": seqs.numel() / seconds}
    return out


def sae_nb_worker(args, model=None) -> dict:
    "One measurement of sae_nb's stages on the shared tokens (a worker process, or this one with --in-process)."
    harness.setup("cpu")
    model = model if model is not None else load_default_model()[0]
    tokens = torch.load(args.data, weights_only=True)["tokens"]
    sizes = plan(args, tokens.shape[1])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    return {"impl": "sae_nb", "versions": store_versions(), "stages": sae_nb_stages(model, tokens, args, sizes, work)}


# -- running the workers ---------------------------------------------------------------------------------------
def worker_flags(args) -> list[str]:
    "The sizes every worker is given, the same for both sides."
    return ["--hook", args.hook, "--batch", str(args.batch), "--model-batch-size", str(args.model_batch_size),
            "--shard-tokens", str(args.shard_tokens), "--forward-batches", str(args.forward_batches)]


def run_process(cmd: list[str], env_extra: dict, what: str) -> dict:
    "Run a worker; its last stdout line is its JSON result."
    env = {**os.environ, "OMP_NUM_THREADS": str(harness.THREADS), **env_extra}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_sae_nb(args, data: Path, workdir: Path, model) -> dict:
    if args.in_process:
        ns = argparse.Namespace(**{**vars(args), "data": str(data), "workdir": str(workdir)})
        return sae_nb_worker(ns, model)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data", str(data), "--workdir", str(workdir),
           "--refills", str(args.refills), *worker_flags(args)]
    # the worker imports sae_nb from this checkout (bench/..), as the parent does when run from it
    path = os.pathsep.join([str(HERE), str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return run_process(cmd, {"PYTHONPATH": path}, "sae_nb store worker")


def run_saelens(args, sizes: dict, data: Path, workdir: Path) -> dict:
    cmd = [args.peers_python, str(HERE / "peer_store.py"), "--data", str(data), "--workdir", str(workdir),
           "--n-batches", str(sizes["n_batches"]), "--buffer-tokens", str(sizes["buffer_tokens"]),
           *worker_flags(args)]
    # HF_HOME in the work dir: whatever HF datasets caches goes with it
    return run_process(cmd, {"PYTHONPATH": str(HERE), "HF_HOME": str(workdir / "hf")}, "SAELens store worker")


# -- the SAE step --------------------------------------------------------------------------------------------
def measure_steps(d_in: int, args) -> tuple[dict, dict]:
    "sae_nb's step on a batch of the store's shape, per variant: ({variant: tokens/s}, shape)."
    shape = dict(d_in=d_in, d_sae=args.expansion * d_in, batch=args.batch, k=args.k)
    harness.CONFIGS["store"] = shape
    step_args = argparse.Namespace(config="store", device="cpu", warmup=2, steps=3 if args.quick else 5,
                                   live_memory=False)   # throughput only: no memory profile
    return {v: harness.measure(sae_nb_builder(v, {}), step_args)["tokens_per_s"] for v in args.variants}, shape


# -- the report ------------------------------------------------------------------------------------------------
def medians(results: list[dict]) -> dict:
    "{impl: {stage: median tokens/s over the rounds}}."
    by = {}
    for r in results:
        for stage, m in r["stages"].items():
            by.setdefault(r["impl"], {}).setdefault(stage, []).append(m["tokens_per_s"])
    return {impl: {s: statistics.median(v) for s, v in st.items()} for impl, st in by.items()}


def in_series(store: float, step: float) -> str:
    "train()'s rate with this store and this step, one after the other, and which one sets the pace."
    return f"{1 / (1 / store + 1 / step):,.0f} ({'store' if store < step else 'step'}-bound)"


def markdown(meta: dict, med: dict, steps: dict, shape: dict) -> str:
    ours, theirs = med.get("sae_nb", {}), med.get("saelens", {})
    v = meta["versions"]
    eq = meta.get("equivalence")
    lines = [
        f"Activation caching and the activation store, sae_nb vs SAELens, against the SAE step; {meta['date']}, "
        f"{meta['machine']}, CPU fp32, {harness.THREADS} threads, load average {meta['load_before'][0]:.2f} before, "
        f"{meta['load_after'][0]:.2f} after. Versions: torch {v['torch']}, sae_nb {v['sae_nb']} (transformer-lens "
        f"{v['transformer-lens']}), " + (f"sae-lens {v['sae-lens']} (transformer-lens {v['peers transformer-lens']}, "
                                         f"datasets {v['datasets']})." if "sae-lens" in v else "SAELens not measured."),
        f"Model: {meta['model']}, hook {meta['hook']} (d_in {meta['d_in']}); {meta['n_seq']} windows of {meta['ctx']} "
        f"tokens ({meta['n_tokens']:,} tokens cached, shards of {meta['shard_tokens']:,} rows), batch {meta['batch']}, "
        f"buffer {meta['buffer_tokens']:,} tokens, model batch {meta['model_batch_size']} windows; "
        f"{meta['n_batches']} batches timed after the first; median of {meta['rounds']} round{'s' * (meta['rounds'] > 1)}, "
        f"each side in "
        f"{'its own process' if not meta['in_process'] else 'this process (sae_nb)'}, alternating who goes first."
        + (f" SAELens's model: a HookedTransformer with sae_nb's default weights; its activations at the hook differ "
           f"from sae_nb's by at most {eq['max_abs_diff']:.1e} (max |activation| {eq['max_abs_act']:.1f}, "
           f"{eq['n_tokens']} tokens), its logits by {eq['logits_max_abs_diff']:.1e} (max |logit| "
           f"{eq['max_abs_logit']:.1f})." if eq else ""),
        "",
        "| stage | sae_nb tok/s | SAELens tok/s | sae_nb / SAELens | "
        + " | ".join(f"train() tok/s with the sae_nb {s} step (store then step, in series)" for s in steps) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(steps),
    ]
    for stage in STAGES:
        a, b = ours.get(stage), theirs.get(stage)
        trains = ["–" if stage in ("cache_write", "forward") or a is None else in_series(a, t) for t in steps.values()]
        lines.append(f"| {STAGE_LABELS[stage]} | {fmt(a)} | {fmt(b)} | {fmt(a / b if a and b else None, '{:.2f}x')} | "
                     + " | ".join(trains) + " |")
    for name, t in steps.items():
        lines.append(f"| sae_nb {name} step, d_sae {shape['d_sae']}, k {shape['k']} | {fmt(t)} | | | "
                     + " | ".join("" for _ in steps) + " |")
    lines += ["", verdict(meta, med, steps)]
    return "\n".join(lines)


def verdict(meta: dict, med: dict, steps: dict) -> str:
    "The answer to 'is the data the bottleneck of a sweep?' in one paragraph."
    fastest = max(steps, key=steps.get)
    step = steps[fastest]
    out = []
    for impl, name in (("sae_nb", "sae_nb"), ("saelens", "SAELens")):
        m = med.get(impl)
        if not m: continue
        w, r = m["cache_write"], m["cached_read"]
        out.append(f"{name}: the cache is written once per sweep ({meta['n_tokens']:,} tokens in "
                   f"{meta['n_tokens'] / w:.1f} s, {w:,.0f} tok/s), then each run reads it back shuffled at {r:,.0f} tok/s, "
                   f"{r / step:.2f}x the fastest sae_nb step measured ({fastest}, {step:,.0f} tok/s, the most demanding "
                   "on the data): " + ("the data is not the bottleneck of a sweep." if r > step
                                       else "the data IS the bottleneck of a sweep."))
    if "saelens" in med and "sae_nb" in med:
        a, b = med["sae_nb"]["forward"], med["saelens"]["forward"]
        out.append(f"The model's forward to the hook alone runs at {a:,.0f} tok/s in sae_nb (TransformerBridge) and "
                   f"{b:,.0f} tok/s in SAELens's HookedTransformer ({a / b:.2f}x): that much of the gap in the stages that "
                   "run the model is the model's, not the store's.")
    return " ".join(out)


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hook", default="blocks.0.hook_resid_post")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--refills", type=int, default=3, help="buffer refills timed (16 batches each)")
    p.add_argument("--model-batch-size", type=int, default=32, help="windows per model forward, both sides")
    p.add_argument("--shard-tokens", type=int, default=65536, help="rows per cache shard, both sides (sae_nb's default)")
    p.add_argument("--forward-batches", type=int, default=8, help="model batches timed for the forward-only reference")
    p.add_argument("--rounds", type=int, default=None, help="rounds of both sides' measurements (default 2; 1 with --quick)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in for the SAE step")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["topk", "relu"])
    p.add_argument("--quick", action="store_true", help="batch 512, one refill, shards of 8192 rows, 2 forward batches, 1 round")
    p.add_argument("--no-peers", action="store_true", help="sae_nb only")
    p.add_argument("--in-process", action="store_true", help="measure sae_nb in this process (smoke test)")
    p.add_argument("--peers-python", default=str(PEERS_PYTHON), help="python of the peers' venv (bench/setup_peers.sh)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-store.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # worker mode: sae_nb's stages, one JSON line
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick: args.batch, args.refills, args.shard_tokens, args.forward_batches = 512, 1, 8192, 2
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.worker:
        print(json.dumps(sae_nb_worker(args)))
        return

    harness.setup("cpu")
    load_before = os.getloadavg()
    t_start = time.time()
    peers = not args.no_peers
    if peers and not Path(args.peers_python).exists():
        print(f"no peers python at {args.peers_python} (bash bench/setup_peers.sh, or --peers-python PATH): "
              "measuring sae_nb only", file=sys.stderr)
        peers = False

    model, model_name = load_default_model()
    ctx = model.cfg.n_ctx
    sizes = plan(args, ctx)
    tokens = lm.default_tokens(sizes["n_seq"], ctx=ctx, seed=0)
    results, equivalence, peer_versions = [], None, {}
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        data = Path(tmp) / "shared.pt"
        d_in = write_shared(data, model, tokens, args.hook)
        for r in range(args.rounds):
            jobs = ["sae_nb", "saelens"] if peers else ["sae_nb"]
            if r % 2: jobs = jobs[::-1]                                # alternate who goes first
            for impl in jobs:
                workdir = Path(tmp) / f"{impl}-{r}"
                res = run_sae_nb(args, data, workdir, model) if impl == "sae_nb" else \
                    run_saelens(args, sizes, data, workdir)
                if impl == "saelens":
                    equivalence, peer_versions = {**res["equivalence"], "model": res["model"]}, res["versions"]
                res["round"] = r
                results.append(res)
                print(f"round {r + 1}/{args.rounds} {impl:8s} " + "  ".join(
                    f"{s} {m['tokens_per_s']:10,.0f} tok/s" for s, m in res["stages"].items()), file=sys.stderr)

    steps, shape = measure_steps(d_in, args)
    return report(args, dict(model=model_name, d_in=d_in, **sizes), results, equivalence, peer_versions, steps, shape,
                  load_before, t_start)


def report(args, run: dict, results, equivalence, peer_versions, steps, shape, load_before, t_start) -> dict:
    "Print the markdown table and write the JSON: the settings, every worker's result, the medians, the table."
    versions = store_versions()
    if peer_versions:
        versions.update({"sae-lens": peer_versions["sae-lens"], "peers transformer-lens": peer_versions["transformer-lens"],
                         "datasets": peer_versions["datasets"], "peers torch": peer_versions["torch"]})
    date = dt.date.today().isoformat()
    meta = {"date": date, "time": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "threads": harness.THREADS, "load_before": load_before, "load_after": os.getloadavg(),
            "wall_s": time.time() - t_start, "versions": versions, "hook": args.hook, "batch": args.batch,
            "model_batch_size": args.model_batch_size, "shard_tokens": args.shard_tokens, "rounds": args.rounds,
            "in_process": args.in_process, "quick": args.quick, "equivalence": equivalence, **run}
    med = medians(results)
    table = markdown(meta, med, steps, shape)
    print(table)
    ours = med["sae_nb"]
    result = {"meta": meta, "medians_tok_s": med, "step_tok_s": steps, "shape": shape, "results": results,
              "table": table, "args": vars(args),
              # the fields of the earlier, store-only JSON
              "date": date, "machine": meta["machine"], "model": run["model"], "hook": args.hook, "d_in": run["d_in"],
              "n_batches": run["n_batches"], "store_tok_s": ours["in_memory"],
              "store_setup_s": statistics.median(r["stages"]["in_memory"]["open_s"] for r in results
                                                 if r["impl"] == "sae_nb")}
    out = Path(args.out) if args.out else HERE / "results" / f"{date}-store.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n(JSON: {out})", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

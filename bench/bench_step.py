"""Tokens per second of one full SAE training step: sae_nb's variants against SAELens and EleutherAI sparsify.

    python bench/bench_step.py                   # default shape: d_in 512, d_sae 4096, batch 4096, k 32
    python bench/bench_step.py --config large    # d_in 768, d_sae 16 x 768
    python bench/bench_step.py --device cuda --config wide   # d_in 768, d_sae 32 x 768 (xl: d_in 2048, d_sae 16384, k 64)
    python bench/bench_step.py --shape 1024 8192 32 --batch 2048   # any shape: D_IN D_SAE K (and rows per step)
    python bench/bench_step.py --quick --no-peers --in-process   # the smoke run of tests/test_bench.py

Every measurement runs in a fresh process (ours with this python, the peers with bench/.peers/venv's,
built by bench/setup_peers.sh) on the same batch, shape, dtype and thread count; rounds alternate
ours and theirs so that machine noise hits both, and each number is the median over the rounds of
the median step time in a process, after untimed warm-up steps. The same run measures the matmul
peak on the encoder's shape and reports each step against the dense roofline (10 d_in d_sae FLOPs
per token), its live tensor peak (torch.profiler's allocation events on CPU, max_memory_allocated on CUDA)
against a per-variant floor (params + Adam state + one batch of inputs + the active latents), and,
in a column of its own, the process's RSS peak.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

import harness
from sae_nb.train import (TrainConfig, build_run, count_firing, ramp, resolve_config, retain_freed_memory,
                          train_step, training_scale)

HERE = Path(__file__).resolve().parent
PEERS_PYTHON = HERE / ".peers" / "venv" / "bin" / "python"
VARIANTS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
SAELENS_NAME = {"relu": "Standard", "topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU",
                "gated": "Gated", "matryoshka": "MatryoshkaBatchTopK"}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
# the benchmark opts in to retain_freed_memory (train's default is off), and its batch is already at the training scale
# (harness.make_batch: mean squared norm d_in), so it trains on it as it is: act_scale 1, as training_scale gives it
BENCH_TRAIN_KWARGS = {"retain_cpu_memory": True, "normalise": False}


# -- sae_nb's step: what sae_nb.train.train does for one batch ----------------------------------------------------
def sae_nb_builder(variant: str, sae_kwargs: dict, train_kwargs: dict | None = None, sparsity: str = "init"):
    def build(shape, x, dead_mask, autocast):
        batch = shape["batch"]
        sae_fields = {"variant": variant, "d_in": shape["d_in"], "d_sae": shape["d_sae"], "k": shape["k"], **sae_kwargs}
        cfg = resolve_config(TrainConfig(**sae_fields, batch_size=batch, total_tokens=1_000_000 * batch, progress=False,
                                         **{**BENCH_TRAIN_KWARGS, **(train_kwargs or {})}), x)
        if x.device.type == "cpu" and cfg.retain_cpu_memory: retain_freed_memory()   # as train() does when opted in
        # train's own set-up: the training scale, then the SAE (cfg.sae_config), Adam, the schedule, the loss, the counters
        run = build_run(cfg, training_scale(cfg, x, x), x.device)
        sae, tokens_since_fired = run.sae, run.tokens_since_fired
        sae.init_b_dec(x, cfg.b_dec_init)   # train's first step only: not timed
        if sparsity == "trained": set_trained_sparsity(sae, x, shape["k"])
        state = {"step": 0}

        def step():   # the body of train()'s loop, single process, without the logging every log_every steps
            tokens_since_fired.masked_fill_(dead_mask, cfg.dead_tokens_threshold)   # the pinned dead latents
            xb = x.to(x.device, torch.float32, non_blocking=True)
            if not torch.isfinite(xb).all(): raise ValueError("non-finite batch")
            sparsity_scale = ramp(state["step"], cfg.sparsity_warmup_steps)
            dead = tokens_since_fired >= cfg.dead_tokens_threshold
            out = train_step(run.loss, run.opt, run.sched, xb, dead, sparsity_scale, cfg.grad_clip, autocast, state["step"])
            state["step"] += 1
            count_firing(tokens_since_fired, run.window_fired, out.fired, batch)
        return step
    return build


@torch.no_grad()
def set_trained_sparsity(sae, x, k: int):
    "Give a relu / jumprelu / gated SAE the sparsity of a trained one: each latent fires on about k/d_sae of the rows of x."
    if sae.cfg.variant not in ("relu", "jumprelu", "gated"): return
    pre = sae.pre_acts(x) - sae.b_enc                                    # [batch, d_sae] without the encoder bias
    q = torch.quantile(pre[: min(len(pre), 4096)].float(), 1 - k / sae.cfg.d_sae, dim=0).to(pre.dtype)  # per latent
    if sae.cfg.variant == "jumprelu":                                   # thresholds, with b_enc = 0
        sae.log_threshold.copy_(q.clamp_min(1e-3).log())
    else:                                                               # relu: pre-activation; gated: the gate
        sae.b_enc.copy_(-q)


def ours_versions() -> dict:
    return {p: version(p) for p in ("torch", "sae_nb")}


# -- the matmul peak -----------------------------------------------------------------------------------------------
def matmul_peak(shape: dict, device: str, reps: int = 5) -> float:
    "Best FLOP/s of x [batch, d_in] @ W_enc [d_in, d_sae] (fp32 on CPU, bf16 on CUDA), fresh tensors, 2 threads."
    autocast = harness.setup(device)
    x = harness.make_batch(shape["d_in"], shape["batch"], device)
    w = torch.randn(shape["d_in"], shape["d_sae"], device=device)
    with autocast:
        times = harness.time_steps(lambda: x @ w, device, warmup=2, steps=reps)
    return 2 * shape["batch"] * shape["d_in"] * shape["d_sae"] / min(times)


# -- running the workers -------------------------------------------------------------------------------------------
def run_worker(python: str, script: Path, impl: str, variant: str, args, extra=()) -> dict:
    cmd = [python, str(script), "--impl", impl, "--variant", variant, "--config", args.config, "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps), *harness.shape_flags(args), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(harness.THREADS), "PYTHONPATH": str(HERE)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if p.returncode != 0:
        raise RuntimeError(f"{impl} {variant} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_in_process(impl, variant, args) -> dict:
    "Our step measured in this process (the smoke test: no process start-up; memory is only indicative)."
    out = harness.measure(sae_nb_builder(variant, parse_kw(args.sae_kw), parse_kw(args.train_kw), args.sparsity), args)
    return {"impl": impl, "variant": variant, "versions": ours_versions(), **out}


def parse_kw(items) -> dict:
    "`key=value` pairs (values parsed as JSON when they can be) for make_sae."
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try: out[key] = json.loads(value)
        except json.JSONDecodeError: out[key] = value
    return out


def jobs_of_round(variants, peers: bool) -> list[tuple[str, str]]:
    "(impl, variant) pairs measured in one round: ours and the peers' same variant next to each other."
    jobs = []
    for v in variants:
        jobs.append(("sae_nb", v))
        if peers:
            jobs.append(("saelens", v))
            if v == "topk": jobs.append(("sparsify", "topk"))
    if peers and "topk" not in variants: jobs.append(("sparsify", "topk"))
    return jobs


# -- the report ----------------------------------------------------------------------------------------------------
MEMORY_GOAL = {**{v: 1.3 for v in TOPK_FAMILY}, "relu": 1.6, "jumprelu": 1.6, "gated": 1.6}   # live peak / floor


def n_params(shape: dict, variant: str = "relu") -> int:
    "sae_nb's parameters: W_enc, b_enc, W_dec, b_dec; JumpReLU adds log_threshold [d_sae], Gated r_mag and b_mag [d_sae]."
    d_in, d_sae = shape["d_in"], shape["d_sae"]
    extra = {"jumprelu": 1, "gated": 2}.get(variant, 0) * d_sae
    return 2 * d_in * d_sae + d_sae + d_in + extra


def floor_parts(shape: dict, variant: str = "relu") -> dict:
    """What a step must hold, fp32: parameters, Adam's two moments (2x params), one batch of inputs [batch, d_in], and the
    active latents: [batch, k] values (fp32) + indices (int64) for the TopK family, [batch, d_sae] for the dense variants
    (at initialisation about half of them are active)."""
    b, p = shape["batch"], n_params(shape, variant)
    latents = b * shape["k"] * (4 + 8) if variant in TOPK_FAMILY else 4 * b * shape["d_sae"]
    return {"parameters": 4 * p, "adam moments": 8 * p, "batch": 4 * b * shape["d_in"], "latents": latents}


def floor_bytes(shape: dict, variant: str = "relu") -> int:
    "The floor of `floor_parts`, in bytes."
    return sum(floor_parts(shape, variant).values())


def summarise(results: list[dict], shape: dict, peak_flops: float, variants) -> list[dict]:
    "One row per variant: median tokens/s of each implementation, ratios, roofline fraction, memory."
    by = {}
    for r in results:
        by.setdefault((r["impl"], r["variant"]), []).append(r)
    med = {key: statistics.median(r["tokens_per_s"] for r in rs) for key, rs in by.items()}
    def mem_of(field):   # median MB over rounds of one memory field, per (impl, variant); absent in older JSONs
        return {key: statistics.median(r[field] for r in rs) / 2**20 for key, rs in by.items()
                if all(r.get(field) is not None for r in rs)}
    mem, live, rss = mem_of("peak_bytes"), mem_of("live_peak_bytes"), mem_of("rss_peak_bytes")
    roofline = peak_flops / (10 * shape["d_in"] * shape["d_sae"])
    sparsify_topk = med.get(("sparsify", "topk"))
    rows = []
    for v in variants:
        ours = med[("sae_nb", v)]
        saelens = med.get(("saelens", v))
        same = [t for t in (saelens, sparsify_topk if v in ("topk", "matryoshka") else None) if t]
        best = max(same) if same else None
        floor_mb = floor_bytes(shape, v) / 2**20
        ours_live = live.get(("sae_nb", v))
        breakdown = next((r["live"] for r in by[("sae_nb", v)] if r.get("live")), None)   # the first round's
        rows.append({
            "variant": v, "sae_nb_tok_s": ours, "roofline_fraction": ours / roofline,
            "saelens_tok_s": saelens, "sparsify_topk_tok_s": sparsify_topk, "best_peer_tok_s": best,
            "ratio_best_peer": ours / best if best else None,
            "ratio_sparsify_topk": ours / sparsify_topk if sparsify_topk else None,
            "ratio_saelens": ours / saelens if saelens else None,
            "sae_nb_peak_mb": mem[("sae_nb", v)],              # as before: RSS high-water mark (CPU), max_memory_allocated (CUDA)
            "saelens_peak_mb": mem.get(("saelens", v)),
            "sparsify_topk_peak_mb": mem.get(("sparsify", "topk")),
            "sae_nb_live_peak_mb": ours_live, "saelens_live_peak_mb": live.get(("saelens", v)),
            "sparsify_topk_live_peak_mb": live.get(("sparsify", "topk")),
            "sae_nb_rss_peak_mb": rss.get(("sae_nb", v)), "saelens_rss_peak_mb": rss.get(("saelens", v)),
            "sparsify_topk_rss_peak_mb": rss.get(("sparsify", "topk")),
            "floor_mb": floor_mb, "floor_parts_mb": {k: n / 2**20 for k, n in floor_parts(shape, v).items()},
            "live_over_floor": ours_live / floor_mb if ours_live is not None else None,
            "memory_goal": MEMORY_GOAL[v],
            "sae_nb_live_breakdown": breakdown,
        })
    return rows


def fmt(v, spec="{:,.0f}", none="–"):
    return none if v is None else spec.format(v)


def markdown(rows: list[dict], meta: dict) -> str:
    s = meta["shape"]
    lines = [
        f"Step throughput, {meta['date']}, {meta['machine']}, {meta['device']} "
        f"({'fp32' if meta['device'] == 'cpu' else 'bf16 autocast'}), {harness.THREADS} threads; "
        f"d_in {s['d_in']}, d_sae {s['d_sae']}, batch {s['batch']}, k {s['k']}; "
        f"median of {meta['rounds']} rounds x {meta['steps']} steps (after {meta['warmup']} warm-up); "
        f"load average {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after.",
        f"Matmul peak on the encoder's shape: {meta['peak_gflops']:.1f} GFLOP/s -> dense roofline "
        f"{meta['roofline_tok_s']:,.0f} tokens/s (10 d_in d_sae FLOPs per token). Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "| variant | sae_nb tok/s | of roofline | SAELens tok/s | sparsify TopK tok/s | sae_nb / best peer "
        "| sae_nb / sparsify TopK | sae_nb live peak MB | floor MB | live / floor (goal) | sae_nb RSS peak MB "
        "| SAELens live peak MB | SAELens RSS peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cuda = meta["device"] != "cpu"
    for r in rows:
        live, ratio = r.get("sae_nb_live_peak_mb"), r.get("live_over_floor")
        verdict = "" if ratio is None else (" ok" if ratio <= r["memory_goal"] else " over")
        lines.append(
            f"| {r['variant']} | {fmt(r['sae_nb_tok_s'])} | {fmt(r['roofline_fraction'], '{:.0%}')} "
            f"| {fmt(r['saelens_tok_s'])} | {fmt(r['sparsify_topk_tok_s'])} | {fmt(r['ratio_best_peer'], '{:.2f}x')} "
            f"| {fmt(r['ratio_sparsify_topk'], '{:.2f}x')} | {fmt(live, '{:,.1f}')} | {fmt(r['floor_mb'], '{:,.1f}')} "
            f"| {fmt(ratio, '{:.2f}x')} (<= {r['memory_goal']}x{verdict}) "
            f"| {fmt(r.get('sae_nb_rss_peak_mb') if not cuda else None)} "
            f"| {fmt(r.get('saelens_live_peak_mb'), '{:,.1f}')} | {fmt(r.get('saelens_rss_peak_mb') if not cuda else None)} |")
    lines.append("")
    lines.append("Live peak: bytes of tensors alive at the worst moment of one training step, by tensor accounting "
                 + ("(torch.cuda.max_memory_allocated). " if cuda else
                    "(torch.profiler's allocation events over the step, on top of the tensors alive at its start). ")
                 + "Floor: params + Adam moments (2x params) + one batch of inputs [batch, d_in] + the active latents "
                 "([batch, k] values and int64 indices for the TopK family, [batch, d_sae] for the dense variants), fp32. "
                 + ("RSS peak: not measured on CUDA." if cuda else
                    "RSS peak: the process's RSS high-water mark above its level before the SAE was built, freed memory "
                    "retained by `retain_freed_memory` included."))
    if rows and rows[0].get("sparsify_topk_peak_mb") is not None:
        lines.append("")
        lines.append(f"sparsify TopK peak memory: live {fmt(rows[0].get('sparsify_topk_live_peak_mb'), '{:,.1f}')} MB, "
                     f"RSS {fmt(rows[0].get('sparsify_topk_rss_peak_mb'))} MB. "
                     "Best peer: the faster of SAELens's same variant and, for topk and matryoshka, sparsify TopK.")
    breakdown = live_breakdown(rows)
    if breakdown: lines += ["", breakdown]
    return "\n".join(lines)


def live_breakdown(rows: list[dict], top: int = 4) -> str:
    "What is alive at each sae_nb variant's live peak: the tensors alive at the step's start, by category, and the largest blocks the step allocated."
    out = []
    for r in rows:
        b = r.get("sae_nb_live_breakdown")
        if not b: continue
        mb = lambda n: f"{n / 2**20:,.1f}"
        cats = ", ".join(f"{c} {mb(n)}" for c, n in sorted(b["base_by_category"].items(), key=lambda kv: -kv[1]))
        line = (f"- **{r['variant']}**: live peak {mb(b['peak_bytes'])} MB = alive at the step's start "
                f"{mb(b['base_bytes'])} MB ({cats}) + {mb(b['step_bytes_at_peak'])} MB the step allocated")
        if b.get("n_step_blocks_at_peak") is not None:
            blocks = "; ".join(f"{mb(x['bytes'])} MB {x['shape']} from {x['op']}" for x in b["step_blocks_at_peak"][:top])
            line += (f" ({b['n_step_blocks_at_peak']} blocks alive, peak reached in {b['at']}; largest: {blocks})")
        out.append(line)
    if not out: return ""
    return ("What is alive at the live peak (MB; shapes inferred from the block sizes, dimensions in the order "
            "batch, d_in, d_sae, k, n_dead; op: the step's outermost op > the allocating op):\n" + "\n".join(out))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    return f"{cpu}, {os.cpu_count()} cores"


def profile(args):
    "Where one sae_nb step spends its time: torch.profiler's table of ops, by self CPU time."
    autocast = harness.setup(args.device)
    shape = harness.shape_of(args)
    x = harness.make_batch(shape["d_in"], shape["batch"], args.device)
    build = sae_nb_builder(args.profile, parse_kw(args.sae_kw), parse_kw(args.train_kw), args.sparsity)
    step = build(shape, x, harness.make_dead_mask(shape["d_sae"], args.device), autocast)
    harness.time_steps(step, args.device, args.warmup, 0)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device != "cpu" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps): step()
        harness.sync(args.device)
    print(f"{args.profile}, {args.config} shape {shape}, {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total" if args.device == "cpu" else "self_cuda_time_total", row_limit=25))


# -- main ----------------------------------------------------------------------------------------------------------
def config_label(args) -> str:
    "The config's name, or the shape itself when --shape or --batch overrides it: d768-s24576-k32(-b2048)."
    if not (args.shape or args.batch): return args.config
    s = harness.shape_of(args)
    return f"d{s['d_in']}-s{s['d_sae']}-k{s['k']}" + (f"-b{s['batch']}" if args.batch else "")


def check_shape(parser, args):
    "Positive sizes, k within d_sae: an argparse error otherwise."
    s = harness.shape_of(args)
    if min(s.values()) < 1: parser.error(f"--shape/--batch: sizes must be positive, got {s}")
    if s["k"] > s["d_sae"]: parser.error(f"--shape: k ({s['k']}) must be at most d_sae ({s['d_sae']})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default", choices=list(harness.CONFIGS))
    p.add_argument("--quick", action="store_true", help="the small smoke shape (same as --config quick)")
    harness.add_shape_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=None, help="rounds of all measurements (default 3; 2 for large)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 5; 3 for large)")
    p.add_argument("--no-peers", action="store_true", help="measure sae_nb only")
    p.add_argument("--in-process", action="store_true", help="measure sae_nb in this process (smoke test)")
    p.add_argument("--sae-kw", nargs="*", default=[], metavar="KEY=VALUE", help="extra make_sae fields, e.g. sparse_step=false")
    p.add_argument("--train-kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig fields of sae_nb's step, e.g. retain_cpu_memory=false")
    p.add_argument("--sparsity", default="init", choices=("init", "trained"),
                   help="sae_nb relu/jumprelu/gated: random init, or biases/thresholds set so that L0 is about k")
    p.add_argument("--peers-python", default=str(PEERS_PYTHON))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<date>.json)")
    p.add_argument("--summarise", metavar="JSON", help="print the table of an interrupted run from its partial JSON")
    p.add_argument("--profile", choices=VARIANTS, help="print torch.profiler's op table of one sae_nb step and stop")
    p.add_argument("--impl", help=argparse.SUPPRESS)   # worker mode: one measurement, one JSON line
    args, rest = p.parse_known_args(argv)
    if args.quick: args.config = "quick"
    check_shape(p, args)
    large = args.config in ("large", "wide", "xl")
    args.rounds = args.rounds or (2 if large else 3)
    args.steps = args.steps or (3 if large else 5)

    if args.impl is not None:   # a worker process
        harness.worker_main(sys.argv[1:] if argv is None else argv,
                            {("sae_nb", v): sae_nb_builder(v, parse_kw(args.sae_kw), parse_kw(args.train_kw), args.sparsity)
                             for v in VARIANTS}, ours_versions())
        return

    if args.profile:
        return profile(args)
    if args.summarise:   # the table of an interrupted run, from the JSON it wrote after each measurement
        saved = json.loads(Path(args.summarise).read_text())
        for key in ("config", "device", "steps", "warmup", "sae_kw", "in_process"): setattr(args, key, saved["args"][key])
        for key, default in (("train_kw", []), ("sparsity", "init"), ("shape", None), ("batch", None)):
            setattr(args, key, saved["args"].get(key, default))
        versions = next((r["versions"] for r in saved["results"] if r["impl"] != "sae_nb"), {})
        return report(args, harness.shape_of(args), saved["peaks"], saved["results"], versions,
                      (float("nan"),) * 3, time.time(), Path(args.summarise))
    peers = not args.no_peers
    if peers and not Path(args.peers_python).exists():
        sys.exit(f"no peers venv at {args.peers_python}: run `bash bench/setup_peers.sh`, or pass --no-peers")
    shape = harness.shape_of(args)
    load_before = os.getloadavg()
    t_start = time.time()
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else HERE / "results" / f"{date}-{config_label(args)}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results, peaks, peer_versions = [], [], {}
    for r in range(args.rounds):
        jobs = jobs_of_round(args.variants, peers)
        if r % 2: jobs = jobs[::-1]            # alternate who goes first
        peaks.append(matmul_peak(shape, args.device))
        for impl, variant in jobs:
            if impl == "sae_nb":
                extra = [x for kv in args.sae_kw for x in ("--sae-kw", kv)] + \
                        [x for kv in args.train_kw for x in ("--train-kw", kv)] + ["--sparsity", args.sparsity]
                res = run_in_process(impl, variant, args) if args.in_process else \
                    run_worker(sys.executable, Path(__file__).resolve(), impl, variant, args, extra)
            else:
                res = run_worker(args.peers_python, HERE / "peer_step.py", impl, variant, args)
                peer_versions = res["versions"]
            res["round"] = r
            results.append(res)
            out.write_text(json.dumps({"partial": True, "args": vars(args), "shape": shape, "peaks": peaks,
                                       "results": results}))
            live = res.get("live_peak_bytes")
            print(f"round {r + 1}/{args.rounds} {impl:8s} {variant:10s} {res['tokens_per_s']:10,.0f} tok/s "
                  f"{res['seconds'] * 1e3:8.1f} ms/step  peak {res['peak_bytes'] / 2**20:7.0f} MB"
                  + (f"  live {live / 2**20:7.1f} MB" if live is not None else ""), file=sys.stderr)
    return report(args, shape, peaks, results, peer_versions, load_before, t_start, out)


def report(args, shape, peaks, results, peer_versions, load_before, t_start, out):
    "Write the JSON and print the markdown table of a finished (or, with --summarise, interrupted) run."
    peak_flops = max(peaks)
    versions = {"torch": torch.__version__, "sae_nb": version("sae_nb")}
    versions.update({k: v for k, v in peer_versions.items() if k != "torch"})
    rounds_done = len({r["round"] for r in results})
    meta = {
        "date": dt.date.today().isoformat(), "time": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "device": args.device, "config": args.config, "label": config_label(args), "shape": shape,
        "threads": harness.THREADS, "rounds": rounds_done, "steps": args.steps, "warmup": args.warmup,
        "dead_fraction": harness.DEAD_FRACTION, "sae_kwargs": parse_kw(args.sae_kw),
        "train_kwargs": parse_kw(args.train_kw), "sparsity": args.sparsity,
        "peak_gflops": peak_flops / 1e9, "peak_gflops_rounds": [p / 1e9 for p in peaks],
        "roofline_tok_s": peak_flops / (10 * shape["d_in"] * shape["d_sae"]),
        "load_before": load_before, "load_after": os.getloadavg(), "wall_s": time.time() - t_start,
        "versions": versions, "in_process": args.in_process,
    }
    rows = summarise(results, shape, peak_flops, sorted({r["variant"] for r in results if r["impl"] == "sae_nb"},
                                                        key=VARIANTS.index))
    table = markdown(rows, meta)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "results": results, "table": table, "args": vars(args), "peaks": peaks}, indent=1))
    print(table)
    print(f"\n(JSON: {out})", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()

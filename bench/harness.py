"""What every benchmark process shares: the configs, the input batch, the clock, the memory meter.

Imported by `bench_step.py` (sae_nb's side, project venv) and `peer_step.py` (SAELens and sparsify,
the peers' venv), so both sides build the same data and time it the same way. Needs only torch.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

THREADS = 2   # torch threads in every process (the CI machine has 2 cores)

# name -> shape of the benchmark. warmup steps are not timed.
CONFIGS = {
    "default": dict(d_in=512, d_sae=4096, batch=4096, k=32),
    "large": dict(d_in=768, d_sae=768 * 16, batch=4096, k=32),
    "quick": dict(d_in=64, d_sae=512, batch=256, k=8),
    "wide": dict(d_in=768, d_sae=768 * 32, batch=4096, k=32),    # the GPU check's shapes (bench/gpu_check.sh) ...
    "xl": dict(d_in=2048, d_sae=2048 * 8, batch=4096, k=64),     # ... with "default"
}
SHAPE_KEYS = ("d_in", "d_sae", "k")   # what --shape D_IN D_SAE K sets


def shape_of(args) -> dict:
    "The benchmark's shape: the named `--config`, with `--shape D_IN D_SAE K` and `--batch N` (when given) over it."
    shape = dict(CONFIGS[getattr(args, "config", "default")])
    if getattr(args, "shape", None): shape.update(zip(SHAPE_KEYS, args.shape))
    if getattr(args, "batch", None): shape["batch"] = args.batch
    return shape


def shape_flags(args) -> list[str]:
    "The command-line flags that give a worker process the same shape overrides."
    out = []
    if getattr(args, "shape", None): out += ["--shape", *map(str, args.shape)]
    if getattr(args, "batch", None): out += ["--batch", str(args.batch)]
    return out


def add_shape_args(p):
    "`--shape D_IN D_SAE K` and `--batch N` on an argparse parser (the benchmark's and each worker's)."
    p.add_argument("--shape", nargs=3, type=int, metavar=("D_IN", "D_SAE", "K"), default=None,
                   help="override the config's d_in, d_sae and k")
    p.add_argument("--batch", type=int, default=None, help="override the config's batch (rows per step)")
DEAD_FRACTION = 0.1   # latents pinned dead in every implementation, so that each one runs its AuxK loss


def setup(device: str):
    "Fix the thread count and pick the precision: fp32 on CPU, bf16 autocast on CUDA."
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_batch(d_in: int, batch: int, device: str, seed: int = 0) -> torch.Tensor:
    "The one batch [batch, d_in] every implementation trains on: Gaussian rows with mean square norm d_in."
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=g).to(device)


def make_dead_mask(d_sae: int, device: str, seed: int = 1) -> torch.Tensor:
    "The same pinned set of dead latents [d_sae] (bool) for every implementation."
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(d_sae, generator=g) < DEAD_FRACTION).to(device)


def sync(device: str):
    if device.startswith("cuda"): torch.cuda.synchronize()


# -- peak memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    "Peak memory above a baseline: RSS high-water mark on CPU (Linux), max_memory_allocated on CUDA."
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self):
        if self.cuda:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM (the peak RSS) to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        return self

    def peak_bytes(self) -> int:
        if self.cuda: return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


# -- the clock -------------------------------------------------------------------------------------
def time_steps(step, device: str, warmup: int, steps: int) -> list[float]:
    "Seconds of each of `steps` calls of `step()` after `warmup` untimed calls (device synchronised)."
    for _ in range(warmup): step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(build, args) -> dict:
    "Build the step with `build(shape, x, dead_mask, autocast)`, time it and meter its memory; the worker's result."
    autocast = setup(args.device)
    shape = shape_of(args)
    mem = PeakMemory(args.device).start()   # the SAE, its optimiser state, the batch and the step's transients
    x = make_batch(shape["d_in"], shape["batch"], args.device)
    dead_mask = make_dead_mask(shape["d_sae"], args.device)
    step = build(shape, x, dead_mask, autocast)
    times = time_steps(step, args.device, args.warmup, args.steps)
    t = statistics.median(times)
    return {"seconds": t, "tokens_per_s": shape["batch"] / t, "times": times, "peak_bytes": mem.peak_bytes()}


def worker_main(argv, builders: dict, versions: dict):
    "Command line of a worker process: `--impl NAME --variant V --config C --device D --warmup W --steps N [--shape D_IN D_SAE K] [--batch N]`; prints one JSON line."
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--impl", required=True, choices=sorted({i for i, _ in builders}))
    p.add_argument("--variant", required=True)
    p.add_argument("--config", default="default", choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    add_shape_args(p)
    args, _ = p.parse_known_args(argv)   # the caller may have flags of its own
    if (args.impl, args.variant) not in builders:
        sys.exit(f"{args.impl} has no {args.variant!r} variant here; known: {sorted(builders)}")
    out = measure(builders[args.impl, args.variant], args)
    print(json.dumps({"impl": args.impl, "variant": args.variant, "versions": versions, **out}))

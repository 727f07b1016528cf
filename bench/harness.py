"""What every benchmark process shares: the configs, the input batch, the clock, the memory meters (RSS, live tensors).

Imported by `bench_step.py` (sae_nb's side, project venv) and `peer_step.py` (SAELens and sparsify,
the peers' venv), so both sides build the same data and time it the same way. Needs only torch.
"""
from __future__ import annotations

import gc
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
    "Peak memory above a baseline: RSS high-water mark on CPU (Linux), max_memory_allocated on CUDA (the `peak_bytes` of a result)."
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


# -- the live tensor peak of one step (tensor accounting, not RSS) ----------------------------------------------------
MARK = "bench::measured_step"   # the record_function around the step whose peak is measured
DTYPE_NAMES = {4: "fp32", 8: "int64", 2: "bf16", 1: "bool"}   # element size -> the likely dtype, for the size-inferred shapes


def live_tensors(named: dict | None = None, device: str = "cpu") -> dict:
    """Every tensor storage on `device` reachable from Python now, once per storage: {data_ptr: (bytes, category, description)}.

    Found with `gc.get_objects()` (tensors are gc-tracked) plus each parameter's `.grad`. Categories: "parameters"
    (nn.Parameter), "gradients" (a parameter's .grad), "optimizer state" (in a torch.optim.Optimizer's state),
    the keys of `named` (e.g. {"batch": x}), and "other"."""
    gc.collect()
    objs = gc.get_objects()
    is_tensor = lambda o: issubclass(type(o), torch.Tensor)   # type(), not isinstance: no proxy's __class__ is asked
    found, cat = [], {}
    def add(t, c):
        if is_tensor(t) and t.device.type == torch.device(device).type and t.layout == torch.strided:
            found.append(t)
            cat.setdefault(id(t), c)
    for name, t in (named or {}).items(): add(t, name)
    for o in objs:
        if issubclass(type(o), torch.nn.Parameter):
            add(o, "parameters")
            if o.grad is not None: add(o.grad, "gradients")
    for o in objs:
        if issubclass(type(o), torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values(): add(v, "optimizer state")
    for o in objs:
        if is_tensor(o): add(o, "other")   # setdefault: a tensor categorised above keeps its category
    out = {}
    for t in found:
        st = t.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in out: continue
        out[st.data_ptr()] = (st.nbytes(), cat[id(t)], f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).replace('torch.', '')}")
    return out


def shape_guess(nbytes: int, dims: dict) -> str:
    """A shape for a block of `nbytes` from the benchmark's dimensions (the profiler records sizes, not shapes): '4096x32 int64'.

    A guess: up to three products of one or two of the dimensions (in the order of `dims`, not the tensor's) and an
    element size (4: fp32, 8: int64, 2: bf16, 1: bool) that match, joined by ' or '; '?' when none does."""
    sizes = list(dict.fromkeys(v for v in dims.values() if v and v > 1))   # in the order of `dims`: batch first
    found = []
    for el, name in DTYPE_NAMES.items():
        if nbytes % el: continue
        n = nbytes // el
        if n in sizes: found.append(f"{n} {name}")
        found += [f"{a}x{n // a} {name}" for a in sizes if n % a == 0 and n // a in sizes and n // a in sizes[sizes.index(a):]]
    return " or ".join(dict.fromkeys(found[:3])) or "?"


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def _op_label(e) -> str:
    "The op that made an allocation: 'outermost op of the step > innermost op'."
    ops, p = [], e.parent
    while p is not None and p.name != MARK:
        ops.append(p.name)
        p = p.parent
    if not ops: return "(outside any op)"
    return ops[-1] if len(ops) == 1 else f"{ops[-1]} > {ops[0]}"


def live_peak(step, named: dict | None = None, dims: dict | None = None, top: int = 8) -> dict:
    """Peak bytes of CPU tensors alive during one call of `step()` (after earlier calls), by tensor accounting.

    torch.profiler with profile_memory=True reports every CPU allocation and free (ns timestamp, address, size)
    while it runs; it cannot see the frees of blocks allocated before it started. So: one unmeasured call under the
    profiler (it frees what the calls before left), then the live tensors at the start of the measured call
    (`live_tensors`, plus blocks the profiler saw allocated and not freed that Python cannot reach), then the
    measured call inside a record_function: live bytes = that base + the running sum of its allocations and frees;
    the peak is the maximum. Returns the peak, the base by category, and the largest blocks alive at the peak
    that the measured call allocated (size, a shape inferred from the size and `dims`, the allocating op)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch._C._profiler import _EventType
    gc.collect()
    holder = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        holder["base"] = live_tensors(named)
        with record_function(MARK):
            step()
    evs = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    mark = next(e for e in evs if e.name == MARK)
    allocs = sorted((e for e in evs if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
                    key=lambda e: e.start_time_ns)
    before = [e for e in allocs if e.start_time_ns < mark.start_time_ns]
    during = [e for e in allocs if mark.start_time_ns <= e.start_time_ns <= mark.end_time_ns]
    base = dict(holder["base"])
    unseen = {}   # blocks allocated under the profiler before the measured call, alive at its start
    for e in before:
        f = e.extra_fields
        if f.alloc_size > 0: unseen[f.ptr] = f.alloc_size
        else: unseen.pop(f.ptr, None)
    for ptr, n in unseen.items():
        if ptr not in base: base[ptr] = (n, "held outside Python", "")
    base_bytes = sum(n for n, _, _ in base.values())
    live, peak, peak_i = base_bytes, base_bytes, -1
    for i, e in enumerate(during):
        live += e.extra_fields.alloc_size
        if live > peak: peak, peak_i = live, i
    alive = {}   # blocks the measured call allocated, alive at the peak
    for e in during[:peak_i + 1]:
        f = e.extra_fields
        if f.alloc_size > 0: alive[f.ptr] = (f.alloc_size, _op_label(e))
        else: alive.pop(f.ptr, None)
    by_cat = {}
    for n, c, _ in base.values(): by_cat[c] = by_cat.get(c, 0) + n
    other = sorted((v for v in base.values() if v[1] in ("other", "held outside Python")), reverse=True)[:top]
    blocks = sorted(alive.values(), key=lambda v: -v[0])
    return {
        "peak_bytes": peak, "base_bytes": base_bytes, "base_by_category": by_cat,
        "base_other": [{"bytes": n, "category": c, "tensor": d} for n, c, d in other],
        "step_bytes_at_peak": peak - base_bytes, "n_step_blocks_at_peak": len(blocks),
        "at": _op_label(during[peak_i]) if peak_i >= 0 else "(start of the step)",
        "step_blocks_at_peak": [{"bytes": n, "shape": shape_guess(n, dims or {}), "op": op} for n, op in blocks[:top]],
        "method": "torch.profiler profile_memory (CPU allocation events) + live tensors at the step's start",
    }


def cuda_live_peak(step, named: dict | None = None, device: str = "cuda") -> dict:
    "CUDA: max_memory_allocated over one call of `step()` (the caching allocator counts live tensor bytes), base by category."
    sync(device)
    base = live_tensors(named, device)
    by_cat = {}
    for n, c, _ in base.values(): by_cat[c] = by_cat.get(c, 0) + n
    torch.cuda.reset_peak_memory_stats()
    base_bytes = torch.cuda.memory_allocated()
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "base_bytes": base_bytes, "base_by_category": by_cat, "base_other": [],
            "step_bytes_at_peak": peak - base_bytes, "n_step_blocks_at_peak": None, "at": None, "step_blocks_at_peak": [],
            "method": "torch.cuda.max_memory_allocated over one step"}


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
    peak_bytes = mem.peak_bytes()   # read before the memory measurement's own steps (and the profiler's memory)
    out = {"seconds": t, "tokens_per_s": shape["batch"] / t, "times": times, "peak_bytes": peak_bytes,
           "rss_peak_bytes": None if mem.cuda else peak_bytes}
    if getattr(args, "live_memory", True):   # two more steps, untimed: the live tensor peak of the second
        named = {"batch": x, "dead mask": dead_mask}
        dims = {key: shape[key] for key in ("batch", "d_in", "d_sae", "k")} | {"n_dead": int(dead_mask.sum())}
        live = cuda_live_peak(step, named, args.device) if mem.cuda else live_peak(step, named, dims)
        out.update(live_peak_bytes=live["peak_bytes"], live=live)
    return out


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

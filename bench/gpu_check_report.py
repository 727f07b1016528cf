"""The report of bench/gpu_check.sh: one JSON and one markdown file from a run directory.

    python bench/gpu_check_report.py --run-dir bench/results/gpu-check-<stamp> --out bench/results/gpu-check-<stamp>

Reads the run directory's phases.tsv (phase, status, seconds, budget, log), nvidia-smi.csv, tests.xml (pytest's
JUnit XML) and bench-<shape>.json (bench_step.py's JSON; a run cut short by its time budget leaves the partial
JSON it writes after each measurement, summarised here the same way). Writes <out>.json and <out>.md and prints
the markdown. Needs only the standard library, plus torch and sae_nb to summarise a partial benchmark.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_SHAPES = {"default": dict(d_in=512, d_sae=4096, batch=4096, k=32),   # bench/harness.py's, for a shape
                 "wide": dict(d_in=768, d_sae=24576, batch=4096, k=32),     # whose run left no JSON
                 "xl": dict(d_in=2048, d_sae=16384, batch=4096, k=64)}


def read_phases(run_dir: Path) -> list[dict]:
    path = run_dir / "phases.tsv"
    if not path.exists(): return []
    lines = path.read_text().splitlines()
    keys = lines[0].split("\t")
    return [dict(zip(keys, line.split("\t"))) for line in lines[1:] if line.strip()]


def read_tests(run_dir: Path) -> dict | None:
    "Counts of pytest's JUnit XML: tests, passed, failed, errors, skipped, and the names of the failures."
    path = run_dir / "tests.xml"
    if not path.exists(): return None
    try: root = ET.parse(path).getroot()
    except ET.ParseError as e: return {"error": f"unreadable {path.name}: {e}"}
    cases = root.iter("testcase")
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in cases:
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None: out["failed"] += 1; out["failures"].append(name)
        elif case.find("error") is not None: out["errors"] += 1; out["failures"].append(name)
        elif case.find("skipped") is not None: out["skipped"] += 1
        else: out["passed"] += 1
    return out


def bench_rows(path: Path) -> tuple[dict | None, list[dict], str]:
    "(meta, rows, note) of one bench_step.py JSON, finished or partial."
    if not path.exists(): return None, [], "no result"
    try: saved = json.loads(path.read_text())
    except json.JSONDecodeError as e: return None, [], f"unreadable JSON: {e}"
    if "rows" in saved: return saved["meta"], saved["rows"], ""
    results = saved.get("results", [])
    variants = [v for v in ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
                if any(r["impl"] == "sae_nb" and r["variant"] == v for r in results)]
    if not variants or not saved.get("peaks"): return None, [], "cut short before a measurement of sae_nb"
    sys.path.insert(0, str(HERE))
    import bench_step   # needs torch and sae_nb: the same python that ran the benchmark
    shape = saved.get("shape") or bench_step.harness.shape_of(argparse.Namespace(**saved["args"]))
    peak = max(saved["peaks"])
    rows = bench_step.summarise(results, shape, peak, variants)
    meta = {"shape": shape, "peak_gflops": peak / 1e9, "rounds": len({r["round"] for r in results}),
            "steps": saved["args"].get("steps"), "warmup": saved["args"].get("warmup"),
            "versions": next((r["versions"] for r in results if r["impl"] != "sae_nb"), {})}
    return meta, rows, f"cut short by its time budget: {len(results)} measurements"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ("torch", "sae_nb"):
        try: out[p] = version(p)
        except PackageNotFoundError: out[p] = None
    try:
        import torch
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception as e:   # noqa: BLE001 (the report must come out whatever the python has)
        out["cuda"] = f"torch not importable: {e}"
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=HERE.parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError): out["commit"] = None
    return out


def fmt(v, spec="{:,.0f}"):
    return "–" if v is None else spec.format(v)


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"GPU check, {report['date']}: {report['gpu']}; torch {v.get('torch')} (CUDA {v.get('cuda')}), "
             f"sae_nb {v.get('sae_nb')} at {v.get('commit')}, python {v.get('python')}"
             + "".join(f", {k} {x}" for k, x in report["peer_versions"].items()) + ".",
             "", "| phase | status | seconds | budget s |", "|---|---|---:|---:|"]
    for p in report["phases"]:
        lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['budget']} |")
    t = report["tests"]
    if t and "error" not in t:
        lines += ["", f"CUDA tests (`pytest -m cuda tests/test_cuda.py`): {t['passed']} passed, {t['failed']} failed, "
                      f"{t['errors']} errors, {t['skipped']} skipped."
                  + (" Failing: " + ", ".join(f"`{n}`" for n in t["failures"]) + "." if t["failures"] else "")]
    lines += ["", "Step throughput, bf16 autocast, batch 4096; tokens/s, the median over rounds of each process's "
                  "median step time (bench/bench_step.py --device cuda); roofline: the bf16 matmul peak on the "
                  "encoder's shape / (10 d_in d_sae).", "",
              "| d_in | d_sae | k | variant | sae_nb tok/s | of roofline | SAELens tok/s | sparsify TopK tok/s "
              "| sae_nb / best peer | sae_nb peak MB | SAELens peak MB | note |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in report["bench"]:
        s = b["shape"] or {}
        if not b["rows"]:
            lines.append(f"| {s.get('d_in', '')} | {s.get('d_sae', '')} | {s.get('k', '')} | ({b['config']}) "
                         f"| – | – | – | – | – | – | – | {b['note'] or 'no result'} |")
        for r in b["rows"]:
            lines.append(f"| {s['d_in']} | {s['d_sae']} | {s['k']} | {r['variant']} | {fmt(r['sae_nb_tok_s'])} "
                         f"| {fmt(r['roofline_fraction'], '{:.0%}')} | {fmt(r['saelens_tok_s'])} "
                         f"| {fmt(r['sparsify_topk_tok_s'])} | {fmt(r['ratio_best_peer'], '{:.2f}x')} "
                         f"| {fmt(r['sae_nb_peak_mb'])} | {fmt(r['saelens_peak_mb'])} | {b['note']} |")
    lines += ["", f"Overall: {'every phase passed' if report['passed'] else 'some phase failed'}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--shapes", nargs="+", default=["default", "wide", "xl"])
    args = p.parse_args(argv)
    run_dir = args.run_dir
    phases = read_phases(run_dir)
    smi = run_dir / "nvidia-smi.csv"
    gpu_lines = smi.read_text().strip().splitlines() if smi.exists() else []
    bench, peer_versions = [], {}
    for config in args.shapes:
        meta, rows, note = bench_rows(run_dir / f"bench-{config}.json")
        if meta: peer_versions.update({k: x for k, x in meta.get("versions", {}).items() if k not in ("torch", "sae_nb")})
        shape = meta.get("shape") if meta else CONFIG_SHAPES.get(config)
        bench.append({"config": config, "shape": shape, "meta": meta, "rows": rows, "note": note})
    report = {
        "date": dt.date.today().isoformat(), "time": dt.datetime.now().isoformat(timespec="seconds"),
        "gpu": "; ".join(gpu_lines) or "unknown", "n_gpus": len(gpu_lines), "versions": versions(),
        "peer_versions": peer_versions, "phases": phases, "tests": read_tests(run_dir), "bench": bench,
        "passed": bool(phases) and all(ph["status"].startswith("pass") for ph in phases),
        "run_dir": str(run_dir),
    }
    table = markdown(report)
    report["markdown"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1))
    Path(f"{out}.md").write_text(table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()

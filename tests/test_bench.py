"""Smoke tests of the step and store benchmarks in bench/: our side always, the peers' side when bench/.peers/venv exists
(or the python named by BENCH_PEERS_PYTHON)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEERS_PYTHON = Path(os.environ.get("BENCH_PEERS_PYTHON") or BENCH / ".peers" / "venv" / "bin" / "python")
sys.path.insert(0, str(BENCH))


def test_bench_step_quick_ours(tmp_path):
    "Every sae_nb variant takes timed training steps; the JSON and the markdown table hold one row each."
    import bench_step
    out = tmp_path / "bench.json"
    rows = bench_step.main(["--quick", "--no-peers", "--in-process", "--rounds", "1", "--warmup", "1", "--steps", "1",
                            "--out", str(out)])
    assert [r["variant"] for r in rows] == list(bench_step.VARIANTS)
    assert all(r["sae_nb_tok_s"] > 0 and r["roofline_fraction"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["meta"]["shape"] == {"d_in": 64, "d_sae": 512, "batch": 256, "k": 8}
    assert saved["table"].count("\n| ") == 1 + len(bench_step.VARIANTS)   # header + one line per variant
    assert all(r["ratio_best_peer"] is None for r in saved["rows"])       # no peers measured
    # memory: the live tensor peak next to the per-variant floor, the RSS peak in its own column, the breakdown
    header = saved["table"].split("\n| variant |")[1].split("\n")[0]
    for col in ("sae_nb live peak MB", "floor MB", "live / floor (goal)", "sae_nb RSS peak MB", "SAELens live peak MB"):
        assert col in header
    shape = saved["meta"]["shape"]
    for r in saved["rows"]:
        parts = bench_step.floor_parts(shape, r["variant"])
        assert r["floor_mb"] == pytest.approx(sum(parts.values()) / 2**20)
        held = parts["parameters"] + parts["adam moments"] + parts["batch"]   # alive through the whole step
        assert r["sae_nb_live_peak_mb"] >= held / 2**20
        assert r["live_over_floor"] == pytest.approx(r["sae_nb_live_peak_mb"] / r["floor_mb"])
        assert r["memory_goal"] == (1.3 if r["variant"] in bench_step.TOPK_FAMILY else 1.6)
        assert r["sae_nb_rss_peak_mb"] is not None and r["sae_nb_peak_mb"] == r["sae_nb_rss_peak_mb"]
        b = r["sae_nb_live_breakdown"]
        assert b["base_by_category"]["parameters"] == parts["parameters"]        # found by the live-tensor scan
        assert b["base_by_category"]["optimizer state"] >= parts["adam moments"]
        assert b["step_blocks_at_peak"] and b["peak_bytes"] == b["base_bytes"] + b["step_bytes_at_peak"]
    assert f"- **{rows[0]['variant']}**: live peak" in saved["table"]
    assert all("live_peak_bytes" in r and "rss_peak_bytes" in r for r in saved["results"])


def test_live_peak_of_a_toy_step():
    "The live tensor peak by tensor accounting equals the hand-computed one: 4 MB, 4 MB, free the first, 4 MB -> 8 MB on top of what is held."
    import harness
    held = torch.zeros(500_000)                      # 2,000,000 bytes alive before and during the step

    def toy():
        a = torch.empty(1000, 1000)                  # 4,000,000 bytes each
        b = torch.empty(1000, 1000)
        del a
        c = torch.empty(1000, 1000)
        return None

    r = harness.live_peak(toy, {"held": held}, {"n": 1000})
    assert r["base_by_category"]["held"] == 2_000_000
    assert r["step_bytes_at_peak"] == pytest.approx(8_000_000, abs=64 * 1024)
    assert r["peak_bytes"] == r["base_bytes"] + r["step_bytes_at_peak"]
    assert [(x["bytes"], x["shape"]) for x in r["step_blocks_at_peak"][:2]] == [(4_000_000, "1000x1000 fp32")] * 2


def test_live_peak_counts_parameters_gradients_and_adam():
    "The tensors alive at a step's start are found and categorised: parameters, their gradients, Adam's two moments, the batch."
    import harness
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 200)
    opt = torch.optim.Adam(lin.parameters())
    x = torch.randn(64, 100)

    def step():
        opt.zero_grad(set_to_none=True)
        lin(x).square().mean().backward()
        opt.step()

    step()
    r = harness.live_peak(step, {"batch": x}, {"batch": 64, "d_in": 100, "d_out": 200})
    params = sum(p.nbytes for p in lin.parameters())
    cats = r["base_by_category"]
    assert cats["parameters"] == params and cats["gradients"] == params and cats["batch"] == x.nbytes
    assert 2 * params <= cats["optimizer state"] <= 2 * params + 64    # exp_avg, exp_avg_sq (+ the step counters)
    assert r["step_bytes_at_peak"] >= 64 * 200 * 4                       # at least the [64, 200] output


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="needs bench/.peers/venv (bash bench/setup_peers.sh)")
def test_peer_steps_quick():
    "Each SAELens and sparsify step the benchmark calls still runs on the installed versions (20–40 s on a busy machine: importing SAELens takes most of it)."
    p = subprocess.run([str(PEERS_PYTHON), str(BENCH / "peer_step.py"), "--smoke"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rates = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(rates) == {f"saelens/{v}" for v in ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")} | {"sparsify/topk"}
    assert all(r > 0 for r in rates.values())


STORE_STAGES = ("cache_write", "cached_read", "in_memory", "forward")


def test_bench_store_quick_ours(tmp_path, monkeypatch):
    "sae_nb's store caches, reads back shuffled and runs in memory; the table has a row per stage and per step (10-20 s)."
    import tempfile
    import bench_store
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))               # where the run's caches go
    out = tmp_path / "store.json"
    res = bench_store.main(["--quick", "--no-peers", "--in-process", "--variants", "topk", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["medians_tok_s"].keys() == {"sae_nb"}
    assert all(saved["medians_tok_s"]["sae_nb"][s] > 0 for s in STORE_STAGES)
    (r,) = saved["results"]
    assert r["stages"]["cache_write"]["tokens"] == saved["meta"]["n_tokens"] == 192 * 128   # whole shards of 8192 rows
    assert r["stages"]["cache_write"]["bytes_on_disk"] >= saved["meta"]["n_tokens"] * 128 * 4
    assert saved["step_tok_s"]["topk"] > 0 and res["store_tok_s"] == saved["medians_tok_s"]["sae_nb"]["in_memory"]
    table = saved["table"]
    assert table.count("\n| ") == 1 + len(STORE_STAGES) + 1               # header, stages, one step
    assert "SAELens not measured" in table and "-bound)" in table and "the data is" in table
    assert not list(tmp_path.glob("bench_store_*"))                       # the caches went with the temporary directory


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="needs bench/.peers/venv (bash bench/setup_peers.sh) or BENCH_PEERS_PYTHON")
def test_bench_store_quick_saelens(tmp_path):
    "SAELens's side: its cache runner, cached and in-memory ActivationsStore on the default model rebuilt as a HookedTransformer, equal to sae_nb's at the hook (30-50 s: importing SAELens takes much of it)."
    import bench_store
    out = tmp_path / "store.json"
    bench_store.main(["--quick", "--in-process", "--variants", "topk", "--peers-python", str(PEERS_PYTHON),
                      "--out", str(out)])
    saved = json.loads(out.read_text())
    eq = saved["meta"]["equivalence"]
    assert eq["max_abs_diff"] <= 1e-4 and eq["n_tokens"] == bench_store.N_CHECK_SEQ * 128
    assert eq["logits_max_abs_diff"] <= 1e-3 * eq["max_abs_logit"]
    theirs = saved["medians_tok_s"]["saelens"]
    assert all(theirs[s] > 0 for s in STORE_STAGES)
    (r,) = [r for r in saved["results"] if r["impl"] == "saelens"]
    assert r["stages"]["cache_write"]["tokens"] == saved["meta"]["n_tokens"]   # SAELens cached every window, once
    assert {"sae-lens", "peers transformer-lens"} <= saved["meta"]["versions"].keys()
    assert "SAELens not measured" not in saved["table"] and saved["table"].count("x |") >= len(STORE_STAGES)

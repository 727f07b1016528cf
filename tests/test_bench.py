"""Smoke tests of the step benchmark in bench/: our side always, the peers' side when bench/.peers/venv exists."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEERS_PYTHON = BENCH / ".peers" / "venv" / "bin" / "python"
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


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="needs bench/.peers/venv (bash bench/setup_peers.sh)")
def test_peer_steps_quick():
    "Each SAELens and sparsify step the benchmark calls still runs on the installed versions (20–40 s on a busy machine: importing SAELens takes most of it)."
    p = subprocess.run([str(PEERS_PYTHON), str(BENCH / "peer_step.py"), "--smoke"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rates = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(rates) == {f"saelens/{v}" for v in ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")} | {"sparsify/topk"}
    assert all(r > 0 for r in rates.values())

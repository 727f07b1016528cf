"""bench/gpu_check.sh and its report on a machine without a GPU: the script's syntax, its clean stop before any
install when there is no GPU, the whole run against a stand-in nvidia-smi (the CUDA phase fails, the rest is
reported), the CUDA tests skipped (not erroring) on the CPU, the report of a benchmark cut short, the shape options."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPT = BENCH / "gpu_check.sh"
sys.path.insert(0, str(BENCH))
no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real check")


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(BENCH / "setup_peers.sh")], check=True)
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", str(SCRIPT), str(BENCH / "setup_peers.sh")], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-3000:]


def stub_path(tmp_path) -> tuple[str, Path]:
    "A PATH whose pip, pip3, python and python3 only record that they were called (and fail)."
    stubs, calls = tmp_path / "stubs", tmp_path / "calls.txt"
    stubs.mkdir()
    for name in ("pip", "pip3", "python", "python3"):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        (stubs / name).chmod(0o755)
    return f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin", calls


@pytest.mark.parametrize("smi", ["missing", "failing"])
def test_no_gpu_stops_before_installing_anything(tmp_path, smi):
    "No nvidia-smi, or one that fails: exit 3 with a message, no python or pip run, no venv, no results written."
    path, calls = stub_path(tmp_path)
    fake = tmp_path / "nvidia-smi"
    if smi == "failing":
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        fake.chmod(0o755)
    env = dict(os.environ, PATH=path, GPU_CHECK_NVIDIA_SMI=str(fake), GPU_CHECK_VENV=str(tmp_path / "venv"))
    p = subprocess.run(["bash", str(SCRIPT), "--out-dir", str(tmp_path / "out")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert "no NVIDIA GPU" in p.stderr and "nothing installed" in p.stderr
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()


def test_bad_option_is_a_usage_error(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown option" in p.stderr


@no_gpu_here
def test_cuda_tests_are_collected_and_skipped_on_cpu(tmp_path):
    xml = tmp_path / "t.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda.py"), "-m", "cuda", "-q",
                        "-p", "no:cacheprovider", f"--junitxml={xml}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    assert len(cases) >= 19, len(cases)   # 6 variants x (train, sparse vs dense, resume) + DDP
    assert all(c.find("skipped") is not None for c in cases), [c.get("name") for c in cases if c.find("skipped") is None]
    assert "needs a CUDA GPU" in p.stdout or "skipped" in p.stdout


@no_gpu_here
def test_run_against_a_stand_in_gpu_reports_the_failed_cuda_phase(tmp_path):
    "A stand-in nvidia-smi, --no-install: the CUDA phase fails on this CPU torch, the rest is reported not run, exit 1."
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA Stand-in, 1.0, 1 MiB'\n")
    fake.chmod(0o755)
    env = dict(os.environ, GPU_CHECK_NVIDIA_SMI=str(fake), GPU_CHECK_PYTHON=sys.executable)
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SCRIPT), "--no-install", "--no-peers", "--out-dir", str(out)], env=env,
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    [md] = out.glob("gpu-check-*.md")
    report = json.loads(md.with_name(md.name[:-3] + ".json").read_text())
    status = {ph["phase"]: ph["status"] for ph in report["phases"]}
    assert status["gpu"] == "pass" and status["cuda"].startswith("fail")
    assert all(status[f"bench-{s}"].startswith("not run") for s in ("default", "wide", "xl"))
    assert status["tests"].startswith("not run") and not report["passed"]
    assert "| cuda | fail" in md.read_text() and md.read_text() in p.stdout + "\n"
    assert [b["shape"]["d_sae"] for b in report["bench"]] == [4096, 24576, 16384]


def test_report_of_a_benchmark_cut_short(tmp_path):
    "A partial bench_step JSON (the run timed out) is summarised into rows; a missing one is noted."
    import gpu_check_report
    run = tmp_path / "run"
    run.mkdir()
    (run / "phases.tsv").write_text("phase\tstatus\tseconds\tbudget\tlog\ngpu\tpass\t0\t30\t\nbench-default\ttimeout\t99\t99\t\n")
    (run / "nvidia-smi.csv").write_text("NVIDIA Stand-in, 1.0, 1 MiB\n")
    shape = dict(d_in=512, d_sae=4096, batch=4096, k=32)
    results = [{"impl": "sae_nb", "variant": "topk", "tokens_per_s": 1e6, "peak_bytes": 2**30, "round": 0,
                "versions": {}},
               {"impl": "saelens", "variant": "topk", "tokens_per_s": 5e5, "peak_bytes": 2**31, "round": 0,
                "versions": {"torch": "x", "sae-lens": "6.54.12"}}]
    (run / "bench-default.json").write_text(json.dumps({"partial": True, "shape": shape, "peaks": [1e14],
                                                        "args": {"config": "default", "steps": 20, "warmup": 5},
                                                        "results": results}))
    report = gpu_check_report.main(["--run-dir", str(run), "--out", str(tmp_path / "r"), "--shapes", "default", "xl"])
    [default, xl] = report["bench"]
    assert [r["variant"] for r in default["rows"]] == ["topk"] and default["rows"][0]["ratio_best_peer"] == 2.0
    assert "cut short" in default["note"] and xl["rows"] == [] and xl["note"] == "no result"
    assert report["peer_versions"] == {"sae-lens": "6.54.12"} and not report["passed"]
    md = (tmp_path / "r.md").read_text()
    assert "| 512 | 4096 | 32 | topk | 1,000,000 |" in md and "2.00x" in md and "| timeout |" in md


def test_bench_step_shapes():
    "The GPU check's named shapes, --shape D_IN D_SAE K and --batch N, passed on to the workers."
    import bench_step
    import harness
    assert harness.CONFIGS["default"] == dict(d_in=512, d_sae=4096, batch=4096, k=32)
    assert harness.CONFIGS["wide"] == dict(d_in=768, d_sae=24576, batch=4096, k=32)
    assert harness.CONFIGS["xl"] == dict(d_in=2048, d_sae=16384, batch=4096, k=64)
    args = argparse.Namespace(config="wide", shape=[32, 128, 4], batch=64)
    assert harness.shape_of(args) == dict(d_in=32, d_sae=128, batch=64, k=4)
    assert harness.shape_flags(args) == ["--shape", "32", "128", "4", "--batch", "64"]
    assert harness.shape_of(argparse.Namespace(config="xl")) == harness.CONFIGS["xl"]   # peer_step's smoke namespace
    with pytest.raises(SystemExit):
        bench_step.main(["--shape", "8", "16", "32", "--no-peers"])   # k > d_sae


def test_bench_step_quick_with_a_shape_override(tmp_path):
    "--quick with --shape and --batch: the step runs at that shape and the JSON records it (a few seconds)."
    import bench_step
    out = tmp_path / "b.json"
    rows = bench_step.main(["--quick", "--shape", "32", "128", "4", "--batch", "64", "--no-peers", "--in-process",
                            "--variants", "topk", "relu", "--rounds", "1", "--warmup", "0", "--steps", "1",
                            "--out", str(out)])
    assert [r["variant"] for r in rows] == ["relu", "topk"]
    meta = json.loads(out.read_text())["meta"]
    assert meta["shape"] == dict(d_in=32, d_sae=128, batch=64, k=4) and meta["label"] == "d32-s128-k4-b64"

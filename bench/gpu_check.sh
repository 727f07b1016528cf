#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU and a clone of this repository:
#   bash bench/gpu_check.sh              # install (.venv-gpu, CUDA torch, peers), CUDA tests, benchmark, report
#   bash bench/gpu_check.sh --no-install # use the python on PATH (or --python PY), which has CUDA torch and sae_nb
# Phases, each under `timeout`; a failed or timed-out phase is reported and the next one runs:
#   gpu      nvidia-smi lists a GPU (otherwise exit 3 at once: nothing installed, nothing run)
#   install  venv .venv-gpu: `pip install torch` (a CUDA build), `pip install -e ".[dev]"`      (own budget)
#   peers    bench/.peers/venv with a CUDA torch: `bash bench/setup_peers.sh --cuda`               (own budget)
#   cuda     torch.cuda.is_available() in that python
#   tests    pytest -m cuda tests/test_cuda.py
#   bench-*  bench/bench_step.py --device cuda at three shapes, batch 4096 (default, wide, xl), peers included
#   report   bench/results/gpu-check-<date>-<time>.json and .md (the markdown printed at the end)
# cuda, tests, the three benchmarks and the report share CHECK_BUDGET (480 s: 8 minutes).
# Exit code: 0 every phase passed, 1 some phase failed or timed out, 2 bad usage, 3 no NVIDIA GPU.
# Environment: GPU_CHECK_NVIDIA_SMI (the nvidia-smi command), GPU_CHECK_PYTHON (with --no-install),
# GPU_CHECK_VENV, CHECK_BUDGET, INSTALL_BUDGET, PEERS_BUDGET, TESTS_BUDGET, BENCH_ROUNDS, BENCH_STEPS, BENCH_WARMUP.
set -euo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    echo "Options: --no-install  --python PY  --venv DIR  --no-peers  --budget SECONDS  --out-dir DIR  -h"
}

cd "$(dirname "$0")/.."
ROOT="$PWD"
INSTALL=1
PEERS=1
PY="${GPU_CHECK_PYTHON:-}"
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
NVIDIA_SMI="${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}"
CHECK_BUDGET="${CHECK_BUDGET:-480}"
INSTALL_BUDGET="${INSTALL_BUDGET:-1200}"
PEERS_BUDGET="${PEERS_BUDGET:-1200}"
TESTS_BUDGET="${TESTS_BUDGET:-150}"
REPORT_RESERVE=30
BENCH_ROUNDS="${BENCH_ROUNDS:-1}"
BENCH_STEPS="${BENCH_STEPS:-20}"
BENCH_WARMUP="${BENCH_WARMUP:-5}"
OUT_DIR="$ROOT/bench/results"
SHAPES=(default wide xl)   # bench/harness.py: (512, 4096, k 32), (768, 24576, k 32), (2048, 16384, k 64); batch 4096

while (($#)); do
    case "$1" in
        --no-install) INSTALL=0 ;;
        --python) PY="${2:?--python needs a path}"; INSTALL=0; shift ;;
        --venv) VENV="${2:?--venv needs a directory}"; shift ;;
        --no-peers) PEERS=0 ;;
        --budget) CHECK_BUDGET="${2:?--budget needs seconds}"; shift ;;
        --out-dir) OUT_DIR="${2:?--out-dir needs a directory}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$CHECK_BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget/CHECK_BUDGET must be whole seconds" >&2; exit 2 ;; esac

# -- gpu: before anything is installed or written ----------------------------------------------------------------
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here ('$NVIDIA_SMI' not found); nothing installed, nothing run." >&2
    exit 3
fi
if ! GPU_INFO="$(timeout 30 "$NVIDIA_SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" \
        || [ -z "$GPU_INFO" ]; then
    echo "gpu_check: no NVIDIA GPU here ('$NVIDIA_SMI' failed: ${GPU_INFO:-no output}); nothing installed, nothing run." >&2
    exit 3
fi
N_GPUS="$(printf '%s\n' "$GPU_INFO" | grep -c .)"
echo "== gpu: $N_GPUS GPU(s)"
printf '%s\n' "$GPU_INFO"

STAMP="$(date +%Y-%m-%d-%H%M%S)"
RUN_DIR="$OUT_DIR/gpu-check-$STAMP"
mkdir -p "$RUN_DIR"
PHASES="$RUN_DIR/phases.tsv"
printf 'phase\tstatus\tseconds\tbudget\tlog\n' > "$PHASES"
printf '%s\n' "$GPU_INFO" > "$RUN_DIR/nvidia-smi.csv"
printf 'gpu\tpass\t0\t30\t%s\n' "$RUN_DIR/nvidia-smi.csv" >> "$PHASES"
FAILED=0

# run_phase NAME BUDGET COMMAND...: run under timeout, log to RUN_DIR/NAME.log (and the terminal), record the outcome.
run_phase() {
    local name="$1" budget="$2" rc status t0
    shift 2
    local log="$RUN_DIR/$name.log"
    if [ "$budget" -le 0 ]; then
        echo "== $name: no time left in the check's budget" | tee "$log"
        printf '%s\ttimeout\t0\t0\t%s\n' "$name" "$log" >> "$PHASES"
        FAILED=1
        return 1
    fi
    echo "== $name (budget ${budget}s): $*"
    t0=$SECONDS
    set +e
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    case "$rc" in
        0) status=pass ;;
        124|137) status=timeout ;;
        *) status="fail (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$budget" "$log" >> "$PHASES"
    echo "== $name: $status after $((SECONDS - t0))s"
    if [ "$rc" -ne 0 ]; then FAILED=1; return 1; fi
    return 0
}

skip_phase() {   # NAME REASON: a phase that could not run (counts as a failure)
    printf '%s\tnot run: %s\t0\t0\t\n' "$1" "$2" >> "$PHASES"
    echo "== $1: not run ($2)"
    FAILED=1
}

# -- install (own budgets: downloads, not the check) ----------------------------------------------------------------
install_project() {
    if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        echo "torch with CUDA already in $VENV"
    else
        "$VENV/bin/python" -m pip install --quiet torch   # plain: pip's default torch on Linux is a CUDA build
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
}

if [ "$INSTALL" = 1 ]; then
    export -f install_project
    export VENV
    run_phase install "$INSTALL_BUDGET" bash -c 'set -euo pipefail; install_project' || true
    PY="$VENV/bin/python"
else
    PY="${PY:-$(command -v python3 || command -v python || echo python3)}"
fi
echo "== python: $PY"

PEERS_PY="$ROOT/bench/.peers/venv/bin/python"
if [ "$PEERS" = 1 ]; then
    if [ -x "$PEERS_PY" ] && "$PEERS_PY" -c 'import sys, torch, sae_lens, sparsify; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        printf 'peers\tpass (reused)\t0\t0\t\n' >> "$PHASES"
        echo "== peers: reusing bench/.peers/venv"
    elif [ "$INSTALL" = 1 ]; then
        run_phase peers "$PEERS_BUDGET" env PYTHON="$PY" bash bench/setup_peers.sh --cuda || true
    else
        skip_phase peers "no bench/.peers/venv with a CUDA torch, and --no-install"
    fi
    if ! [ -x "$PEERS_PY" ] || ! "$PEERS_PY" -c 'import sae_lens, sparsify' 2>/dev/null; then PEERS=0; fi
fi

# -- the check: CHECK_BUDGET seconds from here ----------------------------------------------------------------------
DEADLINE=$((SECONDS + CHECK_BUDGET))
left() { echo $((DEADLINE - SECONDS - REPORT_RESERVE)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

CUDA_OK=0
if run_phase cuda "$(min 60 "$(left)")" "$PY" -c '
import torch, sae_nb
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0), "sae_nb", sae_nb.__version__)'; then
    CUDA_OK=1
fi

if [ "$CUDA_OK" = 1 ]; then
    run_phase tests "$(min "$TESTS_BUDGET" "$(left)")" "$PY" -m pytest tests/test_cuda.py -m cuda -rs -q -p no:cacheprovider \
        --junitxml="$RUN_DIR/tests.xml" || true
    peer_flag=()
    if [ "$PEERS" = 0 ]; then peer_flag=(--no-peers); fi
    for i in "${!SHAPES[@]}"; do
        shape="${SHAPES[$i]}"
        remaining=$(( ${#SHAPES[@]} - i ))
        run_phase "bench-$shape" "$(( $(left) / remaining ))" "$PY" bench/bench_step.py --device cuda --config "$shape" \
            --rounds "$BENCH_ROUNDS" --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" "${peer_flag[@]}" \
            --out "$RUN_DIR/bench-$shape.json" || true
    done
else
    skip_phase tests "torch.cuda.is_available() is False"
    for shape in "${SHAPES[@]}"; do skip_phase "bench-$shape" "torch.cuda.is_available() is False"; done
fi

# -- report --------------------------------------------------------------------------------------------------------
REPORT="$OUT_DIR/gpu-check-$STAMP"
REPORT_PY="$PY"
if ! "$REPORT_PY" -c 'import sys' 2>/dev/null; then REPORT_PY=python3; fi
if ! timeout -k 5 "$((REPORT_RESERVE + 30))" "$REPORT_PY" bench/gpu_check_report.py --run-dir "$RUN_DIR" \
        --out "$REPORT" --shapes "${SHAPES[@]}"; then
    echo "gpu_check: the report failed; the phases and logs are in $RUN_DIR" >&2
    FAILED=1
fi
echo
echo "gpu_check: $( [ "$FAILED" = 0 ] && echo "every phase passed" || echo "some phase failed" ); report $REPORT.md and .json"
exit "$FAILED"

#!/usr/bin/env bash
# Build bench/.peers/venv: a virtual environment, separate from the project's, holding the two
# implementations bench_step.py compares sae_nb with: SAELens and EleutherAI sparsify.
# SAELens needs transformer-lens < 4 while sae_nb needs transformer-lens 4, so they cannot share a venv.
# Usage (from the repository root, after the project's install): bash bench/setup_peers.sh
#   bash bench/setup_peers.sh --cuda   (or PEERS_TORCH=cuda): a CUDA build of torch instead of the CPU pin, for
#   `bench_step.py --device cuda`; TORCH_CUDA_SPEC (default: plain `torch`) and TORCH_INDEX_URL choose which one.
set -euo pipefail
cd "$(dirname "$0")"
PEERS_TORCH="${PEERS_TORCH:-cpu}"
for arg in "$@"; do
    case "$arg" in
        --cuda) PEERS_TORCH=cuda ;;
        --cpu) PEERS_TORCH=cpu ;;
        *) echo "usage: bash bench/setup_peers.sh [--cuda|--cpu]" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
VENV=.peers/venv
# Versions checked to install beside torch 2.13.0 (CPU wheel); override with SAE_LENS=... SPARSIFY=...
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAE_LENS="${SAE_LENS:-sae-lens==6.54.12}"
SPARSIFY="${SPARSIFY:-eai-sparsify==1.3.3}"

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ "$PEERS_TORCH" = cuda ]; then
    # a CUDA build (multi-GB): whichever torch pip picks, or TORCH_CUDA_SPEC, from TORCH_INDEX_URL if given;
    # then held at the version installed while the peers resolve
    "$VENV/bin/python" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_CUDA_SPEC:-torch}"
    installed="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
    if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
        echo "setup_peers: $VENV holds torch $installed without CUDA; remove bench/.peers/venv and run again" >&2
        exit 1
    fi
    echo "torch==$installed" > .peers/constraints.txt
else
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
    echo "torch==$TORCH_VERSION" > .peers/constraints.txt
fi
"$VENV/bin/python" -m pip install --quiet -c .peers/constraints.txt "$SAE_LENS" "$SPARSIFY"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import torch, sae_lens, sparsify  # noqa: F401  (fails here if either does not import)
print("peers venv ready:", {p: version(p) for p in ("torch", "sae-lens", "eai-sparsify", "transformer-lens")},
      "cuda:", torch.cuda.is_available())
PY

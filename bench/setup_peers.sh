#!/usr/bin/env bash
# Build bench/.peers/venv: a virtual environment, separate from the project's, holding the two
# implementations bench_step.py compares sae_nb with: SAELens and EleutherAI sparsify.
# SAELens needs transformer-lens < 4 while sae_nb needs transformer-lens 4, so they cannot share a venv.
# Usage (from the repository root, after the project's install): bash bench/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
VENV=.peers/venv
# Versions checked to install beside torch 2.13.0 (CPU wheel); override with SAE_LENS=... SPARSIFY=...
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAE_LENS="${SAE_LENS:-sae-lens==6.54.12}"
SPARSIFY="${SPARSIFY:-eai-sparsify==1.3.3}"

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
echo "torch==$TORCH_VERSION" > .peers/constraints.txt
"$VENV/bin/python" -m pip install --quiet -c .peers/constraints.txt "$SAE_LENS" "$SPARSIFY"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import torch, sae_lens, sparsify  # noqa: F401  (fails here if either does not import)
print("peers venv ready:", {p: version(p) for p in ("torch", "sae-lens", "eai-sparsify", "transformer-lens")})
PY

#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment with PyTorch (CPU), the patched llama.cpp
# (built once, cached by patch hash in ~/.cache/edge-mote) and edge-mote with its `edge-mote` command.
#   ./setup.sh            # CPU build
#   ./setup.sh --cuda     # also builds llama.cpp's CUDA backend (needs nvcc)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${EDGE_MOTE_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip
# CPU PyTorch, pinned: an unpinned `torch` pulls a multi-GB CUDA build
pip_install "torch==${EDGE_MOTE_TORCH:-2.13.0}"
pip_install scikit-build-core diskcache jinja2 typing-extensions numpy
# the unpatched llama.cpp the tests compare against is built by the tests when they first need it (cached)
"$VENV/bin/python" native/build.py "$@"
pip_install -e ".[dev]"
echo "edge-mote is ready: $VENV/bin/edge-mote --help"

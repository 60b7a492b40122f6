#!/usr/bin/env bash
# Create .venv (if needed) and install edgekit with the CPU runtime, the exporter and the test tools.
# Sourced by quickstart.sh and test.sh. EDGEKIT_TORCH overrides the torch requirement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: an unpinned `torch` resolves to a multi-GB CUDA build; 2.13.0 is the CPU build here.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "${EDGEKIT_TORCH:-torch==2.13.0}"
fi
"$VPY" -m pip install -q -e '.[cpu,export,dev,ray]'  # ray: the serve --replicas and sweep tests
export PATH="$PWD/.venv/bin:$PATH"

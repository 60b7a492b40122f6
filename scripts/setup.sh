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
# A download cut off midway (seen in CI: ray's 79 MB wheel stopped at 64 MB six times) should not
# fail the run: pip resumes more often, and the whole install is tried again after a pause.
# Older pips ignore the settings they do not know.
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20} PIP_RETRIES=${PIP_RETRIES:-10}
pip_install() {
  local try
  for try in 1 2 3; do
    "$VPY" -m pip install -q "$@" && return 0
    [ "$try" -lt 3 ] && { echo "pip install failed (try $try of 3); trying again in $((try * 15)) s" >&2; sleep $((try * 15)); }
  done
  return 1
}
pip_install --upgrade pip >/dev/null
# torch first and pinned: an unpinned `torch` resolves to a multi-GB CUDA build; 2.13.0 is the CPU build here.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "${EDGEKIT_TORCH:-torch==2.13.0}"
fi
pip_install -e '.[cpu,export,dev,ray]'  # ray: the serve --replicas and sweep tests
export PATH="$PWD/.venv/bin:$PATH"

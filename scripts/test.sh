#!/usr/bin/env bash
# Set up, then run the CPU test suite. pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export EDGEKIT_CACHE=${EDGEKIT_CACHE:-$PWD/.cache/edgekit}
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# Set up, then export the default preset, validate it against PyTorch, and generate text.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
MODEL=${1:-tiny-code}
OUT=out/$MODEL
edgekit export "$MODEL" -o "$OUT" --force
edgekit validate "$OUT" --reference "$MODEL" --prompt-length 24 --steps 32
edgekit run "$OUT" --prompt "def main():" --max-new-tokens 32

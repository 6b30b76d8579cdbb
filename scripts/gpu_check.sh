#!/usr/bin/env bash
# The GPU check (docs/gpu.md): environment, GPU test tier, the gpu preset trained and evaluated, the
# gpu_speedrun preset cold, warm and over three seeds, deterministic kernels, GPT-2 124M step settings;
# one summary table with each stage's targets (also written as JSON). At most 10 minutes on one
# H100/H200 (the time limits' budget, printed at the start; the real length is not yet measured);
# --dry_run goes through every stage at tiny sizes on any machine. Flags: scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=/path/to/python" >&2; exit 2; }
exec "$PYTHON" scripts/gpu_check.py "$@"

#!/usr/bin/env bash
# The GPU check (docs/gpu.md): environment, GPU test tier, the gpu preset trained and evaluated, step
# timings, one summary table (also written as JSON). About 5 minutes on an H200; --dry_run goes
# through every stage at the tiny preset on any machine. Flags: see scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=/path/to/python" >&2; exit 2; }
exec "$PYTHON" scripts/gpu_check.py "$@"

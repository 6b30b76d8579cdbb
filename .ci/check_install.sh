#!/usr/bin/env bash
# `pip install .` into a fresh venv, then use the installed package from another directory: every
# script's --help, and a tiny train -> sample run on the data shipped inside the package. The scripts
# are copied out of the checkout so that they import the installed gpt_jax, not the checkout's.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet "$REPO"
cp -r "$REPO/scripts" "$WORK/scripts"
# Nothing added to sys.path (gpt_jax is installed); the checkout only provides configs/.
echo "REPO_ROOT = '$REPO'" > "$WORK/scripts/_bootstrap.py"
cd "$WORK"
PY="$WORK/venv/bin/python"
"$PY" -c "import gpt_jax, os; assert 'site-packages' in gpt_jax.__file__, gpt_jax.__file__; print('installed at', os.path.dirname(gpt_jax.__file__))"
for script in scripts/*.py; do
  [ "$(basename "$script")" = _bootstrap.py ] && continue
  "$PY" "$script" --help > help.log 2>&1 || { tail -20 help.log; echo "FAILED: $script --help"; exit 1; }
done
echo "every script's --help works"
"$PY" scripts/train.py --config "$REPO/configs/shakespeare.py:tiny" --config.out_dir=out \
    --config.data.data_dir=data --config.train.max_steps=20 --config.train.peak_flops=1e12 > train.log
"$PY" scripts/sample.py --ckpt_dir out --prompt "ROMEO:" --max_new_tokens 20 > sample.log
grep -q "ROMEO:" sample.log
echo "installed package: tiny train -> sample from $WORK works"

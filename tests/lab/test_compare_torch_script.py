"""scripts/compare_torch.py run as a user would: each flag reaches what it configures, and a bad flag
is one clear line (the comparison itself is tested in test_torch_ref.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, make_synthetic_text


def _compare(tmp_path, *flags: str) -> subprocess.CompletedProcess:
  """Runs in tmp_path, so that an ignored --out_dir would write its default (out/...) there, not here."""
  text = tmp_path / 'input.txt'
  if not text.exists():
    text.write_text(make_synthetic_text(), encoding='utf-8')
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'compare_torch.py'),
                         f'--config={REPO / "configs" / "shakespeare.py"}:tiny',
                         f'--config.data.text_path={text}', f'--config.data.data_dir={tmp_path / "data"}',
                         *flags], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, PYTHONUNBUFFERED='1'))


def _summary(out_dir) -> dict:
  with open(out_dir / 'summary.json', encoding='utf-8') as f:
    return json.load(f)


@pytest.mark.slow
def test_each_flag_reaches_the_comparison(tmp_path):
  """One run with every flag away from its default. --seeds=1 (default 3) with dropout on is one
  seed per side, and so also the case where the float64 reference would run but for the flag."""
  out = tmp_path / 'cmp'
  r = _compare(tmp_path, '--config.model.dropout=0.1', '--seeds=1', '--steps=3', '--eval_interval=2',
               f'--out_dir={out}', '--nofloat64_reference', '--torch_threads=1')
  assert r.returncode == 0, r.stderr
  s = _summary(out)
  assert s['model']['dropout'] == 0.1 and s['seeds'] == 1 and s['steps'] == 3
  assert s['eval_steps'] == [0, 2, 3] and s['torch_threads'] == 1 and 'float64_reference' not in s
  assert sorted(os.listdir(out)) == ['dynamics.jsonl', 'dynamics.png', 'summary.json']
  assert not (tmp_path / 'out').exists()  # Nothing at the default --out_dir.


@pytest.mark.parametrize('flag,message', [
    ('--steps=abc', "error: flag --steps=abc: invalid literal for int() with base 10: 'abc'"),
    ('--seeds=0', 'error: flag --seeds=0: 0 is not a positive integer'),
    ('--torch_threads=0', 'error: flag --torch_threads=0: 0 is not a positive integer'),
    ('--eval_interval=-1', 'error: flag --eval_interval=-1: -1 is not a non-negative integer'),
    # These two get as far as the comparison (PyTorch, the data): seconds each.
    pytest.param('--config.train.eval_interval=0',
                 'error: steps, eval_interval and seeds must be >= 1 (got 50, 0, 3)', marks=pytest.mark.slow),
    pytest.param('--out_dir={tmp}/input.txt/x', 'error: cannot make the output folder --out_dir',
                 marks=pytest.mark.slow),
    ('--config.model.n_layr=1', "there is no config field 'n_layr'"),
])
def test_a_bad_flag_is_one_clear_line(tmp_path, flag, message):
  r = _compare(tmp_path, flag.format(tmp=tmp_path))
  assert r.returncode in (1, 2) and 'Traceback' not in r.stderr, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], r.stderr

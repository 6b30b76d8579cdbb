"""scripts/gpu_check.sh: the one-command GPU check, gone through with --dry_run on this CPU."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_names_what_is_missing(monkeypatch):
  gc = load_script('gpu_check')
  real = gc.version
  monkeypatch.setattr(gc, 'version', lambda name: None if name == 'ml_collections' else real(name))
  info = gc.environment(type('Args', (), {'dry_run': True, 'no_install': True})())
  assert not info['ok'] and info['ml_collections'] is None
  assert info['problems'] == ['missing packages: ml_collections (pip install ml_collections)']


def _has_gpu_tests(path: pathlib.Path) -> bool:
  """Whether a test module marks anything `gpu` (decorators or `pytestmark`; not text in strings)."""
  tree = ast.parse(path.read_text(encoding='utf-8'))
  return any(isinstance(node, ast.Attribute) and node.attr == 'gpu' and ast.unparse(node) == 'pytest.mark.gpu'
             for node in ast.walk(tree))


def test_gpu_tests_stage_runs_every_file_with_a_gpu_test():
  """The stage runs GPU_TESTS only (the whole tree needs the dev requirements): none may be missing."""
  gc = load_script('gpu_check')
  marked = {str(p.relative_to(REPO)) for p in sorted((pathlib.Path(REPO) / 'tests').rglob('*.py'))
            if _has_gpu_tests(p)}
  assert marked >= {'tests/gpu/test_gpu_tier.py', 'tests/test_lower_cuda.py'}
  assert all(any(m == g or m.startswith(g + '/') for g in gc.GPU_TESTS) for m in marked), marked


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(tmp_path):
  out = tmp_path / 'check'
  proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'gpu_check.sh'), '--dry_run',
                         '--out', str(out)], env=dict(os.environ, PYTHON=sys.executable),
                        capture_output=True, text=True, check=False, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / 'gpu_check.json').read_text())
  stages = ('environment', 'gpu_tests', 'train', 'step_gpu', 'step_gpt2')
  assert result['dry_run'] is True and all(result[s]['ok'] for s in stages)
  assert result['train']['preset'] == 'tiny' and result['train']['full_pass_val_loss'] > 0
  assert result['step_gpu']['tokens_per_s'] > 0 and result['step_gpt2']['mfu'] > 0
  assert 'skipped' in result['gpu_tests']['summary']  # No GPU here: the tier skips, as allowed.
  table = proc.stdout[proc.stdout.index('stage '):]
  assert all(s in table for s in stages)

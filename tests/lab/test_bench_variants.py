"""scripts/bench_variants.py: a config's variants timed side by side, with XLA's flop counts."""

import json
import pathlib
import subprocess
import sys

import pytest

from configs import shakespeare
from gpt_jax.errors import UserError

from conftest import load_script

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / 'scripts' / 'bench_variants.py'


@pytest.mark.slow
def test_each_variant_is_timed_and_its_change_reaches_the_step():
  r = subprocess.run([sys.executable, str(SCRIPT), '--config', 'configs/shakespeare.py:tiny',
                      '--variants', 'base:;muon:train.optimizer=muon;wide:model.n_embd=64',
                      '--rounds=1', '--steps=2'], capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert [l.split()[0] for l in lines[2:5]] == ['base', 'muon', 'wide']
  v = json.loads(lines[-1].removeprefix('BENCH_JSON '))['variants']
  assert v['base']['vs_first'] == 1.0
  for r_ in v.values():
    assert r_['ms_per_step'] > 0 and r_['tokens_per_step'] == 8 * 32
  # Each change reached its compiled step: Muon adds the Newton-Schulz matmuls, a wider model more of
  # every matmul (4x the parameters of the blocks at twice the width).
  assert v['muon']['gflop'] > 1.1 * v['base']['gflop']
  assert v['wide']['gflop'] > 2 * v['base']['gflop']


def test_variants_are_parsed_by_the_fields_types():
  parse = load_script('bench_variants').parse_variants
  base = shakespeare.get_config('tiny')
  v = parse('base:;a:model.qk_norm=true,train.muon_ns_steps=3,train.learning_rate=2e-3', base)
  assert list(v) == ['base', 'a']
  assert v['base'].to_dict() == base.to_dict()
  assert v['a'].model.qk_norm is True and v['a'].train.muon_ns_steps == 3
  assert v['a'].train.learning_rate == 2e-3
  assert base.model.qk_norm is False  # The loaded config itself is not changed.
  for bad, says in [('muon', 'is not NAME:KEY=VALUE'), ('a:;a:', 'used twice'),
                    ('a:train.no_such=1', 'is not SECTION.FIELD=VALUE'),
                    ('a:train.muon_ns_steps=three', 'takes a int'),
                    ('a:model.qk_norm=yes', 'takes a bool'), (';', 'no variant given')]:
    with pytest.raises(UserError, match=says):
      parse(bad, base)


def test_a_bad_variant_is_one_line_not_a_traceback():
  r = subprocess.run([sys.executable, str(SCRIPT), '--config', 'configs/shakespeare.py:tiny',
                      '--variants', 'a:model.nope=1'], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode != 0 and 'Traceback' not in r.stderr
  assert "'model.nope=1' in 'a' is not SECTION.FIELD=VALUE" in r.stderr

"""scripts/bench.py: runs end to end on a tiny setting and reports every figure it promises."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt_jax.lab import bench

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_script_prints_table_and_json():
  pytest.importorskip('torch')
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / 'bench.py'), '--settings=tiny',
                      '--steps=3', '--gen_setting=tiny', '--gen_batches=1,4', '--gen_tokens=40',
                      '--torch_gen_batches=1', '--vs_torch'],
                     capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert any(l.startswith('train tiny') for l in lines)
  assert sum(l.startswith('generate tiny') for l in lines) == 2
  result = json.loads(lines[-1].removeprefix('BENCH_JSON '))
  train = result['train']['tiny']
  for side in ('jax', 'torch'):
    assert train[side]['ms_per_step'] > 0 and train[side]['peak_rss_mb'] > 0
  assert train['speedup'] == pytest.approx(train['torch']['ms_per_step'] / train['jax']['ms_per_step'])
  assert 0 < train['jax']['mfu'] < 1 and train['jax']['compile_s'] > 0
  gen = result['generate']
  # Batch-1 ceiling = parameter bytes / measured streaming rate.
  gbs, ceiling = gen.pop('weight_stream_gbs'), gen.pop('batch1_ceiling_tok_s')
  assert gbs > 0 and ceiling == pytest.approx(gbs * 1e9 / bench.weight_bytes(bench.setting('tiny')[0]))
  assert set(gen) == {'batch_1', 'batch_4'} and 'torch' in gen['batch_1'] and 'torch' not in gen['batch_4']
  assert gen['batch_1']['speedup'] == pytest.approx(
      gen['batch_1']['jax']['tokens_per_s'] / gen['batch_1']['torch']['tokens_per_s'])
  assert result['matmul_peak_tflops'] > 0


def test_unknown_setting_is_named():
  with pytest.raises(ValueError, match='unknown setting'):
    bench.setting('huge')


@pytest.mark.slow
def test_bench_script_times_a_run_config():
  args = [sys.executable, str(REPO / 'scripts' / 'bench.py'), '--config=configs/shakespeare.py:tiny',
          '--config.model.position=rotary', '--config.train.optimizer=muon', '--config.train.batch_size=3',
          '--steps=2', '--no_generate']
  r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr
  train = json.loads(r.stdout.splitlines()[-1].removeprefix('BENCH_JSON '))['train']
  assert train['configs/shakespeare.py:tiny']['jax']['ms_per_step'] > 0
  # The overrides reach the timed model and batch (the table's row names both).
  row = next(l for l in r.stdout.splitlines() if l.startswith('train configs/shakespeare.py:tiny'))
  assert 'B=3' in row and 'rotary' in row and ', Muon)' in row, row
  # A typo in an override is one line, naming the field.
  bad = subprocess.run(args[:2] + ['--config.model.no_such_field=1', '--no_generate'],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert bad.returncode == 2 and 'no_such_field' in bad.stderr and 'Traceback' not in bad.stderr
  # The PyTorch reference is GPT-2 with AdamW: comparing it with a Muon run is refused, in one line. (A
  # GPT-2 model with Muon: the reference would otherwise time AdamW under the Muon row's name.)
  muon_only = [a for a in args if 'rotary' not in a] + ['--vs_torch']
  r = subprocess.run(muon_only, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode != 0 and 'uses Muon' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_weight_bytes_counts_every_parameter():
  cfg, _ = bench.setting('tiny')
  from gpt_jax.model import count_params, init_params
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))  # The tree, not computed.
  assert bench.weight_bytes(cfg) == 4 * count_params(shapes)


def test_peak_rss_is_read_and_reset():
  # Reset first: the peak of whatever ran before in this worker must not hide the block's rise.
  reset = bench.reset_peak_rss()
  if sys.platform.startswith('linux'):
    assert reset, 'Linux resets the peak through /proc/self/clear_refs'
  before = bench.peak_rss_mb()
  assert before > 10  # A Python process with JAX loaded.
  block = np.ones(256 << 20, dtype=np.uint8)  # 256 MB, touched: the peak must rise by about that.
  with_block = bench.peak_rss_mb()
  assert with_block >= before + 200
  del block
  if reset:
    # Other threads may allocate a little meanwhile, so the test compares against the block's size,
    # not the exact figure from before.
    assert bench.reset_peak_rss()
    assert bench.peak_rss_mb() < with_block - 200

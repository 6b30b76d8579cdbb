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


def test_run_config_overrides_reach_model_batch_and_optimizer():
  from gpt_jax.config import load_config_file
  from gpt_jax.errors import UserError
  c = load_config_file(str(REPO / 'configs' / 'shakespeare.py'), 'tiny')
  cfg, batch, train = bench.from_run_config(
      c, ['model.position=rotary', 'model.qk_norm=True', 'train.batch_size=3', 'train.optimizer=muon'])
  assert (cfg.position, cfg.qk_norm, cfg.vocab_size, batch, train.optimizer) == ('rotary', True, 65, 3,
                                                                               'muon')
  assert c.model.position == 'learned'  # The loaded config itself is left as it was.
  for bad in ('model.no_such_field=1', 'no_equals_sign', 'train.batch_size=abc'):
    with pytest.raises(UserError, match='--set'):
      bench.from_run_config(c, [bad])


@pytest.mark.slow
def test_bench_script_times_a_run_config():
  args = [sys.executable, str(REPO / 'scripts' / 'bench.py'), '--config=configs/shakespeare.py:tiny',
          '--set=model.position=rotary', '--steps=2', '--no_generate']
  r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr
  train = json.loads(r.stdout.splitlines()[-1].removeprefix('BENCH_JSON '))['train']
  assert train['configs/shakespeare.py:tiny']['jax']['ms_per_step'] > 0
  # The PyTorch reference is plain GPT-2: comparing it with a rotary model is refused, in one line.
  r = subprocess.run(args + ['--vs_torch'], capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode != 0 and 'rotary' in r.stderr and 'Traceback' not in r.stderr


def test_weight_bytes_counts_every_parameter():
  cfg, _ = bench.setting('tiny')
  from gpt_jax.model import count_params, init_params
  assert bench.weight_bytes(cfg) == 4 * count_params(init_params(cfg, jax.random.PRNGKey(0)))


def test_peak_rss_is_read_and_reset():
  before = bench.peak_rss_mb()
  assert before > 10  # A Python process with JAX loaded.
  block = np.ones(256 << 20, dtype=np.uint8)  # 256 MB, touched: the peak must rise by about that.
  with_block = bench.peak_rss_mb()
  assert with_block >= before + 200
  del block
  if bench.reset_peak_rss():
    # Other threads may allocate a little meanwhile, so the test compares against the block's size,
    # not the exact figure from before.
    assert bench.peak_rss_mb() < with_block - 200

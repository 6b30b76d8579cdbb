"""Helpers shared by the multi-device tests and their worker processes (tests/parallel, tests/data).

The workers run a test file as a script, so this module is imported by path (tests/ on sys.path).
"""

import json
import os

from configs import shakespeare

from conftest import COMPILATION_CACHE_ENV, make_synthetic_text

STEPS = 20
RESULT = 'RESULT '  # A worker prints one line `RESULT {json}` that the test parses.


def worker_env(n_devices: int) -> dict:
  """The environment of a worker process with `n_devices` CPU devices: this one's, less its JAX_ and
  XLA_ settings, plus the device count. It keeps the test session's compilation cache
  (tests/conftest.py), so that a program another worker or an earlier run compiled (the same mesh,
  the resumed run) loads from disk instead of compiling again."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'XLA_')) or k in COMPILATION_CACHE_ENV}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={n_devices}', JAX_PLATFORMS='cpu',
             PYTHONUNBUFFERED='1')
  return env


def tiny_config(root: str, mesh=(-1, 1), eval_tokens: int = 0):
  """The `tiny` preset on synthetic text: 20 steps, a loss logged every step, evals at 0/10/20."""
  text = os.path.join(root, 'input.txt')
  if not os.path.exists(text):
    os.makedirs(root, exist_ok=True)
    with open(text, 'w', encoding='utf-8') as f:
      f.write(make_synthetic_text())
  c = shakespeare.get_config('tiny')
  c.out_dir = os.path.join(root, 'out')
  c.data.update(text_path=text, data_dir=os.path.join(root, 'data'),
                cache_dir=os.path.join(root, 'cache'))
  c.train.update(max_steps=STEPS, eval_interval=10, log_interval=1, peak_flops=1e12)
  c.checkpoint.update(save='always', async_save=False)
  c.sample.eval_tokens = eval_tokens
  c.mesh.update(data=mesh[0], fsdp=mesh[1])
  return c


def run_losses(out_dir: str) -> dict:
  """{'train': {step: loss}, 'val': {step: val_loss}} from a run's metrics.jsonl (last write wins)."""
  out = {'train': {}, 'val': {}}
  with open(os.path.join(out_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    for rec in map(json.loads, f):
      if 'val_loss' in rec:
        out['val'][str(rec['step'])] = rec['val_loss']
      elif 'train_loss' in rec:
        out['train'][str(rec['step'])] = rec['train_loss']
  return out


def max_delta(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  return max(abs(a[k] - b[k]) for k in a)

"""Step time against train.steps_per_call: K train steps per jitted call (gpt_jax/training/multi_step.py).

  python scripts/bench_steps_per_call.py                                # tiny and cpu presets, K = 1, 5, 10
  python scripts/bench_steps_per_call.py --presets tiny --ks 1,2,10 --steps 200 --rounds 7

Each preset's model, batch and optimizer (configs/shakespeare.py) on random tokens of TinyShakespeare's
vocabulary, resident on the device as in training. Every K has its own state and its calls compiled up
front; then each round times `--steps` steps of every K in turn, waiting as the training loop does (on a
CPU after each call that passes a multiple of run_setup.CPU_MAX_STEPS_IN_FLIGHT steps, and at the end),
so all K share the machine's load alike. Prints ms/step, the median and the best of the rounds (on a
busy machine the best is the closer to the step's own cost), each with its speed-up over the first K,
and a final line `BENCH_JSON {...}`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Lets `python scripts/bench_steps_per_call.py` import gpt_jax from the checkout.

from gpt_jax import allocator  # noqa: E402

allocator.preload()  # Re-executes this script once on mimalloc, as training does (gpt_jax/allocator.py).


def bench_preset(preset: str, ks: list[int], steps: int, rounds: int) -> dict:
  """{K: {'ms_per_step': [one per round], 'compile_s': ...}} for one preset of configs/shakespeare.py."""
  import jax
  import numpy as np

  from configs import shakespeare
  from gpt_jax import config as config_lib, optim
  from gpt_jax.data import batches
  from gpt_jax.model import GPT
  from gpt_jax.parallel import mesh as mesh_lib
  from gpt_jax.training import multi_step, run_setup, step as step_lib

  cfg = shakespeare.get_config(preset)
  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model_cfg = config_lib.model_config_from(cfg, 65)  # TinyShakespeare's characters; tokens are random.
  tokens = np.random.RandomState(0).randint(0, 65, 200_000).astype(np.uint16)
  source = batches.ResidentBatches({'train': tokens}, model_cfg.block_size, t.batch_size,
                                   t.grad_accum_steps, mesh)
  state = step_lib.init_train_state(model_cfg, t, mesh)
  # Each K trains a copy of one state: the jitted calls' shardings hold the state's optimizer itself.
  fresh = lambda: jax.tree_util.tree_map(lambda a: a.copy(), state)
  step_fn = functools.partial(step_lib.train_step, model=GPT(model_cfg), draw=source.draw,
                              batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                              schedule=optim.lr_schedule(t), mesh=mesh)
  shardings = (mesh_lib.state_shardings(state, mesh), mesh_lib.replicated(mesh))
  bounded = run_setup.dispatch_is_bounded()
  runs = {}
  for k in ks:
    calls = multi_step.Steps(step_fn, k, source, mesh, shardings)
    s = fresh()
    t0 = time.perf_counter()
    calls.compile(s, k)
    runs[k] = {'calls': calls, 'state': s, 'step': 0, 'compile_s': time.perf_counter() - t0,
               'ms_per_step': []}

  def run(r: dict, k: int, n: int) -> None:
    """n steps in calls of k from where this K's state is; waits as the loop does, and at the end."""
    for _ in range(n // k):
      r['state'], metrics = r['calls'](r['state'], r['step'], k)
      r['step'] += k
      if bounded and r['step'] % run_setup.CPU_MAX_STEPS_IN_FLIGHT < k:
        metrics['loss'].block_until_ready()
    metrics['loss'].block_until_ready()

  for k, r in runs.items():  # A warm-up round, untimed.
    run(r, k, steps)
  for _ in range(rounds):
    for k, r in runs.items():
      t0 = time.perf_counter()
      run(r, k, steps)
      r['ms_per_step'].append(1e3 * (time.perf_counter() - t0) / steps)
  return {k: {'ms_per_step': r['ms_per_step'], 'compile_s': r['compile_s']} for k, r in runs.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--presets', default='tiny,cpu', help='Comma-separated presets of configs/shakespeare.py.')
  p.add_argument('--ks', default='1,5,10', help='Comma-separated steps_per_call values to compare.')
  p.add_argument('--steps', type=int, default=0,
                 help='Steps per K per round (a multiple of every K; 0: 100 for tiny, 20 otherwise).')
  p.add_argument('--rounds', type=int, default=15, help='Timed rounds (median and best reported).')
  args = p.parse_args()
  ks = [int(k) for k in args.ks.split(',') if k]
  if not ks or min(ks) < 1:
    p.error('--ks: integers >= 1')
  lcm = math.lcm(*ks)
  import jax
  dev = jax.devices()[0]
  print(f'JAX {jax.__version__} on {jax.default_backend()} ({dev.device_kind}, {os.cpu_count()} cores)')
  print(f'{"preset":<8} {"K":>4} {"median ms/step":>15} {"speed-up":>8} {"best ms/step":>13} {"speed-up":>8} '
        f'{"compile s":>10}')
  result = {}
  for preset in filter(None, args.presets.split(',')):
    steps = args.steps or (100 if preset == 'tiny' else 20)
    steps = max(lcm, steps // lcm * lcm)
    res = bench_preset(preset, ks, steps, args.rounds)
    for k in ks:
      res[k].update(median_ms_per_step=statistics.median(res[k]['ms_per_step']),
                    best_ms_per_step=min(res[k]['ms_per_step']), steps=steps)
    med0, best0 = res[ks[0]]['median_ms_per_step'], res[ks[0]]['best_ms_per_step']
    for k in ks:
      med, best = res[k]['median_ms_per_step'], res[k]['best_ms_per_step']
      print(f'{preset:<8} {k:>4} {med:>15.2f} {med0 / med:>7.2f}x {best:>13.2f} {best0 / best:>7.2f}x '
            f'{res[k]["compile_s"]:>10.1f}')
    result[preset] = {str(k): v for k, v in res.items()}
  print('BENCH_JSON ' + json.dumps({'backend': jax.default_backend(), 'device': dev.device_kind,
                                    'ks': ks, 'presets': result}, sort_keys=True))


if __name__ == '__main__':
  main()

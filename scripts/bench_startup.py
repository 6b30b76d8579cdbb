"""Start-up time of scripts/train.py: cold (a fresh compilation cache) and warm (the same cache again),
with the train step compiled in the background (the default) and sequentially (as before).

  python scripts/bench_startup.py                                  # tiny, cpu, speedrun; 3 steps each
  python scripts/bench_startup.py --presets tiny --steps 5 --rounds 2

Each measurement is a fresh `python scripts/train.py --config configs/shakespeare.py:PRESET` process with
train.max_steps=--steps and its own train.compilation_cache_dir: a new, empty one for the cold run, the
same one again for the warm run. `GPT_JAX_STARTUP=sequential` gives the sequential start-up
(gpt_jax/training/startup.py): the train step compiles on its first call, after the step-0 eval. Within
a round the four runs of a preset alternate (the order rotates from round to round), so they see the
same machine. The data is prepared once, before any timing.

Reported per preset and run, the median over the rounds: seconds from the process's start to its first
step done (imports and JAX's start included) and to its exit; from the run's `startup` record in
metrics.jsonl, the same from train.py's start, the train step's compile time and how long the first step
waited for it, and how many of the programs compiled before the first step came from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _bootstrap  # (makes `gpt_jax` importable from a checkout)

RUNS = [('sequential', 'cold'), ('background', 'cold'), ('sequential', 'warm'), ('background', 'warm')]
FIRST_STEP_LINE = 'compiled and ran the first step'


def environment(mode: str) -> dict[str, str]:
  """The child's environment: no other compilation cache than the run's own, the start-up mode."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_PERSISTENT_CACHE'))}
  env.update(GPT_JAX_COMPILATION_CACHE='off', PYTHONUNBUFFERED='1')
  env.pop('GPT_JAX_STARTUP', None)
  if mode == 'sequential':
    env['GPT_JAX_STARTUP'] = 'sequential'
  return env


def train_once(preset: str, steps: int, mode: str, cache_dir: str, work: str, tag: str) -> dict:
  """One train.py process; its seconds to the first step done and to exit, and its startup record."""
  out_dir = os.path.join(work, f'out_{tag}')
  cmd = [sys.executable, os.path.join(_bootstrap.REPO_ROOT, 'scripts', 'train.py'),
         f'--config={os.path.join(_bootstrap.REPO_ROOT, "configs", "shakespeare.py")}:{preset}',
         f'--config.out_dir={out_dir}', f'--config.data.data_dir={os.path.join(work, "data")}',
         f'--config.train.max_steps={steps}', f'--config.train.compilation_cache_dir={cache_dir}']
  t0 = time.perf_counter()
  first_step, lines = None, []
  with subprocess.Popen(cmd, env=environment(mode), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as proc:
    for line in proc.stdout:
      lines.append(line)
      if first_step is None and line.startswith(FIRST_STEP_LINE):
        first_step = time.perf_counter() - t0
  wall = time.perf_counter() - t0
  if proc.returncode or first_step is None:
    sys.exit(f'{preset} ({mode}) failed with status {proc.returncode}:\n{"".join(lines)[-3000:]}')
  with open(os.path.join(out_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    record = next(r for r in map(json.loads, f) if r.get('event') == 'startup')
  shutil.rmtree(out_dir)
  return {'process_first_step_s': first_step, 'process_exit_s': wall, **record}


def print_table(results: dict[str, dict[str, list[dict]]], steps: int) -> None:
  """One markdown table: medians over the rounds of each (preset, start-up, cache)."""
  rounds = len(next(iter(next(iter(results.values())).values())))
  print(f'\nmedian of {rounds} round(s); each run is one `scripts/train.py` process of {steps} steps')
  print('| preset | start-up | cache | first step done (process) | first step done (train.py) | '
        'train step compile | waited for it | programs from cache | start to exit |')
  print('|---|---|---|---|---|---|---|---|---|')
  for preset, runs in results.items():
    for name, rs in runs.items():
      mode, cache = name.split('/')
      med = lambda key, rs=rs: statistics.median(r[key] for r in rs)  # noqa: E731
      print(f'| {preset} | {mode} | {cache} | {med("process_first_step_s"):.1f} s | '
            f'{med("first_step_seconds"):.1f} s | {med("step_compile_seconds"):.1f} s | '
            f'{med("step_wait_seconds"):.1f} s | {med("programs_from_cache"):.0f} of {med("programs"):.0f} | '
            f'{med("process_exit_s"):.1f} s |')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--presets', default='tiny,cpu,speedrun', help='Comma-separated configs/shakespeare.py presets.')
  p.add_argument('--steps', type=int, default=3, help='train.max_steps of each run.')
  p.add_argument('--rounds', type=int, default=1, help='Rounds; each runs the four start-ups once.')
  p.add_argument('--workdir', default='', help='Where runs, data and caches go (default: a temporary folder).')
  args = p.parse_args()
  work = args.workdir or tempfile.mkdtemp(prefix='gpt_jax_bench_startup_')
  os.makedirs(work, exist_ok=True)
  prepare = [sys.executable, os.path.join(_bootstrap.REPO_ROOT, 'scripts', 'prepare_data.py'),
             f'--config.data.data_dir={os.path.join(work, "data")}']
  subprocess.run(prepare, check=True, env=environment('background'), stdout=subprocess.DEVNULL)
  results: dict[str, dict[str, list[dict]]] = {}
  for preset in filter(None, args.presets.split(',')):
    results[preset] = {f'{mode}/{cache}': [] for mode, cache in RUNS}
    for r in range(args.rounds):
      caches = {mode: os.path.join(work, f'cache_{preset}_{r}_{mode}') for mode, _ in RUNS}
      order = RUNS if r % 2 == 0 else [RUNS[1], RUNS[0], RUNS[3], RUNS[2]]  # Cold before warm.
      for mode, cache in order:
        res = train_once(preset, args.steps, mode, caches[mode], work, f'{preset}_{r}_{mode}_{cache}')
        results[preset][f'{mode}/{cache}'].append(res)
        print(f'  {preset} round {r + 1}/{args.rounds} {mode} {cache}: first step done '
              f'{res["process_first_step_s"]:.1f} s after the process started', file=sys.stderr, flush=True)
      for d in caches.values():
        shutil.rmtree(d, ignore_errors=True)
  print_table(results, args.steps)
  print('BENCH_JSON ' + json.dumps({'steps': args.steps, 'results': results}))
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()

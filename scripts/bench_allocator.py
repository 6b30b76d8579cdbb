"""The train step under each malloc: glibc, mimalloc (the pip wheel the scripts preload), tcmalloc, jemalloc.

  python scripts/bench_allocator.py                            # baby step, 5 rounds
  python scripts/bench_allocator.py --settings baby,char --rounds 3
  python scripts/bench_allocator.py --extra tcmalloc-gperf=/path/libtcmalloc.so,TCMALLOC_RELEASE_RATE=0

Every measurement runs in a fresh subprocess with the candidate in LD_PRELOAD; the candidates
alternate within each round (and the order rotates from round to round), so all of them see the
same machine at the same moment. Reported per candidate: ms per step (median and range over the
rounds) and its ratio to glibc, CPU and kernel time, minor page faults, peak RSS, and whether the
losses are bit-identical to glibc's. tcmalloc and jemalloc are included when the system has them
(Debian: libtcmalloc-minimal4, libjemalloc2). Prints a table per setting and `BENCH_JSON {...}`;
`--table FILE` prints the tables of a saved output again.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import _bootstrap  # (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator

_ALLOCATOR_ENV = ('LD_PRELOAD', 'MALLOC_CONF', allocator.ENV_VAR, *allocator.MIMALLOC_ENV)


def candidates(extra: list[str]) -> dict[str, dict[str, str]]:
  """name -> environment overrides (LD_PRELOAD and tuning) for every allocator found here."""
  out = {'glibc': {}}
  lib = allocator.library_path()
  if lib:
    out['mimalloc'] = {'LD_PRELOAD': lib, **allocator.MIMALLOC_ENV}
    out['mimalloc (its defaults)'] = {'LD_PRELOAD': lib}
  for name, lib_name in (('tcmalloc', 'tcmalloc'), ('tcmalloc', 'tcmalloc_minimal'),
                         ('jemalloc', 'jemalloc')):
    found = ctypes.util.find_library(lib_name)
    if found and name not in out:
      out[name] = {'LD_PRELOAD': found}
  if 'jemalloc' in out:
    # No decay: keep freed pages instead of returning them to the OS after 10 s (the default).
    out['jemalloc'] = {**out['jemalloc'], 'MALLOC_CONF': 'dirty_decay_ms:-1,muzzy_decay_ms:-1'}
  for e in extra:  # NAME=LIBRARY[,VAR=VALUE...]
    name, _, spec = e.partition('=')
    path, *env = spec.split(',')
    out[name] = {'LD_PRELOAD': path, **dict(v.split('=', 1) for v in env)}
  return out


def child(setting: str, steps: int, warmup: int) -> dict:
  """Runs in the subprocess: compiles the train step, then times `steps` steps after `warmup`."""
  import functools

  import jax
  import jax.numpy as jnp

  from gpt_jax import optim
  from gpt_jax.config_files import load_config_file
  from gpt_jax.lab import bench
  from gpt_jax.model import GPT
  from gpt_jax.training import step as step_lib

  cfg, batch_size = bench.setting(setting)
  tcfg = load_config_file(os.path.join(_bootstrap.REPO_ROOT, 'configs', 'shakespeare.py')).train
  tcfg.batch_size = batch_size
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(cfg), batch_size=batch_size,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(tcfg)),
                 donate_argnums=0)
  data = jnp.asarray(bench.synthetic_tokens())
  state = step_lib.init_train_state(cfg, tcfg)
  losses = []
  for _ in range(1 + warmup):  # Compilation, XLA's first-use kernel setup, allocator warm-up.
    state, m = step(state, data)
    losses.append(float(m['loss']))
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  faults = [r0.ru_minflt]
  for _ in range(steps):
    state, m = step(state, data)
    losses.append(float(m['loss']))  # Blocks: each step is timed whole.
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
  dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  return {'steps': steps, 'ms_per_step': 1e3 * dt / steps, 'minflt_per_step': (r1.ru_minflt - r0.ru_minflt) / steps,
          'sys_ms_per_step': 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
          'user_ms_per_step': 1e3 * (r1.ru_utime - r0.ru_utime) / steps,
          'minflt_steps': [b - a for a, b in zip(faults, faults[1:])],
          'peak_rss_mb': bench.peak_rss_mb(), 'losses': losses, 'malloc': allocator.loaded_allocator()}


def print_table(setting: str, runs: dict[str, list[dict]]) -> None:
  """One markdown table: medians over the runs of each candidate, ratios against glibc."""
  ref = statistics.median(x['ms_per_step'] for x in runs['glibc']) if 'glibc' in runs else None
  ref_losses = runs['glibc'][0]['losses'] if 'glibc' in runs else None
  first = next(iter(runs.values()))
  print(f'\n{setting}: median of {len(first)} runs per allocator; a run is one process timing '
        f'{first[0].get("steps", "its")} steps after warm-up')
  print('| allocator | ms/step (range) | vs glibc | CPU ms/step (sys) | minor faults/step | '
        'peak RSS MB | losses = glibc | preloaded |')
  print('|---|---|---|---|---|---|---|---|')
  med = lambda rs, f: statistics.median(f(x) for x in rs)
  for name, rs in runs.items():
    ms = med(rs, lambda x: x['ms_per_step'])
    same = ('yes' if all(x['losses'] == ref_losses for x in rs) else 'NO') if ref_losses else '-'
    mapped = {os.path.basename(x['malloc']) if x['malloc'] else '-' for x in rs}
    print(f'| {name} | {ms:.1f} ({min(x["ms_per_step"] for x in rs):.1f}-'
          f'{max(x["ms_per_step"] for x in rs):.1f}) | {f"{ref / ms:.2f}x" if ref else "-"} | '
          f'{med(rs, lambda x: x["user_ms_per_step"] + x["sys_ms_per_step"]):.1f} '
          f'({med(rs, lambda x: x["sys_ms_per_step"]):.1f}) | {med(rs, lambda x: x["minflt_per_step"]):,.0f} | '
          f'{med(rs, lambda x: x["peak_rss_mb"]):.0f} | {same} | {", ".join(sorted(mapped))} |')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--settings', default='baby', help='Comma-separated: baby, char, tiny (gpt_jax/lab/bench.py).')
  p.add_argument('--rounds', type=int, default=5, help='Rounds; each runs every candidate once.')
  p.add_argument('--steps', type=int, default=0, help='Timed steps per run (0: 100 baby, 3 char).')
  p.add_argument('--warmup', type=int, default=0, help='Untimed steps after the first (0: 10 baby, 1 char).')
  p.add_argument('--only', default='', help='Comma-separated candidate names to run (default: all found).')
  p.add_argument('--extra', action='append', default=[],
                 help='NAME=LIBRARY[,VAR=VALUE...]: one more candidate (library and its settings).')
  p.add_argument('--table', default='', help='Only print the tables of a saved BENCH_JSON line.')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.table:
    with open(args.table) as f:
      saved = json.loads(f.read().split('BENCH_JSON ', 1)[1])
    for setting, runs in saved['settings'].items():
      print_table(setting, runs)
    return
  if args.child:
    print('CHILD_JSON ' + json.dumps(child(args.child, args.steps, args.warmup)))
    return

  cands = candidates(args.extra)
  if args.only:
    cands = {k: v for k, v in cands.items() if k in args.only.split(',')}
  base = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV}
  result = {'candidates': cands, 'settings': {}}
  for setting in filter(None, args.settings.split(',')):
    big = setting == 'char'
    steps, warmup = args.steps or (3 if big else 100), args.warmup or (1 if big else 10)
    runs = {name: [] for name in cands}
    names = list(cands)
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        cmd = [sys.executable, os.path.abspath(__file__), f'--child={setting}', f'--steps={steps}',
               f'--warmup={warmup}']
        out = subprocess.run(cmd, env={**base, **cands[name]}, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith('CHILD_JSON ')]
        if out.returncode or not line:
          sys.exit(f'{name} failed (status {out.returncode}):\n{out.stderr[-2000:]}')
        runs[name].append(json.loads(line[0].split(' ', 1)[1]))
        print(f'  {setting} round {r + 1}/{args.rounds} {name}: {runs[name][-1]["ms_per_step"]:.1f} ms/step',
              file=sys.stderr, flush=True)
    result['settings'][setting] = runs
    print_table(setting, runs)
  print('BENCH_JSON ' + json.dumps(result))


if __name__ == '__main__':
  main()

"""The GPU check: one command that tells what gpt_jax does on this machine's GPU (docs/gpu.md).

    bash scripts/gpu_check.sh                    # on one H100/H200: at most 10 minutes (BUDGET below)
    bash scripts/gpu_check.sh --dry_run          # every stage at tiny sizes, on any machine

Stages, each made of subprocesses with their own time limits, so one failure never hides the rest:
  environment         Python, jax/jaxlib (and a CUDA plugin), flax, optax, orbax, ml_collections: what
                      is installed and what is missing. Uses the CUDA-enabled JAX already installed;
                      with none, installs jax[cuda13]==0.11.2, what the one GPU run used (JAX_GPU;
                      unless --no_install: the machine may have no network).
  gpu_tests           the GPU test tier: pytest -m gpu on the files that hold it (GPU_TESTS).
  train               the `gpu` preset to its end (start-to-exit time, time to val <= 1.47 at the
                      evals), then scripts/evaluate.py's full pass over the validation text.
  step_gpu            that run's train step: ms/step, tokens/s, MFU (its logged windows after the first).
  gpu_speedrun_cold   the `gpu_speedrun` preset with a fresh compilation cache: start-to-exit time,
                      time to the first step, time to target, then evaluate.py's full pass.
  gpu_speedrun_warm   the same run again on the cache the cold run filled.
  gpu_speedrun_seeds  seeds 2 and 3 (warm cache): each run's full-pass val, and the mean of the three.
  deterministic       the gpu_speedrun run twice under XLA_FLAGS=--xla_gpu_deterministic_ops=true: are
                      the logged losses bit for bit the same, and what the flag costs in ms/step.
  step_gpt2_best      GPT-2 124M's step (configs/gpt2.py:gpt2_gpu) at a few settings (GPT2_SETTINGS):
                      tokens/s of each, and the best.
Each stage's targets (TARGETS) are judged in one table printed at the end and written, with every
figure, as JSON (--out/gpu_check.json, rewritten after every stage). Exit status: 0 every stage ran
and met its targets; 1 a stage failed to run; 3 every stage ran but a target was missed.
Stdlib only: this file must run where ml_collections (or even jax) is missing, to say so.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml_collections', 'numpy')
CUDA_PLUGINS = ('jax-cuda13-plugin', 'jax-cuda12-plugin')
# What the one GPU run so far used (an H200 with a CUDA 13 driver; docs/gpu.md): jax 0.11.2 with its
# CUDA 13 plugin. The CPU pin of requirements.txt has not been run on a GPU. A CUDA 12 driver needs
# the jax-cuda12-plugin instead.
JAX_GPU = 'jax[cuda13]==0.11.2'
# The files holding the gpu-marked tests (tests/test_gpu_check.py checks that none is missing). Not
# `tests` whole: collecting every module needs the dev requirements (jupytext), a GPU machine may lack.
GPU_TESTS = ('tests/gpu', 'tests/test_lower_cuda.py')


# What each stage must reach on one H100/H200: (figure in its result, comparison, bound).
TARGETS = {
    'train': [('wall_seconds', '<=', 60), ('full_pass_val_loss', '<=', 1.47)],
    'gpu_speedrun_cold': [('wall_seconds', '<=', 45), ('full_pass_val_loss', '<=', 1.47)],
    'gpu_speedrun_warm': [('wall_seconds', '<=', 20), ('full_pass_val_loss', '<=', 1.47)],
    'gpu_speedrun_seeds': [('worst_val_loss', '<=', 1.48), ('mean_val_loss', '<=', 1.47)],
    'deterministic': [('bit_identical', '==', True)],
    'step_gpt2_best': [('best_tokens_per_s', '>=', 470_000)],
}

# Seconds each subprocess may run on one H100/H200. They add up to the check's ceiling (budget()), so
# a run that hangs costs its own limit and nothing more; one stopped at its limit counts as failed,
# with the figures it logged so far. --time_scale multiplies them all.
LIMITS = {'probe': 15, 'gpu_tests': 105, 'train': 75, 'train_eval': 15, 'speedrun_cold': 55,
          'speedrun_warm': 30, 'speedrun_eval': 20, 'speedrun_seed': 30, 'deterministic_first': 50,
          'deterministic_second': 30, 'gpt2_setting': 40,
          'gpt2_data': 5}  # The first GPT-2 run also prepares GPT-2's BPE data.
DRY_LIMIT = 300  # --dry_run: any machine, any load; the limit only catches a hang.

# GPT-2 124M step settings: overrides of configs/gpt2.py:gpt2_gpu (bf16, cuDNN attention, 32 rows of
# 1024 tokens). Each costs a start-up and a compilation (LIMITS['gpt2_setting']), so the default sweep
# holds three.
GPT2_SETTINGS = {
    'b16': ['--config.train.batch_size=16'],  # The earlier step_gpt2 stage's setting.
    'b32': [],
    'b32_remat': ['--config.model.remat=True'],
    'b32_spc4': ['--config.train.steps_per_call=4'],
}
GPT2_DEFAULT = ('b16', 'b32', 'b32_spc4')
GPT2_STEPS, GPT2_LOG = 24, 8  # Steps per setting; logged every 8 (a multiple of steps_per_call).

STAGES = ('environment', 'gpu_tests', 'train', 'step_gpu', 'gpu_speedrun_cold', 'gpu_speedrun_warm',
          'gpu_speedrun_seeds', 'deterministic', 'step_gpt2_best')
SPEEDRUN = 'configs/shakespeare.py:gpu_speedrun'
# The folders the stages write under --out, removed when a check starts (its prepared data is kept).
RUN_DIRS = ('jax_cache', 'train', 'gpu_speedrun_cold', 'gpu_speedrun_warm', 'gpu_speedrun_seed2',
            'gpu_speedrun_seed3', 'deterministic_1', 'deterministic_2', *(f'step_gpt2_{s}' for s in GPT2_SETTINGS))
DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'
# The time to the first step: a train run's {'event': 'startup', ...} record in metrics.jsonl where it
# writes one, else its log line.
STARTUP_FIRST_STEP = 'first_step_seconds'
FIRST_STEP_LINE = re.compile(r'compiled and ran the first step in ([0-9.]+)s')
# --dry_run: the speedrun presets at the `tiny` size, a few steps, on the first 60,000 characters.
DRY_SIZE = ['--config.model.n_layer=2', '--config.model.n_head=2', '--config.model.n_embd=32',
            '--config.model.block_size=32', '--config.train.batch_size=8', '--config.train.warmup_steps=2']
DRY_SPEEDRUN = DRY_SIZE + ['--config.train.max_steps=10', '--config.train.lr_decay_steps=10',
                           '--config.train.eval_interval=10', '--config.train.log_interval=5',
                           '--config.train.eval_iters=2', '--config.train.steps_per_call=5']
DRY_CHARS = 60_000


def version(name: str) -> Optional[str]:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def run(cmd: list[str], log: str, timeout: float, env: Optional[dict] = None) -> tuple[int, float, str]:
  """Runs `cmd` from the repository root, output to `log`; (status, seconds, last lines). 124 = timed out."""
  t0 = time.time()
  with open(log, 'w', encoding='utf-8') as f:
    try:
      status = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              env=env, check=False).returncode
    except subprocess.TimeoutExpired:
      status = 124
  with open(log, encoding='utf-8', errors='replace') as f:
    tail = ''.join(f.readlines()[-5:])
  return status, time.time() - t0, tail


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def mean(values: list[float]) -> Optional[float]:
  return sum(values) / len(values) if values else None


def environment(args, limit: float = 60) -> dict:
  """What is installed, and whether JAX sees a GPU (installing JAX_GPU if allowed and needed)."""
  info = {'python': platform.python_version(), **{p: version(p) for p in PACKAGES + CUDA_PLUGINS}}
  missing = [p for p in PACKAGES if info[p] is None]
  probe = [sys.executable, '-c', 'import jax; d = jax.devices(); print(jax.default_backend(), '
           'len(d), d[0].device_kind, sep="|")']
  def backend():
    try:
      p = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=limit)
    except subprocess.TimeoutExpired:
      return None
    return p.stdout.strip().split('|') if p.returncode == 0 else None
  found = backend() if 'jax' not in missing else None
  if (not args.dry_run and not args.no_install and (found is None or found[0] != 'gpu')
      and not any(info[p] for p in CUDA_PLUGINS)):
    print(f'no CUDA-enabled JAX here: pip install -U "{JAX_GPU}" (needs the network) ...', flush=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-U', JAX_GPU], check=False)
    info.update({p: version(p) for p in PACKAGES + CUDA_PLUGINS})
    found = backend()
  if found:
    info.update(backend=found[0], devices=int(found[1]), device_kind=found[2])
  problems = [f'missing packages: {", ".join(missing)} (pip install {" ".join(missing)})'] if missing else []
  if found is None and 'jax' not in missing:
    problems.append('jax is installed but cannot start (see `python -c "import jax; jax.devices()"`)')
  elif found and found[0] != 'gpu' and not args.dry_run:
    problems.append(f'JAX runs on {found[0]}, not a GPU: install a CUDA-enabled JAX '
                    f'(pip install -U "{JAX_GPU}", or the CUDA plugin matching your jax and driver)')
  info['ok'] = not problems
  info['problems'] = problems
  return info


def run_figures(records: list[dict], log: str) -> dict:
  """A train run's figures from its metrics.jsonl records and its log."""
  evals = [r for r in records if 'val_loss' in r and 'event' not in r]
  timed = [r for r in records if 'ms_per_step' in r]
  timed = timed[1:] or timed  # The first window holds the compilation's aftermath.
  hit = next((r for r in records if r.get('event') == 'target_reached'), None)
  startup = next((r for r in records if r.get('event') == 'startup'), None)
  out = {'final_val_loss': evals[-1]['val_loss'] if evals else None,
         'best_eval_val_loss': min((r['val_loss'] for r in evals), default=None),
         'seconds_to_target': hit['time'] if hit else None, 'timed_windows': len(timed)}
  if timed:
    out.update(ms_per_step=round(mean([r['ms_per_step'] for r in timed]), 3),
               tokens_per_s=round(mean([r['tokens_per_s'] for r in timed])),
               mfu=round(mean([r['mfu'] for r in timed]), 4))
  if startup is not None:
    out['startup'] = startup
  if startup is not None and STARTUP_FIRST_STEP in startup:
    out.update(first_step_seconds=startup[STARTUP_FIRST_STEP], first_step_from='startup record')
  elif os.path.exists(log):
    with open(log, encoding='utf-8', errors='replace') as f:
      found = FIRST_STEP_LINE.search(f.read())
    if found:
      out.update(first_step_seconds=float(found.group(1)), first_step_from='log: compile + first step')
  return out


def trajectory(records: list[dict]) -> list[tuple]:
  """Every logged loss and gradient norm, by step: what two identical runs must repeat bit for bit."""
  keys = ('train_loss', 'val_loss', 'grad_norm')
  return [(r['step'], *(r.get(k) for k in keys)) for r in records if 'step' in r and 'event' not in r]


def first_difference(a: list[tuple], b: list[tuple]) -> Optional[list]:
  for x, y in zip(a, b):
    if x != y:
      return [x, y]
  return None if len(a) == len(b) else [len(a), len(b)]


class Check:
  """The stages, run in order against one --out folder; each returns its result dict."""

  def __init__(self, args):
    self.args, self.dry = args, args.dry_run
    self.out = os.path.abspath(args.out)
    self.trajectories: dict[str, list] = {}
    self.runs: dict[str, dict] = {}

  def limit(self, name: str) -> float:
    return DRY_LIMIT if self.dry else LIMITS[name] * self.args.time_scale

  def data(self, tokenizer: str = 'char') -> list[str]:
    """Where a run's data goes; the dry run's is a slice of the shipped text (small, quick to prepare)."""
    if self.dry:
      text = os.path.join(self.out, 'dry_run.txt')
      if not os.path.exists(text):
        with open(os.path.join(REPO, 'gpt_jax', 'data', 'assets', 'tinyshakespeare.txt'),
                  encoding='utf-8') as f, open(text, 'w', encoding='utf-8') as g:
          g.write(f.read(DRY_CHARS))
      return [f'--config.data.text_path={text}', f'--config.data.data_dir={os.path.join(self.out, "data_dry")}']
    return [f'--config.data.data_dir={os.path.join(self.out, "data" if tokenizer == "char" else "data_gpt2")}']

  def cache(self, group: str, extra_env: Optional[dict] = None) -> tuple[list[str], dict]:
    """(overrides, environment) of a run keeping compiled programs in <out>/jax_cache/<group>."""
    path = os.path.join(self.out, 'jax_cache', group)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=path, GPT_JAX_COMPILATION_CACHE=path, **(extra_env or {}))
    return [f'--config.train.compilation_cache_dir={path}'], env

  def train(self, name: str, config: str, overrides: list[str], limit: str, group: str,
            tokenizer: str = 'char', extra_env: Optional[dict] = None, extra_seconds: float = 0) -> dict:
    """One scripts/train.py run into <out>/<name>: exit status, start-to-exit seconds, its figures."""
    run_dir = os.path.join(self.out, name)
    cache_args, env = self.cache(group, extra_env)
    cmd = [sys.executable, 'scripts/train.py', f'--config={config}', f'--config.out_dir={run_dir}',
           *self.data(tokenizer), *cache_args, *overrides]
    log = os.path.join(self.out, f'{name}.log')
    status, seconds, tail = run(cmd, log, self.limit(limit) + extra_seconds, env)
    records = read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))
    self.trajectories[name] = trajectory(records) if status == 0 else []
    res = {'ok': status == 0, 'status': status, 'wall_seconds': round(seconds, 1), **run_figures(records, log)}
    if status != 0:
      res['log_tail'] = tail
    self.runs[name] = res
    return res

  def evaluate(self, name: str, limit: str, res: dict) -> None:
    """evaluate.py's full pass over the validation text on run `name`'s kept checkpoint, into `res`."""
    if not res['ok']:
      return
    path = os.path.join(self.out, f'{name}.eval.json')
    status, seconds, tail = run([sys.executable, 'scripts/evaluate.py',
                                 f'--ckpt_dir={os.path.join(self.out, name)}', f'--output={path}'],
                                os.path.join(self.out, f'{name}.evaluate.log'), self.limit(limit))
    res['ok'] = status == 0
    res['evaluate_seconds'] = round(seconds, 1)
    if status == 0:
      with open(path, encoding='utf-8') as f:
        res['full_pass_val_loss'] = json.load(f)['loss']  # Unrounded: judged against its target.
    else:
      res['log_tail'] = tail

  def gpu_tests(self) -> dict:
    status, seconds, tail = run([sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-p', 'no:cacheprovider',
                                 *GPU_TESTS], os.path.join(self.out, 'gpu_tests.log'), self.limit('gpu_tests'))
    return {'ok': status == 0, 'status': status, 'seconds': round(seconds, 1),
            'summary': (tail.strip().splitlines() or [''])[-1]}

  def train_stage(self) -> tuple[dict, dict]:
    """The `gpu` preset to its end, evaluated; and its step figures as the step_gpu stage."""
    preset = 'tiny' if self.dry else 'gpu'
    dry = ['--config.train.max_steps=15', '--config.train.eval_interval=15', '--config.train.log_interval=5',
           '--config.sample.eval_tokens=0'] if self.dry else []
    res = dict(self.train('train', f'configs/shakespeare.py:{preset}', dry, 'train', 'train'), preset=preset)
    self.evaluate('train', 'train_eval', res)
    step = {'ok': 'ms_per_step' in res, 'from': 'the train stage\'s logged windows after the first',
            **{k: res[k] for k in ('ms_per_step', 'tokens_per_s', 'mfu', 'timed_windows') if k in res}}
    return res, step

  def speedrun(self, name: str, limit: str, overrides: tuple[str, ...] = (), extra_env=None) -> dict:
    return self.train(name, SPEEDRUN, [*(DRY_SPEEDRUN if self.dry else []), *overrides], limit, 'speedrun',
                      extra_env=extra_env)

  def speedrun_cold(self) -> dict:
    shutil.rmtree(os.path.join(self.out, 'jax_cache', 'speedrun'), ignore_errors=True)  # Cold: fresh.
    res = self.speedrun('gpu_speedrun_cold', 'speedrun_cold')
    self.evaluate('gpu_speedrun_cold', 'speedrun_eval', res)
    return res

  def speedrun_warm(self) -> dict:
    res = self.speedrun('gpu_speedrun_warm', 'speedrun_warm')
    self.evaluate('gpu_speedrun_warm', 'speedrun_eval', res)
    return res

  def speedrun_seeds(self) -> dict:
    """Seeds 2 and 3 beside seed 1337 (the warm run; the cold one if it failed): each run's last eval,
    a full pass over the validation text (the preset's train.val_full_pass) on the kept weights."""
    first = next((self.runs[n] for n in ('gpu_speedrun_warm', 'gpu_speedrun_cold')
                  if self.runs.get(n, {}).get('ok')), {})
    vals = {'1337': first.get('final_val_loss')}
    runs = {}
    for seed in (2, 3):
      runs[str(seed)] = r = self.speedrun(f'gpu_speedrun_seed{seed}', 'speedrun_seed',
                                          (f'--config.train.seed={seed}',))
      vals[str(seed)] = r['final_val_loss'] if r['ok'] else None
    got = [v for v in vals.values() if v is not None]
    res = {'ok': all(r['ok'] for r in runs.values()) and len(got) == 3, 'val_loss_by_seed': vals,
           'wall_seconds_by_seed': {s: r['wall_seconds'] for s, r in runs.items()},
           'worst_val_loss': max(got) if len(got) == 3 else None,
           'mean_val_loss': mean(got) if len(got) == 3 else None}
    if not res['ok']:
      res['log_tail'] = next((r['log_tail'] for r in runs.values() if 'log_tail' in r), 'seed 1337 failed')
    return res

  def deterministic(self) -> dict:
    """The speedrun run twice with deterministic XLA:GPU kernels: identical trajectories? The flag's
    cost against the cold and warm runs (the same run without it)."""
    flags = f'{os.environ.get("XLA_FLAGS", "")} {DETERMINISTIC_FLAG}'.strip()
    a = self.speedrun('deterministic_1', 'deterministic_first', extra_env={'XLA_FLAGS': flags})
    b = self.speedrun('deterministic_2', 'deterministic_second', extra_env={'XLA_FLAGS': flags})
    ta, tb = self.trajectories['deterministic_1'], self.trajectories['deterministic_2']
    res = {'ok': a['ok'] and b['ok'] and bool(ta), 'xla_flags': flags, 'compared_records': len(ta),
           'wall_seconds_by_run': [a['wall_seconds'], b['wall_seconds']],
           'bit_identical': bool(ta) and ta == tb, 'first_difference': first_difference(ta, tb)}
    plain = [self.trajectories.get(n) for n in ('gpu_speedrun_cold', 'gpu_speedrun_warm')]
    if all(plain):  # Two runs of the same config without the flag: are they identical anyway?
      res['without_flag_bit_identical'] = plain[0] == plain[1]
      res['without_flag_first_difference'] = first_difference(*plain)
    with_flag = mean([r['ms_per_step'] for r in (a, b) if 'ms_per_step' in r])
    without = mean([self.runs[n]['ms_per_step'] for n in ('gpu_speedrun_cold', 'gpu_speedrun_warm')
                    if 'ms_per_step' in self.runs.get(n, {})])
    if with_flag and without:
      res.update(ms_per_step=round(with_flag, 3), ms_per_step_without_flag=round(without, 3),
                 cost_percent=round(100 * (with_flag / without - 1), 1))
    if not res['ok']:
      res['log_tail'] = next((r['log_tail'] for r in (a, b) if 'log_tail' in r), 'nothing logged')
    return res

  def gpt2_sweep(self, settings: list[str]) -> dict:
    """GPT-2 124M's train step at each setting: tokens/s of each (the logged windows after the first)."""
    config = 'configs/shakespeare.py:tiny' if self.dry else 'configs/gpt2.py:gpt2_gpu'
    steps, every = (8, 4) if self.dry else (GPT2_STEPS, GPT2_LOG)
    common = [f'--config.train.max_steps={steps}', f'--config.train.log_interval={every}',
              f'--config.train.eval_interval={steps}', '--config.train.eval_iters=1',
              '--config.train.eval_at_start=False', '--config.sample.eval_tokens=0']
    rows, extra = {}, self.limit('gpt2_data')
    for name in settings:
      overrides = GPT2_SETTINGS[name]
      r = self.train(f'step_gpt2_{name}', config, common + overrides, 'gpt2_setting', 'gpt2', tokenizer='gpt2',
                     extra_seconds=0 if self.dry else extra)
      extra = 0
      rows[name] = {'overrides': overrides, **{k: r[k] for k in ('ok', 'status', 'wall_seconds', 'ms_per_step',
                                                                  'tokens_per_s', 'mfu', 'log_tail') if k in r}}
    ran = {n: r for n, r in rows.items() if r.get('tokens_per_s')}
    best = max(ran, key=lambda n: ran[n]['tokens_per_s'], default=None)
    return {'ok': all(r.get('ok', True) for r in rows.values()) and best is not None, 'config': config,
            'settings': rows, 'best': best, 'best_tokens_per_s': ran[best]['tokens_per_s'] if best else None}


def judge(name: str, res: dict, dry_run: bool) -> None:
  """res['targets']: each of TARGETS[name] with its value and whether it is met (None: not judged,
  in a dry run at tiny sizes)."""
  out = []
  for figure, op, bound in TARGETS.get(name, []):
    value = res.get(figure)
    met = None if dry_run else value is not None and (
        value <= bound if op == '<=' else value >= bound if op == '>=' else value == bound)
    out.append({'figure': figure, 'target': f'{op} {bound}', 'value': value, 'met': met})
  if out:
    res['targets'] = out


def budget(settings: list[str]) -> dict:
  """Seconds each stage may take on one H100/H200 (the sum of its runs' LIMITS)."""
  runs = len(settings)
  gpt2 = runs * LIMITS['gpt2_setting'] + (LIMITS['gpt2_data'] if runs else 0)
  return {'environment': LIMITS['probe'], 'gpu_tests': LIMITS['gpu_tests'],
          'train': LIMITS['train'] + LIMITS['train_eval'],
          'gpu_speedrun_cold': LIMITS['speedrun_cold'] + LIMITS['speedrun_eval'],
          'gpu_speedrun_warm': LIMITS['speedrun_warm'] + LIMITS['speedrun_eval'],
          'gpu_speedrun_seeds': 2 * LIMITS['speedrun_seed'],
          'deterministic': LIMITS['deterministic_first'] + LIMITS['deterministic_second'],
          'step_gpt2_best': gpt2}


def summary(name: str, r: dict) -> str:
  """One table cell: the stage's main figures."""
  if 'skipped' in r:
    return r['skipped']
  if name == 'environment':
    return (f'python {r["python"]}, jax {r.get("jax")}, {r.get("backend", "?")} x {r.get("devices", "?")} '
            f'({r.get("device_kind", "?")})' + ('; ' + '; '.join(r['problems']) if r['problems'] else ''))
  if name == 'gpu_tests':
    return r.get('summary', '')
  if name in ('step_gpu',):
    return f'{r.get("ms_per_step")} ms/step, {r.get("tokens_per_s")} tok/s, MFU {r.get("mfu")}'
  if name == 'gpu_speedrun_seeds':
    return 'full-pass val by seed: ' + ', '.join(
        f'{s} {v:.4f}' if v is not None else f'{s} failed' for s, v in r['val_loss_by_seed'].items())
  if name == 'deterministic':
    return (f'{r.get("ms_per_step")} ms/step with the flag, {r.get("ms_per_step_without_flag")} without '
            f'({r.get("cost_percent")}%); without it identical: {r.get("without_flag_bit_identical")}')
  if name == 'step_gpt2_best':
    return ', '.join(f'{n} ' + (f'{s["tokens_per_s"]} tok/s' if s.get('tokens_per_s') else
                                'skipped' if 'skipped' in s else 'failed') for n, s in r['settings'].items())
  return (f'first step {r.get("first_step_seconds")} s, to target {r.get("seconds_to_target")} s, '
          f'{r.get("ms_per_step")} ms/step')


def table(results: dict) -> str:
  rows = [('stage', 'ran', 'targets', 'result')]
  for name in STAGES:
    r = results.get(name, {'skipped': 'not run'})
    marks = []
    for t in r.get('targets', []):
      value = round(t['value'], 4) if isinstance(t['value'], float) else t['value']
      verdict = 'not judged' if t['met'] is None else 'PASS' if t['met'] else 'FAIL'
      marks.append(f'{t["figure"]} {value} {t["target"]} {verdict}')
    rows.append((name, '-' if 'skipped' in r else str(r['ok']), '; '.join(marks) or '-', summary(name, r)))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return '\n'.join(f'{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}' for a, b, c, d in rows)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dry_run', action='store_true', help='every stage at tiny sizes, on any device')
  p.add_argument('--out', default=os.path.join(REPO, 'out', 'gpu_check'), help='where logs and JSON go')
  p.add_argument('--no_install', action='store_true', help=f'never pip install {JAX_GPU}')
  p.add_argument('--time_scale', type=float, default=1.0, help='multiplies every run\'s time limit')
  p.add_argument('--gpt2_settings', default=','.join(GPT2_DEFAULT),
                 help=f'comma-separated, of {", ".join(GPT2_SETTINGS)}')
  args = p.parse_args()
  settings = [s.strip() for s in args.gpt2_settings.split(',') if s.strip()]
  if unknown := [s for s in settings if s not in GPT2_SETTINGS]:
    p.error(f'unknown --gpt2_settings {unknown}: use some of {", ".join(GPT2_SETTINGS)}')
  check = Check(args)
  out = check.out
  os.makedirs(out, exist_ok=True)
  # A fresh start: the run folders and compilation caches of an earlier check here (prepared data stays).
  for name in RUN_DIRS:
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
  plan = budget(settings)
  print('time budget on one H100/H200, seconds: ' + ', '.join(f'{k} {v * args.time_scale:g}'
                                                              for k, v in plan.items())
        + f'; total {sum(plan.values()) * args.time_scale:g} (plus any pip install)', flush=True)
  if args.dry_run:
    print(f'dry run: every stage at tiny sizes, each run limited to {DRY_LIMIT} s instead', flush=True)
  results = {'dry_run': args.dry_run, 'budget_seconds': plan}

  def save():
    with open(os.path.join(out, 'gpu_check.json'), 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)

  def stage(name: str, res: dict) -> None:
    judge(name, res, args.dry_run)
    results[name] = res
    save()
    print(f'{name}: {json.dumps(res)[:600]}', flush=True)

  stage('environment', environment(args, check.limit('probe')))
  if not results['environment']['ok']:
    for name in STAGES[1:]:
      results[name] = {'skipped': 'environment not ready'}
  else:
    stage('gpu_tests', check.gpu_tests())
    train, step = check.train_stage()
    stage('train', train)
    stage('step_gpu', step)
    stage('gpu_speedrun_cold', check.speedrun_cold())
    stage('gpu_speedrun_warm', check.speedrun_warm())
    stage('gpu_speedrun_seeds', check.speedrun_seeds())
    stage('deterministic', check.deterministic())
    stage('step_gpt2_best', check.gpt2_sweep(settings))
  save()
  print('\n' + table(results))
  print(f'\nwritten: {os.path.join(out, "gpu_check.json")}')
  ran = [r for n, r in results.items() if n in STAGES and 'skipped' not in r]
  if len(ran) < len(STAGES) or not all(r['ok'] for r in ran):
    return 1
  return 3 if any(t['met'] is False for r in ran for t in r.get('targets', [])) else 0


if __name__ == '__main__':
  sys.exit(main())

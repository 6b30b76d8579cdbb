"""The GPU check: one command that tells what gpt_jax does on this machine's GPU (docs/gpu.md).

    bash scripts/gpu_check.sh                    # on a GPU machine: about 5 minutes (an H200)
    bash scripts/gpu_check.sh --dry_run          # every stage at the `tiny` preset, on any machine

Stages, each a subprocess with its own time limit, so one failure never hides the rest:
  environment  Python, jax/jaxlib (and a CUDA plugin), flax, optax, orbax, ml_collections: what is
               installed and what is missing. Uses the CUDA-enabled JAX already installed; with none,
               installs jax[cuda13]==0.11.2, what the one GPU run used (JAX_GPU; unless --no_install:
               the machine may have no network).
  gpu_tests    the GPU test tier: pytest -m gpu on the files that hold it (GPU_TESTS).
  train        the `gpu` preset to its end (wall time, time to val <= 1.47 at the evals), then
               scripts/evaluate.py's full pass over the validation text on the best checkpoint.
  step_gpu     the train step of the `gpu` preset: ms/step, tokens/s, MFU (30 timed steps).
  step_gpt2    the same for GPT-2 124M (configs/gpt2.py:gpt2, from scratch) at a batch that fits.
One table is printed at the end and written, with every figure, as JSON (--out/gpu_check.json).
Stdlib only: this file must run where ml_collections (or even jax) is missing, to say so.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
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
TARGET = 1.47
# The files holding the gpu-marked tests (tests/test_gpu_check.py checks that none is missing). Not
# `tests` whole: collecting every module needs the dev requirements (jupytext), a GPU machine may lack.
GPU_TESTS = ('tests/gpu', 'tests/test_lower_cuda.py')


def version(name: str) -> Optional[str]:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def run(cmd: list[str], log: str, timeout: float, env: Optional[dict] = None) -> tuple[int, float, str]:
  """Runs `cmd` from the repository root, output to `log`; (status, seconds, last lines)."""
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
    return [json.loads(l) for l in f if l.strip()]


def environment(args) -> dict:
  """What is installed, and whether JAX sees a GPU (installing JAX_GPU if allowed and needed)."""
  info = {'python': platform.python_version(), **{p: version(p) for p in PACKAGES + CUDA_PLUGINS}}
  missing = [p for p in PACKAGES if info[p] is None]
  probe = [sys.executable, '-c', 'import jax; d = jax.devices(); print(jax.default_backend(), '
           'len(d), d[0].device_kind, sep="|")']
  def backend():
    p = subprocess.run(probe, capture_output=True, text=True, check=False)
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


def train_stage(args, out: str, preset: str) -> dict:
  run_dir = os.path.join(out, 'train')
  cmd = [sys.executable, 'scripts/train.py', f'--config=configs/shakespeare.py:{preset}',
         f'--config.out_dir={run_dir}', f'--config.data.data_dir={os.path.join(out, "data")}']
  if args.dry_run:
    cmd += ['--config.train.max_steps=20', '--config.train.eval_interval=10']
  status, seconds, tail = run(cmd, os.path.join(out, 'train.log'), args.stage_timeout)
  evals = [r for r in read_jsonl(os.path.join(run_dir, 'metrics.jsonl')) if 'val_loss' in r]
  hit = next((r for r in evals if r['val_loss'] <= TARGET), None)
  res = {'ok': status == 0, 'status': status, 'wall_seconds': round(seconds, 1), 'preset': preset,
         'best_eval_val_loss': min((r['val_loss'] for r in evals), default=None),
         'minutes_to_val_1.47': round(hit['time'] / 60, 2) if hit else None}
  if status != 0:
    res['log_tail'] = tail
    return res
  ev_path = os.path.join(out, 'eval.json')
  status, seconds, tail = run([sys.executable, 'scripts/evaluate.py', f'--ckpt_dir={run_dir}',
                               f'--output={ev_path}'], os.path.join(out, 'evaluate.log'),
                              args.stage_timeout)
  res['ok'] = status == 0
  if status == 0:
    with open(ev_path, encoding='utf-8') as f:
      res['full_pass_val_loss'] = round(json.load(f)['loss'], 4)
  else:
    res['log_tail'] = tail
  return res


def step_stage(args, out: str, name: str, config: str, overrides: list[str]) -> dict:
  """Times the train step of `config` from metrics.jsonl: the mean of the logged windows after the first."""
  run_dir = os.path.join(out, name)
  steps = 12 if args.dry_run else 40
  cmd = [sys.executable, 'scripts/train.py', f'--config={config}', f'--config.out_dir={run_dir}',
         f'--config.train.max_steps={steps}', '--config.train.log_interval=10',
         f'--config.train.eval_interval={steps}', '--config.train.eval_iters=1',
         '--config.sample.eval_tokens=0', '--config.checkpoint.save=best', *overrides]
  status, seconds, tail = run(cmd, os.path.join(out, f'{name}.log'), args.stage_timeout)
  logs = [r for r in read_jsonl(os.path.join(run_dir, 'metrics.jsonl')) if 'ms_per_step' in r]
  timed = logs[1:] or logs  # The first window holds the compilation's aftermath.
  res = {'ok': status == 0 and bool(logs), 'status': status, 'config': config,
         'overrides': overrides, 'timed_steps': len(timed) * 10}
  if timed:
    mean = lambda k: sum(r[k] for r in timed) / len(timed)
    res.update(ms_per_step=round(mean('ms_per_step'), 2), tokens_per_s=round(mean('tokens_per_s')),
               mfu=round(mean('mfu'), 4))
  if status != 0:
    res['log_tail'] = tail
  return res


def table(results: dict) -> str:
  rows = [('stage', 'ok', 'result')]
  env = results['environment']
  rows.append(('environment', env['ok'], f'python {env["python"]}, jax {env.get("jax")}, '
               f'{env.get("backend", "?")} x {env.get("devices", "?")} ({env.get("device_kind", "?")})'
               + ('; ' + '; '.join(env['problems']) if env['problems'] else '')))
  for name, r in results.items():
    if name == 'environment':
      continue
    if 'skipped' in r:
      rows.append((name, '-', r['skipped']))
    elif name == 'gpu_tests':
      rows.append((name, r['ok'], r.get('summary', '')))
    elif name == 'train':
      rows.append((name, r['ok'], f'{r["wall_seconds"]} s wall; val <= {TARGET} at '
                   f'{r["minutes_to_val_1.47"]} min; full-pass val {r.get("full_pass_val_loss")}'))
    else:
      rows.append((name, r['ok'], f'{r.get("ms_per_step")} ms/step, {r.get("tokens_per_s")} tok/s, '
                   f'MFU {r.get("mfu")}'))
  width = max(len(r[0]) for r in rows)
  return '\n'.join(f'{a:<{width}}  {str(b):<5}  {c}' for a, b, c in rows)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dry_run', action='store_true', help='every stage at the tiny preset, on any device')
  p.add_argument('--out', default=os.path.join(REPO, 'out', 'gpu_check'), help='where logs and JSON go')
  p.add_argument('--no_install', action='store_true', help=f'never pip install {JAX_GPU}')
  p.add_argument('--stage_timeout', type=float, default=600, help='seconds per stage')
  p.add_argument('--gpt2_batch', type=int, default=16, help='GPT-2 124M rows of 1024 tokens per step')
  args = p.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  preset = 'tiny' if args.dry_run else 'gpu'
  results = {'environment': environment(args)}
  print(json.dumps(results['environment']), flush=True)
  if not results['environment']['ok']:
    skipped = {'skipped': 'environment not ready'}
    results.update(gpu_tests=skipped, train=skipped, step_gpu=skipped, step_gpt2=skipped)
  else:
    status, seconds, tail = run([sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-p', 'no:cacheprovider',
                                 *GPU_TESTS], os.path.join(out, 'gpu_tests.log'), args.stage_timeout)
    results['gpu_tests'] = {'ok': status == 0, 'status': status, 'seconds': round(seconds, 1),
                            'summary': (tail.strip().splitlines() or [''])[-1]}
    print(f'gpu_tests: {results["gpu_tests"]["summary"]}', flush=True)
    results['train'] = train_stage(args, out, preset)
    print(f'train: {results["train"]}', flush=True)
    results['step_gpu'] = step_stage(args, out, 'step_gpu', f'configs/shakespeare.py:{preset}', [])
    gpt2 = (['--config=configs/shakespeare.py:tiny'] if args.dry_run else
            ['--config=configs/gpt2.py:gpt2', '--config.model.dtype=bfloat16',
             '--config.model.attention=auto', '--config.train.grad_accum_steps=1',
             f'--config.train.batch_size={args.gpt2_batch}'])
    results['step_gpt2'] = step_stage(args, out, 'step_gpt2', gpt2[0].split('=', 1)[1], gpt2[1:])
  results['dry_run'] = args.dry_run
  with open(os.path.join(out, 'gpu_check.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  print('\n' + table({k: v for k, v in results.items() if k != 'dry_run'}))
  print(f'\nwritten: {os.path.join(out, "gpu_check.json")}')
  return 0 if all(r.get('ok', True) for r in results.values() if isinstance(r, dict)) else 1


if __name__ == '__main__':
  sys.exit(main())

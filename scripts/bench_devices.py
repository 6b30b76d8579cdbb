"""Training-step throughput on 1, 2, 4 ... simulated CPU devices (data parallel or FSDP).

  python scripts/bench_devices.py                          # cpu preset, data parallel, 1/2/4 devices
  python scripts/bench_devices.py --mesh fsdp --preset tiny --steps 50

Each device count runs in its own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N
(XLA fixes the device count when JAX starts). The global batch is the preset's, split over the
devices, so this measures strong scaling of the real jitted, sharded train step. Simulated CPU
devices share the same cores: expect no speed-up on a small machine, only the partitioning and
collective overhead. On real accelerators the same table shows the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Lets `python scripts/bench_devices.py` import gpt_jax from the checkout.

from gpt_jax import allocator  # noqa: E402

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).


def worker(preset: str, mesh_kind: str, steps: int, batch_size: int) -> dict:
  """Times `steps` train steps on every device of this process; returns the numbers."""
  import functools

  import jax
  import numpy as np

  from configs import shakespeare
  from gpt_jax import config as config_lib, optim
  from gpt_jax.model import GPT
  from gpt_jax.parallel import mesh as sharding
  from gpt_jax.training import run_setup, step as step_lib

  n = jax.device_count()
  cfg = shakespeare.get_config(preset)
  if batch_size:
    cfg.train.batch_size = batch_size
  cfg.mesh.update({'data': dict(data=-1, fsdp=1), 'fsdp': dict(data=1, fsdp=-1),
                   'both': dict(data=-1, fsdp=min(2, n))}[mesh_kind])
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch_divisible(cfg.train.batch_size, mesh)
  model_cfg = config_lib.model_config_from(cfg, 65)  # TinyShakespeare's vocabulary; tokens are random.
  state = step_lib.init_train_state(model_cfg, cfg.train, mesh)
  data = sharding.put_replicated(np.random.RandomState(0).randint(0, 65, 200_000).astype(np.uint16),
                                 mesh)
  sh, rep = sharding.state_shardings(state, mesh), sharding.replicated(mesh)
  step = jax.jit(functools.partial(
      step_lib.train_step, model=GPT(model_cfg), batch_size=cfg.train.batch_size,
      grad_accum_steps=cfg.train.grad_accum_steps, schedule=optim.lr_schedule(cfg.train), mesh=mesh),
      in_shardings=(sh, rep), out_shardings=(sh, rep), donate_argnums=0)
  t0 = time.perf_counter()
  state, m = step(state, data)
  m['loss'].block_until_ready()
  compile_s = time.perf_counter() - t0
  for _ in range(3):  # Warm-up.
    state, m = step(state, data)
  m['loss'].block_until_ready()
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, data)
    if (i + 1) % run_setup.CPU_MAX_STEPS_IN_FLIGHT == 0:  # As the train loop does on CPU (see there).
      m['loss'].block_until_ready()
  m['loss'].block_until_ready()
  dt = (time.perf_counter() - t0) / steps
  tokens = cfg.train.batch_size * cfg.train.grad_accum_steps * model_cfg.block_size
  return {'devices': n, 'mesh': sharding.describe(mesh), 'batch': cfg.train.batch_size,
          'rows_per_device': cfg.train.batch_size // n, 'ms_per_step': 1e3 * dt,
          'tokens_per_s': tokens / dt, 'compile_s': compile_s, 'loss': float(m['loss'])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', choices=['cpu', 'tiny'])
  parser.add_argument('--mesh', default='data', choices=['data', 'fsdp', 'both'],
                      help='devices on the data axis (DP), the fsdp axis (FSDP), or both '
                           '(fsdp=2, data=the rest)')
  parser.add_argument('--devices', default='1,2,4', help='comma-separated device counts')
  parser.add_argument('--steps', type=int, default=30, help='timed steps per device count')
  parser.add_argument('--batch_size', type=int, default=0, help='global batch (0 = the preset\'s)')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    print(json.dumps(worker(args.preset, args.mesh, args.steps, args.batch_size)), flush=True)
    return

  rows = []
  for n in [int(d) for d in args.devices.split(',')]:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={n}', JAX_PLATFORMS='cpu')
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'--preset={args.preset}',
           f'--mesh={args.mesh}', f'--steps={args.steps}', f'--batch_size={args.batch_size}']
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
      sys.exit(f'error: the {n}-device run failed:\n{r.stderr.strip()[-2000:]}')
    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))

  base = rows[0]['ms_per_step']
  kind = {'data': 'data parallel', 'fsdp': 'FSDP', 'both': 'data parallel x FSDP'}[args.mesh]
  print(f'preset {args.preset}, {kind}, global batch {rows[0]["batch"]}, '
        f'{args.steps} timed steps, {os.cpu_count()} CPU core(s)')
  print('| devices | mesh | rows/device | ms/step | tokens/s | vs 1st | compile s |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["devices"]} | {r["mesh"]} | {r["rows_per_device"]} | {r["ms_per_step"]:.1f} | '
          f'{r["tokens_per_s"]:,.0f} | {base / r["ms_per_step"]:.2f}x | {r["compile_s"]:.1f} |')


if __name__ == '__main__':
  main()

"""Multi-host training on one machine: two processes on localhost, 2 CPU devices each, vs 1 device.

The two processes run this very file (`python tests/parallel/test_multihost.py SPEC.json PROCESS_ID`), connect
through `jax.distributed` (process 0 from the config, process 1 from the JAX_* environment
variables, so both ways are exercised), and train one 2 x 2 mesh: 'data' across the processes,
'fsdp' within each. CPU collectives between processes go over gloo (JAX's default on CPU).
"""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from multidevice import RESULT, run_losses, tiny_config, worker_env  # noqa: E402

STEPS = 10
BATCH = dict(step=3, batch_size=8, block_size=16)  # A sharded-dataset batch, fed per process.


def _config(root: str):
  cfg = tiny_config(root, mesh=(2, 2), eval_tokens=8)
  cfg.train.update(max_steps=STEPS, eval_interval=5)
  return cfg


def worker(spec: dict, process_id: int) -> dict:
  """One of the two processes: train, then assemble a global batch from a sharded dataset."""
  cfg = _config(spec['root'])
  if process_id == 0:
    cfg.distributed.update(coordinator_address=f'localhost:{spec["port"]}', num_processes=2,
                           process_id=0)
  # Process 1 finds JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in its environment.
  from gpt_jax.training import loop as loop_lib
  if spec.get('preempt'):  # test_a_signal_to_one_process_stops_both_at_the_same_step
    cfg.train.update(max_steps=spec['max_steps'], eval_interval=20, resume=spec['resume'])
    cfg.sample.eval_tokens = 0
    from gpt_jax.errors import Stopped
    try:
      return {'final_step': loop_lib.train_and_evaluate(cfg)['final_step']}
    except Stopped as e:
      print(RESULT + json.dumps({'stopped_at': e.step, 'signal': e.signal_name, 'message': str(e)}),
            flush=True)
      sys.exit(e.exit_status)
  loop_lib.train_and_evaluate(cfg)

  import jax
  from jax.experimental import multihost_utils

  from gpt_jax.data import shards
  from gpt_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(cfg.mesh)
  ds = shards.ShardedTokens(spec['shards'], seed=5)
  bs = mesh_lib.batch_sharding(mesh)
  x, _ = ds.global_batch(BATCH['step'], BATCH['batch_size'], BATCH['block_size'], bs)
  full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return {'process_index': jax.process_index(), 'process_count': jax.process_count(),
          'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
          'rows': shards.process_rows(bs, x.shape).tolist(),
          'batch_sha256': hashlib.sha256(full.tobytes()).hexdigest()}


def test_settings_come_from_config_then_environment():
  from configs import shakespeare
  from gpt_jax.parallel import distributed
  cfg = shakespeare.get_config('tiny').distributed
  assert distributed._settings(cfg, {}) == (None, None, None)
  env = {'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '2'}
  assert distributed._settings(cfg, env) == ('h0:1234', 4, 2)
  cfg.update(coordinator_address='c:1', num_processes=2, process_id=0)
  assert distributed._settings(cfg, env) == ('c:1', 2, 0)  # The config wins.
  assert distributed._settings(None, {'JAX_PROCESS_ID': '0'}) == (None, None, 0)


def test_single_process_needs_no_runtime_and_late_settings_are_a_clear_error():
  from gpt_jax.errors import UserError
  from gpt_jax.parallel import distributed
  assert distributed.initialize(None, environ={}) is False  # Nothing asked for: one process.
  assert distributed.initialize({'num_processes': 1}, environ={}) is False
  import jax
  jax.devices()  # This pytest process has a backend already: too late to connect.
  with pytest.raises(UserError, match='already used in this process.*fresh process'):
    distributed.initialize(None, environ={'JAX_COORDINATOR_ADDRESS': 'localhost:1',
                                          'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'})
  with pytest.raises(UserError, match='already used'):  # A launcher (Slurm, 2 tasks) counts too.
    distributed.initialize(None, environ={'SLURM_STEP_NUM_TASKS': '2', 'SLURM_PROCID': '0'})
  assert distributed.initialize(None, environ={'SLURM_NTASKS': '2', 'SLURM_PROCID': '0'}) is False


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
  from gpt_jax.data import shards
  from gpt_jax.training import loop as loop_lib
  t0 = time.perf_counter()
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  from conftest import make_synthetic_text
  for i in range(3):
    (corpus / f'{i}.txt').write_text(make_synthetic_text(5_000, seed=i), encoding='utf-8')
  shards.write_shards(str(corpus), str(tmp_path / 'shards'), shard_tokens=4_000, verbose=False)

  ref_cfg = _config(str(tmp_path / 'ref'))
  ref_cfg.mesh.update(data=-1, fsdp=1)
  ref_cfg.sample.eval_tokens = 0  # Losses only: skip compiling the sampler here.
  loop_lib.train_and_evaluate(ref_cfg)  # One process, one device.
  ref = run_losses(ref_cfg.out_dir)

  root = str(tmp_path / 'multi')
  spec = {'root': root, 'port': _free_port(), 'shards': str(tmp_path / 'shards')}
  _config(root)  # Writes the input text now, not racing in two processes.
  outs = _finish(_spawn(spec, root), root)
  for returncode, out, err in outs:
    assert returncode == 0, out[-3000:] + err[-3000:]
  results = [json.loads([l for l in out.splitlines() if l.startswith(RESULT)][-1][len(RESULT):])
             for _, out, _ in outs]
  multi_seconds = time.perf_counter() - t0

  # Both processes saw one 4-device system; the losses are the 1-device ones.
  assert [(r['process_index'], r['process_count'], r['devices'], r['local_devices'])
          for r in results] == [(0, 2, 4, 2), (1, 2, 4, 2)]
  got = run_losses(os.path.join(root, 'out'))
  assert sorted(got['train'], key=int) == [str(s) for s in range(1, STEPS + 1)]
  d_train = max(abs(got['train'][k] - ref['train'][k]) for k in ref['train'])
  d_val = max(abs(got['val'][k] - ref['val'][k]) for k in ref['val'])
  print(f'2 processes x 2 devices vs 1 device: max |dloss| over {STEPS} steps = {d_train:.2e}, '
        f'eval = {d_val:.2e} ({multi_seconds:.0f}s in all)')
  assert d_train < 1e-5 and d_val < 1e-5

  # Only process 0 printed and wrote text: one metrics line per step, the log lines on stdout.
  with open(os.path.join(root, 'out', 'metrics.jsonl')) as f:
    steps = [json.loads(l)['step'] for l in f if 'ms_per_step' in l]
  assert steps == list(range(1, STEPS + 1))
  assert 'step 10: loss' in outs[0][1] and 'step 10: loss' not in outs[1][1]
  assert 'sample:' in outs[0][1]  # Sampling ran across both processes.
  # Orbax wrote the checkpoints collectively; one directory per step, readable by one process.
  ckpt = os.path.join(root, 'out', 'checkpoints')
  assert {'5', '10'} <= set(os.listdir(ckpt))

  # The sharded-dataset batch: each process fed its own rows; together the single-process batch.
  assert results[0]['rows'] == [0, 1, 2, 3] and results[1]['rows'] == [4, 5, 6, 7]
  x = shards.ShardedTokens(str(tmp_path / 'shards'), seed=5).host_batch(
      BATCH['step'], BATCH['batch_size'], BATCH['block_size'], process_index=0, process_count=1)[0]
  expected = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
  assert results[0]['batch_sha256'] == results[1]['batch_sha256'] == expected


def _spawn(spec: dict, root: str) -> list:
  """Starts the two processes on `spec` (written to root/spec.json); stdout is a pipe, stderr a file."""
  spec_path = os.path.join(root, 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  base = worker_env(2)
  envs = [base, dict(base, JAX_COORDINATOR_ADDRESS=f'localhost:{spec["port"]}',
                     JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1')]
  procs = []
  for i, env in enumerate(envs):
    with open(os.path.join(root, f'err{i}'), 'w+') as err:  # The child keeps its own descriptor.
      procs.append(subprocess.Popen([sys.executable, __file__, spec_path, str(i)], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=err))
  return procs


def _finish(procs: list, root: str) -> list:
  outs = []
  try:
    for i, p in enumerate(procs):
      out, _ = p.communicate(timeout=900)  # Generous: a busy 2-core machine.
      with open(os.path.join(root, f'err{i}')) as f:
        outs.append((p.returncode, out, f.read()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to process 1 only: both leave at one agreed step, save it together and exit 75; resumed
  with two processes, the run logs every step once and ends with the 1-device run's losses."""
  import signal

  from gpt_jax.training import loop as loop_lib
  steps = 40
  ref_cfg = _config(str(tmp_path / 'ref'))
  ref_cfg.mesh.update(data=-1, fsdp=1)
  ref_cfg.train.update(max_steps=steps, eval_interval=20)
  ref_cfg.sample.eval_tokens = 0
  loop_lib.train_and_evaluate(ref_cfg)  # One process, one device, uninterrupted.
  ref = run_losses(ref_cfg.out_dir)

  root = str(tmp_path / 'multi')
  _config(root)  # Writes the input text now, not racing in two processes.
  spec = {'root': root, 'port': _free_port(), 'preempt': True, 'max_steps': steps, 'resume': False}
  procs = _spawn(spec, root)
  try:
    for line in procs[0].stdout:  # Process 0 prints; process 1 alone gets the signal.
      if line.startswith('step 3: loss'):
        procs[1].send_signal(signal.SIGTERM)
        break
  finally:
    outs = _finish(procs, root)
  results = []
  for rc, out, err in outs:
    assert rc == 75, out[-3000:] + err[-3000:]
    results.append(json.loads([l for l in out.splitlines() if l.startswith(RESULT)][-1][len(RESULT):]))
  stop = results[0]['stopped_at']
  assert 3 <= stop < steps and results[1]['stopped_at'] == stop
  from gpt_jax.training import preemption
  assert stop % preemption.SYNC_EVERY == 0 or stop == 20  # Where the processes compare flags.
  assert results[1]['signal'] == 'SIGTERM' and results[0]['signal'] == 'a signal to another process'
  assert f'stopped at step {stop}; checkpoint {stop} is saved' in results[0]['message']
  assert str(stop) in os.listdir(os.path.join(root, 'out', 'checkpoints'))

  spec.update(port=_free_port(), resume=True)
  outs = _finish(_spawn(spec, root), root)
  for rc, out, err in outs:
    assert rc == 0, out[-3000:] + err[-3000:]
  assert f'resumed from step {stop} ' in outs[0][1]
  with open(os.path.join(root, 'out', 'metrics.jsonl')) as f:
    logged = [json.loads(l)['step'] for l in f if 'ms_per_step' in l]
  assert logged == list(range(1, steps + 1))  # Each step once: none re-run, none skipped.
  got = run_losses(os.path.join(root, 'out'))
  assert max(abs(got['train'][k] - ref['train'][k]) for k in ref['train']) < 1e-5
  assert max(abs(got['val'][k] - ref['val'][k]) for k in ref['val']) < 1e-5


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    result = worker(json.load(f), int(sys.argv[2]))
  print(RESULT + json.dumps(result), flush=True)

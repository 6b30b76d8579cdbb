"""Meshes and shardings: rules, and 4 simulated CPU devices (DP, FSDP, both) against 1 device.

XLA's device count is fixed when JAX starts, so the 4-device half runs this very file as a
subprocess (`python tests/parallel/test_mesh.py SPEC.json` with
XLA_FLAGS=--xla_force_host_platform_device_count=4), which prints one JSON line the tests parse.
The pytest process itself has one device and runs the reference.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import shakespeare  # noqa: E402
from gpt_jax import (
  checkpoint as checkpoint_lib,  # noqa: E402
  optim,  # noqa: E402
  scoring,  # noqa: E402
)
from gpt_jax.config import ModelConfig  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402
from gpt_jax.model import GPT  # noqa: E402
from gpt_jax.parallel import mesh as mesh_lib  # noqa: E402
from gpt_jax.training import (
  loop as loop_lib,  # noqa: E402
  step as step_lib,  # noqa: E402
)

from multidevice import RESULT, STEPS, max_delta, run_losses, tiny_config, worker_env  # noqa: E402

MESHES = {'dp4': (4, 1), 'fsdp4': (1, 4), 'dp2_fsdp2': (2, 2)}
RESUMED = 'dp2_fsdp2'  # This one continues the 1-device run from its step-10 checkpoint (1 -> 4).
FULL_PASS = 'fsdp4'  # Its evals score the whole val split (train.val_full_pass), sharded parameters.
TOL = 1e-5


# --- helpers of the test and the 4-device worker (more in tests/multidevice.py) ------------------

def _model_and_train_cfg():
  model_cfg = ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
  return model_cfg, shakespeare.get_config('tiny').train


def trained_state(mesh, steps: int = 3):
  """A small state trained a few steps on `mesh` (dropout on, so the key stream matters too);
  mesh None: the plain unsharded code."""
  model_cfg, train_cfg = _model_and_train_cfg()
  state = step_lib.init_train_state(model_cfg, train_cfg, mesh)
  data = np.random.RandomState(0).randint(0, 20, 4000).astype(np.uint16)
  fn = lambda s, d: step_lib.train_step(s, d, model=GPT(model_cfg), batch_size=8, grad_accum_steps=2,
                                         schedule=optim.lr_schedule(train_cfg), mesh=mesh)
  if mesh is None:
    data, step = jnp.asarray(data), jax.jit(fn, donate_argnums=0)
  else:
    data = mesh_lib.put_replicated(data, mesh)
    sh, rep = mesh_lib.state_shardings(state, mesh), mesh_lib.replicated(mesh)
    step = jax.jit(fn, in_shardings=(sh, rep), out_shardings=(sh, rep), donate_argnums=0)
  for _ in range(steps):
    state, _ = step(state, data)
  return state


def save_state(state, directory: str) -> None:
  ckpt = checkpoint_lib.Checkpointer(directory)
  ckpt.save(int(state.step), state, {'note': 'test'}, 1.0)
  ckpt.close()


def restore_state(directory: str, mesh):
  model_cfg, train_cfg = _model_and_train_cfg()
  like = jax.eval_shape(lambda: step_lib.init_train_state(model_cfg, train_cfg))
  abstract = mesh_lib.abstract_with_shardings(like, mesh_lib.state_shardings(like, mesh))
  ckpt = checkpoint_lib.Checkpointer(directory)
  state = ckpt.restore_state(ckpt.latest_step(), abstract)
  ckpt.close()
  return state


def digest(state) -> dict:
  """SHA-256 of every leaf's bytes (params, optimizer state, step, key): equal means bit-identical."""
  tree = (state.params, state.opt_state, state.step, state.key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): hashlib.sha256(np.asarray(v).tobytes()).hexdigest()
          for k, v in leaves}


def specs(tree) -> dict:
  return {jax.tree_util.keystr(k): str(v.sharding.spec)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def worker(spec: dict) -> dict:
  """The 4-device half: trains on every mesh and round-trips checkpoints."""
  from gpt_jax.training import loop as loop_lib
  assert jax.device_count() == 4, jax.devices()
  root = spec['root']
  out = {'devices': jax.device_count(), 'losses': {}}
  for name, mesh in MESHES.items():
    cfg = tiny_config(os.path.join(root, name), mesh, eval_tokens=8 if name == 'fsdp4' else 0)
    cfg.train.resume = name == RESUMED  # A copy of the 1-device run, cut back to step 10.
    cfg.train.val_full_pass = name == FULL_PASS
    loop_lib.train_and_evaluate(cfg)
    out['losses'][name] = run_losses(cfg.out_dir)

  mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 4})
  restored = restore_state(spec['ckpt_1'], mesh)  # Saved by one device, restored sharded over 4.
  out['restored_from_1'] = {'digest': digest(restored), 'specs': specs(restored.params)}
  state = trained_state(mesh)
  save_state(state, spec['ckpt_4'])
  out['saved_on_4'] = {'digest': digest(state), 'specs': specs(state.params)}
  return out


def run_worker(spec: dict, n_devices: int = 4) -> dict:
  spec_path = os.path.join(spec['root'], 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  r = subprocess.run([sys.executable, __file__, spec_path], capture_output=True, text=True,
                     env=worker_env(n_devices), timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return json.loads([l for l in r.stdout.splitlines() if l.startswith(RESULT)][-1][len(RESULT):])


# --- rules (one device) ---------------------------------------------------------------------------

def test_mesh_shape_fills_in_and_validates():
  assert mesh_lib.mesh_shape({'data': -1, 'fsdp': 1}, 8) == (8, 1)
  assert mesh_lib.mesh_shape({'data': 2, 'fsdp': -1}, 8) == (2, 4)
  assert mesh_lib.mesh_shape({'data': 2, 'fsdp': 4}, 8) == (2, 4)
  assert mesh_lib.mesh_shape(None, 3) == (3, 1)
  with pytest.raises(UserError, match=r'data=2 x fsdp=2 = 4 devices, but this run has 8'):
    mesh_lib.mesh_shape({'data': 2, 'fsdp': 2}, 8)
  with pytest.raises(UserError, match='mesh.fsdp=3 does not divide the 8 devices'):
    mesh_lib.mesh_shape({'data': -1, 'fsdp': 3}, 8)
  with pytest.raises(UserError, match='only one of'):
    mesh_lib.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(UserError, match=r'mesh.data must be >= 1, or -1 for "all remaining devices" \(got 0\)'):
    mesh_lib.mesh_shape({'data': 0, 'fsdp': 1}, 8)
  with pytest.raises(UserError, match='product equal the device count'):
    mesh_lib.make_mesh({'data': 2, 'fsdp': 1})  # This process has one device.


def test_fsdp_rule_shards_the_largest_divisible_axis():
  assert mesh_lib.param_spec((65, 128), 4) == P(None, 'fsdp')  # 65 does not divide: next one.
  assert mesh_lib.param_spec((512, 128), 4) == P('fsdp')
  assert mesh_lib.param_spec((128, 128), 4) == P('fsdp')  # A tie: the first axis.
  assert mesh_lib.param_spec((65,), 4) == P()  # Nothing divides: replicated.
  assert mesh_lib.param_spec((), 4) == P()
  assert mesh_lib.param_spec((512, 128), 1) == P()  # Pure data parallelism.


def test_batch_must_split_over_the_devices():
  mesh = mesh_lib.make_mesh(None)
  mesh_lib.check_batch_divisible(5, mesh)  # One device: anything goes.
  with pytest.raises(UserError, match='batch_size=6 does not split evenly over the 4 devices'):
    mesh_lib.check_batch_divisible(6, jax.sharding.AbstractMesh((2, 2), ('data', 'fsdp')))


@pytest.mark.slow
def test_one_device_mesh_is_the_plain_path():
  """Mesh 1 x 1: bit-identical to the code without any sharding."""
  model_cfg, train_cfg = _model_and_train_cfg()
  mesh = mesh_lib.make_mesh(None)
  a = step_lib.init_train_state(model_cfg, train_cfg)
  b = step_lib.init_train_state(model_cfg, train_cfg, mesh)
  assert digest(a) == digest(b)
  assert digest(trained_state(mesh)) == digest(trained_state(None))
  assert set(specs(b.params).values()) == {str(P())}


# --- 4 simulated devices against 1 -----------------------------------------------------------------

@pytest.fixture(scope='module')
def four_devices(tmp_path_factory):
  """Runs the 1-device reference here and the 4-device worker once; returns both results."""
  root = str(tmp_path_factory.mktemp('sharding'))
  ref_cfg = tiny_config(os.path.join(root, 'ref'))
  loop_lib.train_and_evaluate(ref_cfg)
  ref = run_losses(ref_cfg.out_dir)
  _copy_at_step_10(os.path.join(root, 'ref'), os.path.join(root, RESUMED))  # Resumed on 4 devices.
  state_1 = trained_state(mesh_lib.make_mesh(None))
  save_state(state_1, os.path.join(root, 'ckpt_1'))
  spec = {'root': root, 'ckpt_1': os.path.join(root, 'ckpt_1'), 'ckpt_4': os.path.join(root, 'ckpt_4')}
  return {'root': root, 'ref': ref, 'state_1': state_1, 'spec': spec, 'w': run_worker(spec)}


def _copy_at_step_10(src: str, dst: str) -> None:
  """A copy of a finished 20-step run as if it had stopped after the checkpoint at step 10."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, 'out', 'checkpoints', str(STEPS)))
  os.remove(os.path.join(dst, 'out', 'metrics.jsonl'))  # So that only resumed steps are read.


@pytest.mark.slow
@pytest.mark.parametrize('name', MESHES)
def test_losses_on_4_devices_match_1_device(four_devices, name):
  ref, got = four_devices['ref'], four_devices['w']['losses'][name]
  train_keys = [k for k in ref['train'] if int(k) > 10] if name == RESUMED else ref['train']
  d_train = max_delta({k: got['train'][k] for k in train_keys}, {k: ref['train'][k] for k in train_keys})
  val_keys = ['20'] if name == RESUMED else ref['val']
  ref_val = ref['val']
  if name == FULL_PASS:  # Against scripts/evaluate.py's full pass of the 1-device checkpoints.
    val_keys = ['10', '20']
    ref_out = os.path.join(four_devices['root'], 'ref', 'out')
    ref_val = {k: scoring.evaluate_checkpoint(ref_out, step=int(k), output='', verbose=False)['loss']
               for k in val_keys}
    assert all(abs(ref_val[k] - ref['val'][k]) > 1e-3 for k in val_keys)  # Not the estimate.
  d_val = max_delta({k: got['val'][k] for k in val_keys}, {k: ref_val[k] for k in val_keys})
  print(f'{name}: max |dloss| over {len(train_keys)} steps = {d_train:.2e}, '
        f'eval = {d_val:.2e}')
  assert d_train < TOL and d_val < TOL


@pytest.mark.slow
def test_checkpoint_from_1_device_restores_sharded_on_4(four_devices):
  w = four_devices['w']['restored_from_1']
  assert w['digest'] == digest(four_devices['state_1'])  # Bit-identical, every leaf.
  assert w['specs']["['wte']"] == str(P(None, 'fsdp'))  # (20, 32): the larger axis.
  assert w['specs']["['h_0']['attn']['c_attn']['kernel']"] == str(P(None, 'fsdp'))  # (32, 96)


@pytest.mark.slow
def test_checkpoint_sharded_on_4_restores_on_1(four_devices):
  w = four_devices['w']['saved_on_4']
  assert w['specs']["['h_0']['mlp']['c_fc']['kernel']"] == str(P(None, 'fsdp'))  # (32, 128)
  restored = restore_state(four_devices['spec']['ckpt_4'], mesh_lib.make_mesh(None))
  assert digest(restored) == w['digest']  # Bit-identical after the 4 -> 1 device round trip.
  # And the 4-device training itself followed the 1-device one closely.
  for a, b in zip(jax.tree_util.tree_leaves(restored.params),
                  jax.tree_util.tree_leaves(four_devices['state_1'].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
def test_run_trained_on_4_devices_samples_on_1(four_devices):
  """Sampling/evaluation restore parameters only, onto this process's device, from any topology."""
  from gpt_jax import sample_run
  texts = sample_run.sample_from_checkpoint(os.path.join(four_devices['root'], 'fsdp4', 'out'),
                                          max_new_tokens=10, verbose=False)
  assert len(texts) == 1 and len(texts[0]) == 11


@pytest.mark.slow
def test_checkpoint_sharded_on_4_resumes_training_on_1(four_devices, tmp_path):
  """The train loop's own restore path: an FSDP run's step-10 checkpoint continues on 1 device."""
  dst = str(tmp_path / 'resume_on_1')
  _copy_at_step_10(os.path.join(four_devices['root'], 'fsdp4'), dst)
  cfg = tiny_config(dst)  # mesh data=-1: the single device here.
  cfg.train.resume = True
  loop_lib.train_and_evaluate(cfg)
  got, ref = run_losses(cfg.out_dir), four_devices['ref']
  keys = [k for k in ref['train'] if int(k) > 10]
  assert max_delta({k: got['train'][k] for k in keys}, {k: ref['train'][k] for k in keys}) < TOL


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    result = worker(json.load(f))
  print(RESULT + json.dumps(result), flush=True)

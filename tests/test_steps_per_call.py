"""train.steps_per_call: k train steps in one jitted call (gpt_jax/training/multi_step.py) are k single
steps bit for bit, for resident splits and for per-step host batches, and a run with it logs, evaluates,
stops, resumes and ends (a shorter last call) exactly as a run of single steps."""

import functools
import json
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from gpt_jax import checkpoint as checkpoint_lib, optim
from gpt_jax.data import batches as batches_lib
from gpt_jax.errors import Stopped
from gpt_jax.model import GPT
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import loop as loop_lib, multi_step, preemption, step as step_lib

from tiny_models import cfg as tiny_cfg

REPO = pathlib.Path(__file__).resolve().parents[1]

MODEL = tiny_cfg(vocab_size=20, block_size=16, n_layer=1, dropout=0.1)  # Dropout: each step's own masks.
BATCH, ACCUM, K = 4, 2, 3  # Accumulation: a scan inside each step of the scan.


class HostTokens:
  """Stands in for a token-shard split: a batch read on the host per step, a function of the step."""

  def global_batch(self, step, rows, block_size, sharding):
    w = np.random.RandomState(step).randint(0, MODEL.vocab_size, (rows, block_size + 1)).astype(np.int32)
    return jax.device_put(w[:, :-1], sharding), jax.device_put(w[:, 1:], sharding)

  def with_seed(self, seed):
    return self


def _steps(source, mesh):
  from configs import shakespeare
  train_cfg = shakespeare.get_config('tiny').train
  state = step_lib.init_train_state(MODEL, train_cfg, mesh)
  step_fn = functools.partial(step_lib.train_step, model=GPT(MODEL), draw=source.draw, batch_size=BATCH,
                              grad_accum_steps=ACCUM, schedule=optim.lr_schedule(train_cfg), mesh=mesh)
  shardings = (mesh_lib.state_shardings(state, mesh), mesh_lib.replicated(mesh))
  return multi_step.Steps(step_fn, K, source, mesh, shardings), state


def _copy(state):
  return jax.tree_util.tree_map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_k_calls_against_single_steps(mesh, per_step_batches: bool) -> None:
  """Two calls of K steps against 2K single steps from the same state, on `mesh`: the state after K and
  after 2K steps and every step's loss, bit for bit."""
  if per_step_batches:
    source = batches_lib.ShardBatches(types.SimpleNamespace(train=HostTokens(), val=HostTokens()),
                                      MODEL.block_size, BATCH, ACCUM, 0, mesh)
  else:
    tokens = np.random.RandomState(0).randint(0, MODEL.vocab_size, 3000).astype(np.uint16)
    source = batches_lib.ResidentBatches({'train': tokens, 'val': tokens}, MODEL.block_size, BATCH,
                                         ACCUM, mesh)
  steps, state = _steps(source, mesh)
  assert steps.per_step_inputs == per_step_batches
  single, many = _copy(state), _copy(state)
  for call in range(2):  # After K and after 2K steps.
    losses = []
    for i in range(K):
      single, m = steps(single, call * K + i, 1)
      losses.append(m['loss'])
    many, m = steps(many, call * K, K)
    assert int(many.step) == int(single.step) == (call + 1) * K
    _assert_same(many, single)  # Parameters, optimizer state, step, key.
    np.testing.assert_array_equal(np.asarray(m['per_step']['loss']), np.asarray(losses))
    assert m['loss'] == losses[-1] and m['per_step']['loss'].shape == (K,)
  assert len(set(np.asarray(losses).tolist())) == K  # The steps really differ.


@pytest.mark.parametrize('per_step_batches', [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=['resident', 'host_batches'])
def test_k_steps_in_one_call_are_k_single_steps_bit_for_bit(per_step_batches):
  _check_k_calls_against_single_steps(mesh_lib.make_mesh(None, jax.devices()), per_step_batches)


@pytest.mark.slow
def test_k_steps_in_one_call_are_k_single_steps_with_fsdp_on_4_devices():
  """Data x FSDP (2 x 2) on 4 simulated CPU devices, in a subprocess (this file as a script). The scan
  pins the state it carries to the single step's shardings: without that, XLA partitions the loop's
  state its own way and the FSDP updates differ from single steps in the last bits."""
  from multidevice import worker_env
  env = dict(worker_env(4), PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and 'bit-identical on 4 devices' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_a_call_of_one_step_is_the_plain_jitted_step():
  """steps_per_call = 1 runs exactly today's program: jax.jit of train_step, no scan around it."""
  mesh = mesh_lib.make_mesh(None, jax.devices())
  tokens = np.zeros(100, np.uint16)
  steps, state = _steps(batches_lib.ResidentBatches({'train': tokens}, MODEL.block_size, BATCH, ACCUM,
                                                    mesh), mesh)
  (call,) = jax.make_jaxpr(steps.call(1))(state, tokens).eqns  # The jit, and inside it:
  assert str(call.params['jaxpr']) == str(jax.make_jaxpr(steps.step_fn)(state, tokens))
  (call,) = jax.make_jaxpr(steps.call(K))(state, tokens).eqns
  assert [e.primitive.name for e in call.params['jaxpr'].eqns][0] == 'scan'  # The loop over steps.


@pytest.mark.parametrize('step,k,max_steps,length', [
    (0, 4, 100, 4), (8, 4, 100, 4), (9, 4, 100, 3),  # A resumed run realigns on multiples of k.
    (96, 5, 98, 2), (0, 1, 10, 1)])                  # A max_steps that is not a multiple: a shorter call.
def test_call_length(step, k, max_steps, length):
  steps = multi_step.Steps(None, k, batches_lib.ResidentBatches({}, 8, 1, 1), None, (None, None))
  assert steps.call_length(step, max_steps) == length


def _read(out_dir):
  with open(f'{out_dir}/metrics.jsonl', encoding='utf-8') as f:
    recs = [json.loads(line) for line in f]
  return ({r['step']: r['train_loss'] for r in recs if 'ms_per_step' in r},
          {r['step']: (r['train_loss'], r['val_loss']) for r in recs if 'val_loss' in r})


def _run(config, out_dir, stop_at=None, **train):
  """train_and_evaluate with `train` overrides; `stop_at`: a stop request lands during the call that
  ends at that step (as a SIGTERM would), and the run must stop there with a checkpoint of it."""
  config.out_dir = str(out_dir)
  config.train.update(train)
  if stop_at is None:
    return loop_lib.train_and_evaluate(config)
  real = loop_lib.Trainer.train_one_step

  def train_one_step(self):
    real(self)
    if self.step == stop_at:
      self.stop.signal_name = 'SIGTERM'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop_lib.Trainer, 'train_one_step', train_one_step)
    with pytest.raises(Stopped, match=f'stopped at step {stop_at}; checkpoint {stop_at} is saved'):
      loop_lib.train_and_evaluate(config)


@pytest.fixture(scope='module')
def single_steps(tmp_path_factory):
  """(config, run folder) of 7 single steps: dropout, accumulation, evals at 0, 4 and 7."""
  from configs import shakespeare

  from conftest import make_synthetic_text
  root = tmp_path_factory.mktemp('steps_per_call')
  (root / 'input.txt').write_text(make_synthetic_text(), encoding='utf-8')
  c = shakespeare.get_config('tiny')
  c.data.update(text_path=str(root / 'input.txt'), data_dir=str(root / 'data'), cache_dir=str(root))
  c.model.update(n_layer=1, dropout=0.1)
  c.train.update(max_steps=7, eval_interval=4, eval_iters=2, grad_accum_steps=2, log_interval=1,
                 peak_flops=1e12)
  c.checkpoint.save, c.sample.eval_tokens = 'always', 0
  _run(c, root / 'single')
  return c, root


def _assert_same_run(run_dir, single_dir):
  """Every loss the run logged, its evals and its final parameters are the single steps', exactly."""
  steps, evals = _read(run_dir)
  single_steps, single_evals = _read(single_dir)
  assert steps and all(steps[s] == single_steps[s] for s in steps), (steps, single_steps)
  assert evals == single_evals
  _assert_same(checkpoint_lib.load_for_inference(str(run_dir))[1],
               checkpoint_lib.load_for_inference(str(single_dir))[1])
  return steps


def test_calls_of_k_steps_stop_resume_and_end_as_single_steps(single_steps):
  """Steps 1-7 in calls of 2: stopped by a signal during the call that ends at step 4 (it finishes,
  with a checkpoint of step 4), resumed with the call 4-6 and a shorter last one, 6-7."""
  config, root = single_steps
  config = config.copy_and_resolve_references()
  _run(config, root / 'calls', 4, steps_per_call=2, log_interval=2)
  assert _run(config, root / 'calls', resume=True)['final_step'] == 7
  steps = _assert_same_run(root / 'calls', root / 'single')
  assert sorted(steps) == [2, 4, 6, 7]  # At the ends of the calls, as they end.


@pytest.mark.slow
def test_a_run_resumed_between_multiples_realigns_with_a_shorter_call(single_steps):
  """Single steps stopped at step 3, resumed with calls of 2: 3-4 (realigning), 4-6, 6-7."""
  config, root = single_steps
  config = config.copy_and_resolve_references()
  _run(config, root / 'realigned', 3)
  _run(config, root / 'realigned', steps_per_call=2, log_interval=2, resume=True)
  assert sorted(_assert_same_run(root / 'realigned', root / 'single')) == [1, 2, 3, 4, 6, 7]


def test_processes_agree_on_stopping_after_each_call_that_passed_a_multiple_of_sync_every(monkeypatch):
  """Several processes compare their stop flags every SYNC_EVERY steps; with calls of 5 steps the loop
  asks only at multiples of 5, so they compare after each call that passed a multiple of SYNC_EVERY."""
  stop = preemption.StopRequest()
  stop._multi = True  # As __enter__ sets it with several processes.
  compared = []

  def compared_at(steps, k):
    compared.clear()
    for s in steps:
      monkeypatch.setattr(preemption.distributed, 'any_process', lambda flag, s=s: compared.append(s))
      stop.should_stop(s, False, k)
    return compared

  assert preemption.SYNC_EVERY == 8
  assert compared_at(range(5, 45, 5), 5) == [10, 20, 25, 35, 40]  # Passed 8, 16, 24, 32, 40.
  assert compared_at(range(1, 17), 1) == [8, 16]  # Single steps: as always.


if __name__ == '__main__':  # The 4-device half of the FSDP test above.
  import ml_collections
  assert jax.device_count() == 4, jax.devices()
  _check_k_calls_against_single_steps(mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2))),
                                      per_step_batches=False)
  print('bit-identical on 4 devices')

"""Orbax checkpoints: round trip, retention (best + latest), metadata, bad directories, a failed restore."""

import asyncio
import gc
import logging
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import checkpoint as checkpoint_lib, checkpoint_damage
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.training import step as step_lib

CFG = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


def _state(seed=0):
  train_cfg = shakespeare.get_config('tiny').train
  train_cfg.seed = seed
  return step_lib.init_train_state(CFG, train_cfg)


def _meta():
  return {'model': CFG.to_dict(), 'tokenizer': {'type': 'char', 'chars': list('abcdefghijk')}}


def _abstract(state):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def test_round_trip_restores_every_leaf(tmp_path):
  state = _state(1)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ck'), shakespeare.get_config().checkpoint)
  ckpt.save(5, state, _meta(), 2.5)
  ckpt.wait()
  restored = ckpt.restore_state(5, _abstract(_state(2)))
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  meta = ckpt.meta(5)
  assert meta['model'] == CFG.to_dict() and meta['val_loss'] == 2.5 and meta['step'] == 5
  ckpt.close()


def test_a_restored_state_has_the_types_of_a_fresh_one(tmp_path):
  """Same dtypes, shapes and weak types: a resumed run then runs the very program a fresh run
  compiled, which JAX's compilation cache holds (a weakly typed fresh step was compiled twice)."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ck'), None)
  ckpt.save(5, _state(1), _meta(), 2.5)
  ckpt.wait()
  restored = ckpt.restore_state(5, jax.eval_shape(_state))
  ckpt.close()
  types = lambda s: [(a.dtype, a.shape, a.weak_type) for a in jax.tree_util.tree_leaves(s)]
  assert types(restored) == types(_state())


def test_keeps_the_best_and_the_latest(tmp_path):
  cfg = shakespeare.get_config().checkpoint
  cfg.keep_last = 2
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ck'), cfg)
  state = _state()
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7)]:
    ckpt.save(step, state, _meta(), loss)
  ckpt.wait()
  assert ckpt.steps() == [2, 4, 5]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
  ckpt.close()


def test_load_for_inference_reads_params_and_meta_only(tmp_path):
  state = _state(3)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), None)
  ckpt.save(7, state, _meta(), 1.5)
  ckpt.close()
  cfg, params, meta = checkpoint_lib.load_for_inference(str(tmp_path / 'run'))  # The out_dir works.
  assert cfg == CFG and meta['step'] == 7
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_empty_and_foreign_directories(tmp_path):
  with pytest.raises(UserError, match='no checkpoint directory'):
    checkpoint_lib.load_for_inference(str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='no checkpoints'):
    checkpoint_lib.load_for_inference(str(tmp_path / 'empty'))
  # A checkpoint written by something else (no gpt_jax metadata).
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(str(tmp_path / 'foreign'))
  mngr.save(1, args=ocp.args.Composite(weights=ocp.args.StandardSave({'w': np.ones(3)})))
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(UserError, match='gpt_jax'):
    checkpoint_lib.load_for_inference(str(tmp_path / 'foreign'))


def test_unknown_step_lists_the_available_ones(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'ck'), None)
  ckpt.save(3, _state(), _meta(), 1.0)
  ckpt.close()
  with pytest.raises(UserError, match=r'step 4.*\[3\]'):
    checkpoint_lib.load_for_inference(str(tmp_path / 'ck'), step=4)


def test_model_mismatch_names_fields():
  meta = _meta()
  other = ModelConfig(**dict(CFG.to_dict(), n_layer=2, dropout=0.3))
  with pytest.raises(UserError, match=r'n_layer: checkpoint 1, config 2'):
    checkpoint_damage.check_model_matches(meta, other, 'here')
  # Dropout does not change the parameters, so it alone is not a mismatch.
  checkpoint_damage.check_model_matches(meta, ModelConfig(**dict(CFG.to_dict(), dropout=0.3)), 'here')


def test_a_failed_restore_awaits_its_other_reads_and_leaves_nothing_to_print_later(tmp_path,
                                                                                  monkeypatch,
                                                                                  caplog):
  """One array of a checkpoint is cut short; the reads of the others are still in flight when it fails
  (staged: each healthy read, once done, yields to the event loop until a read failed, then 100 times
  more, which is many loop turns past the failure reaching Orbax). Before the fix, Orbax's closed loop
  left them pending, and the garbage collector later printed 'Exception ignored in: <coroutine object
  _read_array_index_and_device_put ...>' for each, with a TensorStore spec."""
  from orbax.checkpoint._src.serialization import serialization
  directory = tmp_path / 'ck'
  ckpt = checkpoint_lib.Checkpointer(str(directory), None)
  ckpt.save(5, _state(1), _meta(), 2.5)
  ckpt.close()
  files = [p for p in (directory / '5' / 'params').rglob('*') if p.is_file() and '/d/' in str(p)]
  big = max(files, key=lambda p: p.stat().st_size)  # The arrays' data (the others: B-tree nodes).
  os.truncate(big, big.stat().st_size // 2)

  real_read, failed, finished = serialization._read_shard, [], []

  async def staged_read(**kwargs):
    try:
      shard = await real_read(**kwargs)
    except BaseException:
      failed.append(True)
      raise
    for _ in range(10_000):
      if failed:
        break
      await asyncio.sleep(0)
    for _ in range(100):
      await asyncio.sleep(0)
    finished.append(True)
    return shard
  monkeypatch.setattr(serialization, '_read_shard', staged_read)
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  ckpt = checkpoint_lib.Checkpointer(str(directory), read_only=True)
  # Training's restore, then sampling's and evaluation's (parameters only).
  for restore in (lambda: ckpt.restore_state(5, _abstract(_state())),
                  lambda: ckpt.restore_params(5, _abstract(_state()).params)):
    failed.clear()
    finished.clear()
    with pytest.raises(checkpoint_lib.DamagedCheckpoint, match=r'checkpoint 5 in .* is damaged'):
      restore()
    gc.collect()
    assert failed and finished  # Reads of both kinds happened: the staging worked.
    assert [str(u.object) for u in unraisable] == []
    assert not [r for r in caplog.records if r.name == 'asyncio' and r.levelno >= logging.ERROR]


def _cut(path):
  os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize('damage', [
    ('the arrays\' data', lambda d: _cut(max(d.glob('ocdbt.process_0/d/*'), key=lambda p: p.stat().st_size))),
    ('the B-tree root', lambda d: [_cut(p) for p in d.glob('d/*')]),
    ('the manifests', lambda d: [_cut(p) for p in d.rglob('manifest.ocdbt')]),
    ('a missing manifest', lambda d: [p.unlink() for p in d.rglob('manifest.ocdbt')]),
], ids=lambda d: d[0])
def test_every_cut_or_missing_array_file_is_damage_not_a_model_mismatch(tmp_path, damage):
  """Orbax's OCDBT keeps each item's arrays in data files under ocdbt.process_0/d/, indexed by a B-tree
  whose root is under d/ and manifests; damage to any of them is a damaged checkpoint (which
  resume_from_last_good sets aside), never 'does not fit the configured model'."""
  directory = tmp_path / 'ck'
  ckpt = checkpoint_lib.Checkpointer(str(directory), None)
  ckpt.save(5, _state(1), _meta(), 2.5)
  ckpt.close()
  damage[1](directory / '5' / 'params')
  ckpt = checkpoint_lib.Checkpointer(str(directory), read_only=True)
  with pytest.raises(checkpoint_lib.DamagedCheckpoint, match=r'checkpoint 5 in .* is damaged \((OUT_OF_RANGE|'
                     r'DATA_LOSS|NOT_FOUND): '):
    ckpt.restore_state(5, _abstract(_state()))
  with pytest.raises(checkpoint_lib.DamagedCheckpoint):
    ckpt.restore_params(5, _abstract(_state()).params)


def _files(directory):
  return {p: p.read_bytes() for p in directory.rglob('*') if p.is_file()}


@pytest.mark.parametrize('item', ['params', 'meta'])
def test_a_step_missing_an_item_is_an_incomplete_checkpoint_that_resume_can_set_aside(tmp_path, item):
  """A step folder without its params/ or meta/ is damaged (incomplete), not a checkpoint of other
  settings nor one written by something else; a resume names the newest good step and, when asked
  (train.resume_from_last_good), moves the incomplete one aside whole."""
  directory = tmp_path / 'run' / 'checkpoints'
  ckpt = checkpoint_lib.Checkpointer(str(directory), None)
  ckpt.save(5, _state(1), _meta(), 2.5)
  ckpt.save(6, _state(1), _meta(), 2.4)
  ckpt.close()
  shutil.rmtree(directory / '6' / item)
  before = _files(tmp_path)
  ckpt = checkpoint_lib.Checkpointer(str(directory), None)
  incomplete = rf'checkpoint 6 in {directory} is damaged \(incomplete: its {item}/ folder is missing\)'
  read_item = {'params': lambda: ckpt.restore_state(6, _abstract(_state())), 'meta': lambda: ckpt.meta(6)}
  for read in (read_item[item], lambda: checkpoint_lib.load_for_inference(str(tmp_path / 'run'), step=6)):
    with pytest.raises(checkpoint_lib.DamagedCheckpoint) as e:
      read()
    assert re.match(incomplete, str(e.value)) and '\n' not in str(e.value), str(e.value)
  with pytest.raises(checkpoint_lib.DamagedCheckpoint) as e:
    checkpoint_damage.resume_newest_good(ckpt, _abstract(_state()), lambda step, meta: None, False)
  assert re.fullmatch(incomplete + r'; the newest good checkpoint is step 5: continue from it with '
                      r'--config\.train\.resume=True --config\.train\.resume_from_last_good=True, which '
                      rf'moves checkpoint 6 to {tmp_path / "run" / "damaged_checkpoints"} \(nothing is '
                      r'deleted\)', str(e.value)), str(e.value)
  assert not re.search('settings it was saved with|written by gpt_jax', str(e.value))
  assert _files(tmp_path) == before  # Refused: not a byte changed.

  step, _, meta = checkpoint_damage.resume_newest_good(ckpt, _abstract(_state()),
                                                       lambda step, meta: None, True)
  ckpt.close()
  assert step == 5 and meta['step'] == 5
  aside = tmp_path / 'run' / checkpoint_damage.DAMAGED_DIR / '6'
  moved = {p.relative_to(aside): b for p, b in _files(aside).items()}
  assert moved == {p.relative_to(directory / '6'): b for p, b in before.items()
                   if directory / '6' in p.parents}  # Moved whole, nothing deleted.
  assert sorted(os.listdir(directory)) == ['5']


def test_parameters_of_another_shape_name_the_parameter_and_the_saved_config(tmp_path):
  """Not Orbax's advice to pass strict=False (which would pad or cut the arrays): the first parameter
  whose shape differs, both shapes, and the config the checkpoint was saved with."""
  directory = tmp_path / 'run' / 'checkpoints'
  ckpt = checkpoint_lib.Checkpointer(str(directory), None)
  ckpt.save(5, _state(1), _meta(), 2.5)
  ckpt.close()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  before = _files(tmp_path)
  wide = ModelConfig(**dict(CFG.to_dict(), n_embd=32))
  train_cfg = shakespeare.get_config('tiny').train
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(wide, train_cfg))
  ckpt = checkpoint_lib.Checkpointer(str(directory), read_only=True)
  names = r'parameter h_0/attn/c_attn/kernel is \(16, 48\) in the checkpoint but \(32, 96\) in this model'
  advice = rf"; the model section must match the checkpoint's \(saved in {tmp_path / 'run' / 'config.json'}\)\."
  with pytest.raises(UserError) as e:
    ckpt.restore_state(5, abstract)
  assert re.fullmatch(rf'checkpoint 5 in {directory} does not fit the configured model and optimizer: '
                      + names + advice, str(e.value)), str(e.value)
  with pytest.raises(UserError) as e:
    ckpt.restore_params(5, abstract.params)
  assert re.fullmatch(rf'checkpoint 5 in {directory}: cannot restore parameters: ' + names + advice,
                      str(e.value)), str(e.value)
  assert 'strict' not in str(e.value)
  ckpt.close()
  assert _files(tmp_path) == before

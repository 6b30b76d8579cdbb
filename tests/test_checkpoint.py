"""Orbax checkpoints: round trip, retention (best + latest), metadata, bad directories."""

import jax
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import checkpoint as checkpoint_lib
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
    checkpoint_lib.check_model_matches(meta, other, 'here')
  # Dropout does not change the parameters, so it alone is not a mismatch.
  checkpoint_lib.check_model_matches(meta, ModelConfig(**dict(CFG.to_dict(), dropout=0.3)), 'here')

"""Orbax checkpoints under `out_dir/checkpoints`.

Each step directory holds four items, written by one `CheckpointManager.save`: `params` (enough for
sampling), `opt_state` (only to resume training), `progress` (the train step and base PRNG key) and
`meta` (JSON: model config, tokenizer vocabulary, losses, run config: all that sampling or evaluation
need). Retention: the newest `keep_last` checkpoints plus the one with the lowest val loss.
Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a failed
save (a full disk) is never listed as a step, and old steps go only once the new one is complete; the
writer (holding the run lock, gpt_jax/training/runlock.py) removes such leftovers when it opens the
directory. A damaged checkpoint is never deleted here: telling damage from a mismatch, the messages
for both and a resume's policy for damaged steps live in gpt_jax/checkpoint_damage.py.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gpt_jax import checkpoint_damage as damage
from gpt_jax.checkpoint_damage import DamagedCheckpoint
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError

FORMAT = 'gpt_jax'
FORMAT_VERSION = 1


def checkpoint_dir(path: str) -> str:
  """Accepts a run's out_dir or its `checkpoints/` folder; returns the absolute checkpoints folder."""
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, 'checkpoints')
  return sub if os.path.isdir(sub) else path


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` with gpt_jax's items, metadata and messages."""

  def __init__(self, directory: str, ckpt_cfg: Optional[ml_collections.ConfigDict] = None,
               read_only: bool = False, set_aside_damaged: bool = False):
    """`set_aside_damaged`: a step whose metrics JSON Orbax cannot read on opening is moved to
    `damaged_checkpoints/` instead of refused (train.resume_from_last_good)."""
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self._set_aside = set_aside_damaged
    if read_only:
      if not os.path.isdir(self.directory):
        raise UserError(f'no checkpoint directory at {self.directory}; pass the out_dir of a '
                        'training run (e.g. --ckpt_dir out/shakespeare_char).')
      options = ocp.CheckpointManagerOptions(read_only=True, best_fn=_val_loss, best_mode='min')
    else:
      keep_last = int(ckpt_cfg.keep_last) if ckpt_cfg is not None else 2
      policy = checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=max(keep_last, 1)),
          # BestN sorts by the metric and keeps the tail; `reverse=True` puts the *lowest* loss there.
          checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1),
      ])
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policy, best_fn=_val_loss, best_mode='min',
          enable_async_checkpointing=bool(ckpt_cfg.async_save) if ckpt_cfg is not None else True,
          create=True, cleanup_tmp_directories=True)  # Leftovers of a failed save: see the top.
    self._options = options
    self._pending: Optional[int] = None  # A step saved in the background, not yet known complete.
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return damage.open_manager(lambda: ocp.CheckpointManager(self.directory, options=self._options),
                               self.directory, self._set_aside)

  # --- queries ---------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    try:
      return self.manager.best_step()
    except Exception:  # No metrics recorded (e.g. written by something else): fall back to latest.
      return self.manager.latest_step()

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step` (raises UserError if it isn't a gpt_jax checkpoint)."""
    damage.check_complete(self.directory, step, ('meta',))
    try:
      with damage.reads_awaited():
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      if damage.is_damage(e):
        raise DamagedCheckpoint(step, self.directory, f'meta: {damage.reason(e)}') from None
      raise UserError(f'checkpoint {step} in {self.directory} has no readable gpt_jax metadata ({e}); '
                      'is it a checkpoint written by gpt_jax?') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      raise UserError(f'checkpoint {step} in {self.directory} was not written by gpt_jax.')
    return meta

  # --- save / restore --------------------------------------------------------------------------
  def save(self, step: int, state: Any, meta: dict[str, Any], val_loss: float, ema: Any = None) -> None:
    """Saves the train state (params, opt_state, step, key) and metadata as checkpoint `step`.

    With `ema` (train.ema_decay > 0) its averaged weights are also saved as the item `ema_params`, which
    inference reads instead of `params`; params and optimizer state stay for an exact resume.
    """
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, step=int(step),
                val_loss=float(val_loss))
    items = {}
    if ema is not None:
      meta['inference_params'] = 'ema_params'
      items['ema_params'] = ocp.args.StandardSave(ema.ema)
    self.wait()  # A failure of the previous (background) save is reported as that step's.
    try:
      self.manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          opt_state=ocp.args.StandardSave(state.opt_state),
          progress=ocp.args.StandardSave({'step': state.step, 'key': state.key}),
          meta=ocp.args.JsonSave(meta), **items,
      ), metrics={'val_loss': float(val_loss)}, force=True)
    except Exception as e:
      raise damage.write_error(self.directory, step, e) from None
    self._pending = step

  def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """An inference-only checkpoint (e.g. converted GPT-2 weights): no optimizer state, not resumable.
    Orbax refuses an empty item, so `opt_state` is left out and the metadata says so."""
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, step=int(step),
                val_loss=float('nan'), inference_only=True)
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        progress=ocp.args.StandardSave({'step': jnp.asarray(step, jnp.int32),
                                        'key': jax.random.PRNGKey(0)}),
        meta=ocp.args.JsonSave(meta),
    ), metrics={'val_loss': float('nan')}, force=True)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Restores a full train state shaped (and sharded) like `abstract_state`."""
    abstract_state = _placed(abstract_state)
    damage.check_complete(self.directory, step, ('params', 'opt_state', 'progress'))
    try:
      with damage.reads_awaited():
        r = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            progress=ocp.args.StandardRestore({'step': abstract_state.step, 'key': abstract_state.key}),
        ))
    except Exception as e:
      raise damage.read_error(self.directory, step, e, {
          'params': abstract_state.params, 'opt_state': abstract_state.opt_state}) from None
    return abstract_state.replace(params=r.params, opt_state=r.opt_state,
                                  step=r.progress['step'], key=r.progress['key'])

  def restore_params(self, step: int, abstract_params: Any = None, meta: Optional[dict] = None) -> Any:
    """Restores only the parameters the run evaluated (`ema_params` when it kept an average, else
    `params`): what sampling and evaluation need. `meta`: the step's metadata, if already read."""
    abstract_params = _placed(abstract_params)
    item = (self.meta(step) if meta is None else meta).get('inference_params', 'params')
    damage.check_complete(self.directory, step, (item,))
    try:
      with damage.reads_awaited():
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(abstract_params)}))[item]
    except Exception as e:
      raise damage.read_error(self.directory, step, e, {item: abstract_params}) from None

  def wait(self) -> None:
    """Waits for a background save to be complete on disk; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      # The first failed item ends the wait while Orbax's threads may still write the step's other
      # items; closing the manager joins them, so nothing writes into the folder after this raises
      # (a resumed run in the same process would race them for the step's temporary folder).
      try:
        self.manager.close()
      except Exception:  # The same failure again: already reported below.
        pass
      raise damage.write_error(self.directory, self._pending, e) from None
    self._pending = None

  def close(self) -> None:
    self.wait()
    self.manager.close()


def load_for_inference(ckpt_dir: str, step: Optional[int] = None) -> tuple[ModelConfig, Any, dict]:
  """Opens a run's checkpoints and returns (model config, params, meta) of `step` (default: best)."""
  from gpt_jax import model as model_lib  # Local import keeps this module light for tooling.
  ckpt = Checkpointer(checkpoint_dir(ckpt_dir), read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise UserError(f'no checkpoints in {ckpt.directory}; train first (scripts/train.py) or pass the '
                    'out_dir of a finished run.')
  if step is None:
    step = ckpt.best_step()
  elif step not in steps:
    raise UserError(f'no checkpoint for step {step} in {ckpt.directory}; available: {steps}')
  try:
    meta = ckpt.meta(step)
    model_cfg = ModelConfig.from_dict(meta['model'])
    abstract = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.PRNGKey(0)))
    params = ckpt.restore_params(step, abstract, meta)
  except DamagedCheckpoint as e:
    others = [s for s in steps if s != step]
    raise DamagedCheckpoint(step, ckpt.directory, e.reason, (
        f'pick another with --step (available: {others})' if others else '')) from None
  ckpt.close()
  return model_cfg, params, meta


def _placed(abstract: Any) -> Any:
  """Leaves without a target sharding go to this process's first device. Otherwise Orbax would rebuild
  the sharding it was saved with, which fails on another topology (saved on 4 devices, read on 1)."""
  if abstract is None:
    return None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
      if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None else a, abstract)


def _val_loss(metrics: Any) -> float:
  return float(metrics['val_loss'])

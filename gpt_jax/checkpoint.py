"""Orbax checkpoints under `out_dir/checkpoints`.

Each checkpoint step directory holds four items, written by one `CheckpointManager.save`:
  params     the model parameters (enough for sampling)
  opt_state  the optimizer state (needed only to resume training)
  progress   the train step and the base PRNG key
  meta       JSON: model config, tokenizer vocabulary, losses, and the run config,
             so a checkpoint directory is all that sampling or evaluation need.

Retention: the newest `keep_last` checkpoints plus the one with the lowest val loss.
Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete, so an
interrupted or failed save (a full disk) is never listed as a step, and old steps are removed only after
the new one is complete. The writer (training, which holds the run lock of gpt_jax/training/runlock.py) removes
such leftovers when it opens the directory. A failed save stops the run with `CheckpointWriteError`.

A damaged checkpoint (a truncated array file, garbled JSON) raises `DamagedCheckpoint` naming the step;
nothing here ever deletes it. `resume_state` can continue from the newest readable step instead, after
moving the damaged ones to `damaged_checkpoints/` beside the checkpoints folder. Every restore awaits all
of its reads, even after one of them failed (`_reads_awaited`): a failed restore leaves nothing behind
that prints a traceback later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_lib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError

FORMAT = 'gpt_jax'
FORMAT_VERSION = 1
DAMAGED_DIR = 'damaged_checkpoints'  # Beside `checkpoints/`: where damaged steps are moved on request.
# A failed restore waits this long for its other reads to finish (they do within milliseconds: each one
# reads one array or fails); past it they are cancelled, so a hung filesystem cannot hang the run.
READS_GRACE_SECONDS = 60


class DamagedCheckpoint(UserError):
  """Checkpoint `step` exists but cannot be read: its files are truncated, missing or garbled."""

  def __init__(self, step: int, directory: str, reason: str, advice: str = ''):
    super().__init__(f'checkpoint {step} in {directory} is damaged ({reason})'
                     + (f'; {advice}' if advice else ''))
    self.step, self.reason = step, reason


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


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
    try:
      return ocp.CheckpointManager(self.directory, options=self._options)
    except Exception as e:  # Orbax reads every step's metrics JSON on opening.
      for step in _step_dirs(self.directory):
        try:
          with open(os.path.join(self.directory, str(step), 'metrics', 'metrics'), 'rb') as f:
            json.loads(f.read())
        except FileNotFoundError:
          pass
        except ValueError as bad:
          if self._set_aside:
            print(f'moved damaged checkpoint {step} to {self._move_steps([step])}')
            return self._open()
          raise DamagedCheckpoint(
              step, self.directory, f'metrics/metrics: {_first_line(bad)}',
              'move it out of the folder to use the others; a resume with '
              f'--config.train.resume_from_last_good=True moves it to {self._damaged_dir()} itself'
          ) from None
      raise e

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
    try:
      with _reads_awaited():
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      if _is_damage(e):
        raise DamagedCheckpoint(step, self.directory, f'meta: {_reason(e)}') from None
      raise UserError(f'checkpoint {step} in {self.directory} has no readable gpt_jax metadata ({e}); '
                      'is it a checkpoint written by gpt_jax?') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      raise UserError(f'checkpoint {step} in {self.directory} was not written by gpt_jax.')
    return meta

  # --- save / restore --------------------------------------------------------------------------
  def save(self, step: int, state: Any, meta: dict[str, Any], val_loss: float, ema: Any = None) -> None:
    """Saves the train state (params, opt_state, step, key) and metadata as checkpoint `step`.

    With `ema` (the optimizer's `EmaState`, train.ema_decay > 0), its averaged weights are also saved
    as the item `ema_params`, which inference reads instead of `params` (`restore_params`); the
    training params and the whole optimizer state stay in the checkpoint for an exact resume.
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
      raise self._write_error(step, e) from None
    self._pending = step

  def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """An inference-only checkpoint (e.g. converted GPT-2 weights): no optimizer state, not resumable.

    Orbax refuses an empty item, so `opt_state` is left out and the metadata says so.
    """
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
    try:
      with _reads_awaited():
        r = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            progress=ocp.args.StandardRestore({'step': abstract_state.step, 'key': abstract_state.key}),
        ))
    except Exception as e:
      if _is_damage(e):
        raise DamagedCheckpoint(step, self.directory, _reason(e)) from None
      raise UserError(f'checkpoint {step} in {self.directory} does not fit the configured model and '
                      f'optimizer: {_first_line(e).rstrip(":")}. Resume with the settings it was '
                      'saved with (the config.json beside the checkpoints: the model section and '
                      'train.optimizer, muon_batched, ema_decay, grad_clip).') from None
    return abstract_state.replace(params=r.params, opt_state=r.opt_state,
                                  step=r.progress['step'], key=r.progress['key'])

  def restore_params(self, step: int, abstract_params: Any = None, meta: Optional[dict] = None) -> Any:
    """Restores only the parameters (no optimizer state): what sampling and evaluation need.

    Those are the weights the run evaluated: the `ema_params` item when it kept an average
    (train.ema_decay > 0), else `params`. `meta`: the step's metadata, if the caller has read it.
    """
    abstract_params = _placed(abstract_params)
    item = (self.meta(step) if meta is None else meta).get('inference_params', 'params')
    try:
      with _reads_awaited():
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(abstract_params)}))[item]
    except Exception as e:
      if _is_damage(e):
        raise DamagedCheckpoint(step, self.directory, _reason(e)) from None
      raise UserError(f'checkpoint {step} in {self.directory}: cannot restore parameters '
                      f'({_first_line(e)})') from None

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
      raise self._write_error(self._pending, e) from None
    self._pending = None

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _write_error(self, step: Optional[int], e: Exception) -> CheckpointWriteError:
    reason, advice = _os_reason(e)
    good = [s for s in _step_dirs(self.directory) if s != step]  # Renamed into place: complete.
    return CheckpointWriteError(
        f'could not write checkpoint {step} to {self.directory} ({reason}); training stopped. '
        + (f'The earlier checkpoints ({", ".join(map(str, good))}) are intact: {advice}, then continue '
           'with --config.train.resume=True.' if good else f'No checkpoint was written: {advice}, then '
           'start the run again.'))

  # --- damaged checkpoints ---------------------------------------------------------------------
  def resume_state(self, abstract_state: Any, check_meta: Callable[[int, dict], None],
                   skip_damaged: bool) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores completely.

    A damaged newest checkpoint is a DamagedCheckpoint naming it and the newest good one, unless
    `skip_damaged`: then the damaged steps are moved to `damaged_checkpoints/` (never deleted) and the
    run continues from the good one. `check_meta(step, meta)` raises for a checkpoint of another run.
    Every process must call this (restores are collective); they agree on each step's verdict.
    """
    from gpt_jax.parallel import distributed
    damaged: list[DamagedCheckpoint] = []
    for step in sorted(self.steps(), reverse=True):
      try:
        meta = self.meta(step)
        check_meta(step, meta)
        state, error = self.restore_state(step, abstract_state), None
      except DamagedCheckpoint as e:
        error = e
      if distributed.any_process(error is not None):  # Damage seen by any process counts for all.
        damaged.append(error or DamagedCheckpoint(step, self.directory, 'unreadable on another process'))
        continue
      if damaged and not skip_damaged:
        raise DamagedCheckpoint(damaged[0].step, self.directory, damaged[0].reason, (
            f'the newest good checkpoint is step {step}: continue from it with '
            f'--config.train.resume=True --config.train.resume_from_last_good=True, which moves '
            f'{_plural(damaged)} to {self._damaged_dir()} (nothing is deleted)'))
      if damaged:
        moved = self.move_aside([d.step for d in damaged])
        print(f'moved damaged {_plural(damaged)} to {moved}; continuing from checkpoint {step}')
      return step, state, meta
    raise DamagedCheckpoint(damaged[0].step, self.directory, damaged[0].reason,
                            'no other checkpoint is readable either (nothing was deleted); start a new '
                            'run with another --config.out_dir')

  def _damaged_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)

  def move_aside(self, steps: list[int]) -> str:
    """Moves checkpoint `steps` out of the managed folder into `damaged_checkpoints/`."""
    self.manager.close()
    dest = self._move_steps(steps)
    self.manager = self._open()
    return dest

  def _move_steps(self, steps: list[int]) -> str:
    from gpt_jax.parallel import distributed
    dest = self._damaged_dir()
    if distributed.is_main():
      os.makedirs(dest, exist_ok=True)
      for step in steps:
        target = os.path.join(dest, str(step))
        if os.path.exists(target):  # Damaged twice at the same step: keep both.
          target += time.strftime('.%Y%m%d-%H%M%S')
        shutil.move(os.path.join(self.directory, str(step)), target)
    distributed.barrier('gpt_jax: damaged checkpoints moved')
    return dest


def check_model_matches(meta: dict[str, Any], model_cfg: ModelConfig, where: str) -> None:
  """Raises a UserError naming every field where a checkpoint's model differs from `model_cfg`."""
  saved = ModelConfig.from_dict(meta['model'])
  # Dropout, compute dtype/backend and remat do not change the parameters, nor zero_init_proj once
  # they exist: they may differ on resume. (A saved config from before a field existed reads as that
  # field's default, which is the behaviour the checkpoint was trained with.)
  def shape_only(c: ModelConfig) -> dict:
    d = c.to_dict()
    for k in ('dropout', 'attention', 'attention_dropout', 'dtype', 'remat', 'zero_init_proj'):
      d.pop(k)
    return d
  a, b = shape_only(saved), shape_only(model_cfg)
  diffs = [f'{k}: checkpoint {a[k]!r}, config {b[k]!r}' for k in a if a[k] != b[k]]
  if diffs:
    raise UserError(f'the checkpoint in {where} is for a different model ({"; ".join(diffs)}). '
                    'Use the same model settings, or another --config.out_dir.')


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


class _AwaitingLoopPolicy(asyncio.DefaultEventLoopPolicy):
  """Event loops that, when closed, first await the tasks still pending in them (see `_reads_awaited`)."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    loop = super().new_event_loop()
    pending: set[asyncio.Task] = set()

    def task_factory(loop, coro, **kwargs):  # Tracks this loop's own tasks: no global task registry.
      task = asyncio.Task(coro, loop=loop, **kwargs)
      pending.add(task)
      task.add_done_callback(pending.discard)
      return task

    def close(close=loop.close) -> None:
      if pending and not loop.is_running() and not loop.is_closed():
        tasks = list(pending)
        _, late = loop.run_until_complete(asyncio.wait(tasks, timeout=READS_GRACE_SECONDS))
        for task in late:
          task.cancel()
        if late:
          loop.run_until_complete(asyncio.wait(late))
        for task in tasks:  # Their errors are the failed restore's, already reported by it.
          if not task.cancelled():
            task.exception()
      close()

    loop.set_task_factory(task_factory)
    loop.close = close
    return loop


@contextlib.contextmanager
def _reads_awaited() -> Iterator[None]:
  """Orbax runs a restore's reads (one asyncio task per array) in an event loop of its own, which it
  closes as soon as one read fails. The other reads are then left pending in a closed loop: each is
  destroyed whenever the garbage collector finds it, in whatever thread, and prints a traceback with a
  TensorStore spec ('Exception ignored in: <coroutine object _read_array_index_and_device_put ...>'),
  long after gpt_jax reported the damage in one line. Inside this block the loops Orbax creates await
  their pending tasks before closing, so a failed restore is over when it returns.
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_AwaitingLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _placed(abstract: Any) -> Any:
  """Leaves without a target sharding go to this process's first device.

  Without one, Orbax would rebuild the sharding the checkpoint was saved with, which fails when it
  was written on another topology (e.g. sharded over 4 devices, now sampled on 1).
  """
  if abstract is None:
    return None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
      if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None else a, abstract)


def _step_dirs(directory: str) -> list[int]:
  """The complete (renamed into place) step folders on disk, oldest first."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except FileNotFoundError:
    return []


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _is_damage(e: Exception) -> bool:
  """Unreadable files, as opposed to a well-formed checkpoint of another shape (a user's mismatch).

  Orbax reports a shape or tree mismatch as ValueError/KeyError/TypeError; garbled JSON surfaces as a
  JSONDecodeError (a ValueError), and a TensorStore read failure as a bare Exception or an OSError, except
  when opening an array: then TensorStore's ValueError starts with its status, which names the damage (a
  file cut short, undecodable, or gone).
  """
  if any(isinstance(c, (json.JSONDecodeError, UnicodeDecodeError)) for c in _chain(e)):
    return True
  if any(str(c).startswith(('OUT_OF_RANGE:', 'DATA_LOSS:', 'NOT_FOUND:')) for c in _chain(e)):
    return True
  return not isinstance(e, (ValueError, KeyError, TypeError))


def _reason(e: BaseException) -> str:
  """The innermost cause's first line: TensorStore's own words beat Orbax's wrapper."""
  return _first_line(_chain(e)[-1])


def _os_reason(e: BaseException) -> tuple[str, str]:
  """(what failed, what to do) for a failed write; TensorStore reports errno only inside its text."""
  text = ' '.join(str(c) for c in _chain(e))
  codes = {getattr(c, 'errno', None) for c in _chain(e)}
  if errno_lib.ENOSPC in codes or 'No space left' in text or "os_error_code='28'" in text:
    return 'no space left on device', 'free some space'
  if errno_lib.EDQUOT in codes or 'quota exceeded' in text.lower():
    return 'disk quota exceeded', 'free some space'
  if codes & {errno_lib.EACCES, errno_lib.EPERM} or 'Permission denied' in text:
    return 'permission denied', 'make the directory writable'
  if errno_lib.EROFS in codes or 'Read-only file system' in text:
    return 'read-only file system', 'make the directory writable'
  return _reason(e), 'fix the cause'


def _plural(damaged: list) -> str:
  steps = ', '.join(str(d.step) for d in damaged)
  return f'checkpoint {steps}' if len(damaged) == 1 else f'checkpoints {steps}'


def _val_loss(metrics: Any) -> float:
  return float(metrics['val_loss'])


def _first_line(e: Exception) -> str:
  s = str(e).strip()
  s = s.splitlines()[0] if s else type(e).__name__
  return s if len(s) <= 300 else s[:300] + ' ...'  # Orbax may append the whole tree's keys.

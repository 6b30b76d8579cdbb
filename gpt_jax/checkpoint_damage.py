"""What can go wrong reading a checkpoint, told apart and put in one line (for gpt_jax/checkpoint.py).

A checkpoint that exists but cannot be read (a truncated array file, garbled JSON, an item folder
missing) is *damaged*: `DamagedCheckpoint` names the step, and nothing here ever deletes it. A
well-formed checkpoint of another shape is the user's *mismatch*: `describe_mismatch` names the first
array whose shape differs, `check_model_matches` every model field that differs. `resume_newest_good`
is the read policy of a resumed run: the newest step that restores completely, after moving the
damaged ones to `damaged_checkpoints/` on request (train.resume_from_last_good). Every restore awaits
all of its reads, even after one of them failed (`reads_awaited`): a failed restore leaves nothing
behind that prints a traceback later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_lib
import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import jax

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError

if TYPE_CHECKING:
  from gpt_jax.checkpoint import Checkpointer

DAMAGED_DIR = 'damaged_checkpoints'  # Beside `checkpoints/`: where damaged steps are moved on request.
ITEMS = ('params', 'opt_state', 'progress', 'meta')  # The item folders of every training checkpoint.
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


def check_complete(directory: str, step: int, items: tuple[str, ...]) -> None:
  """Raises DamagedCheckpoint if step `step` lacks one of `items` while holding others of gpt_jax's.

  A step folder is renamed into place only once every item is written, so a missing item was lost
  afterwards (deleted, a partial copy). A folder with none of gpt_jax's items is not gpt_jax's: the
  restore then reports it as such.
  """
  step_dir = os.path.join(directory, str(step))
  present = [i for i in ITEMS if os.path.isdir(os.path.join(step_dir, i))]
  missing = [i for i in items if not os.path.isdir(os.path.join(step_dir, i))]
  if present and missing:
    raise DamagedCheckpoint(step, directory, 'incomplete: its ' + ', '.join(f'{i}/' for i in missing)
                            + (' folder is' if len(missing) == 1 else ' folders are') + ' missing')


def garbled_metrics(directory: str) -> Optional[tuple[int, str]]:
  """(step, reason) of the first step whose metrics JSON cannot be parsed (Orbax reads them all when
  it opens the folder, and fails on one garbled file), or None."""
  for step in step_dirs(directory):
    try:
      with open(os.path.join(directory, str(step), 'metrics', 'metrics'), 'rb') as f:
        json.loads(f.read())
    except FileNotFoundError:
      pass
    except ValueError as bad:
      return step, f'metrics/metrics: {first_line(bad)}'
  return None


def resume_newest_good(ckpt: Checkpointer, abstract_state: Any, check_meta: Callable[[int, dict], None],
                       skip_damaged: bool) -> tuple[int, Any, dict]:
  """(step, state, meta) of the newest checkpoint that restores completely.

  A damaged newest checkpoint is a DamagedCheckpoint naming it and the newest good one, unless
  `skip_damaged`: then the damaged steps are moved to `damaged_checkpoints/` (never deleted) and the
  run continues from the good one. `check_meta(step, meta)` raises for a checkpoint of another run.
  Every process must call this (restores are collective); they agree on each step's verdict.
  """
  from gpt_jax.parallel import distributed
  damaged: list[DamagedCheckpoint] = []
  for step in sorted(ckpt.steps(), reverse=True):
    try:
      meta = ckpt.meta(step)
      check_meta(step, meta)
      state, error = ckpt.restore_state(step, abstract_state), None
    except DamagedCheckpoint as e:
      error = e
    if distributed.any_process(error is not None):  # Damage seen by any process counts for all.
      damaged.append(error or DamagedCheckpoint(step, ckpt.directory, 'unreadable on another process'))
      continue
    if damaged and not skip_damaged:
      raise DamagedCheckpoint(damaged[0].step, ckpt.directory, damaged[0].reason, (
          f'the newest good checkpoint is step {step}: continue from it with '
          f'--config.train.resume=True --config.train.resume_from_last_good=True, which moves '
          f'{_plural(damaged)} to {damaged_dir(ckpt.directory)} (nothing is deleted)'))
    if damaged:
      moved = move_aside(ckpt, [d.step for d in damaged])
      print(f'moved damaged {_plural(damaged)} to {moved}; continuing from checkpoint {step}')
    return step, state, meta
  raise DamagedCheckpoint(damaged[0].step, ckpt.directory, damaged[0].reason,
                          'no other checkpoint is readable either (nothing was deleted); start a new '
                          'run with another --config.out_dir')


def open_manager(open_fn: Callable[[], Any], directory: str, set_aside: bool) -> Any:
  """`open_fn()` (the CheckpointManager, which reads every step's metrics JSON on opening). A step whose
  JSON is garbled is moved to `damaged_checkpoints/` when `set_aside`, else a DamagedCheckpoint."""
  try:
    return open_fn()
  except Exception:
    garbled = garbled_metrics(directory)
    if garbled is None:
      raise
    step, why = garbled
    if set_aside:
      print(f'moved damaged checkpoint {step} to {move_steps(directory, [step])}')
      return open_manager(open_fn, directory, set_aside)
    raise DamagedCheckpoint(
        step, directory, why, 'move it out of the folder to use the others; a resume with '
        f'--config.train.resume_from_last_good=True moves it to {damaged_dir(directory)} '
        'itself') from None


def move_aside(ckpt: Checkpointer, steps: list[int]) -> str:
  """Moves checkpoint `steps` out of the managed folder into `damaged_checkpoints/`; reopens it."""
  ckpt.manager.close()
  dest = move_steps(ckpt.directory, steps)
  ckpt.manager = ckpt._open()
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


def damaged_dir(directory: str) -> str:
  """Where the damaged steps of the checkpoints folder `directory` are moved: beside it."""
  return os.path.join(os.path.dirname(directory), DAMAGED_DIR)


def move_steps(directory: str, steps: list[int]) -> str:
  """Moves checkpoint `steps` out of `directory` into `damaged_checkpoints/` (process 0; all wait)."""
  from gpt_jax.parallel import distributed
  dest = damaged_dir(directory)
  if distributed.is_main():
    os.makedirs(dest, exist_ok=True)
    for step in steps:
      target = os.path.join(dest, str(step))
      if os.path.exists(target):  # Damaged twice at the same step: keep both.
        target += time.strftime('.%Y%m%d-%H%M%S')
      shutil.move(os.path.join(directory, str(step)), target)
  distributed.barrier('gpt_jax: damaged checkpoints moved')
  return dest


def read_error(directory: str, step: int, e: Exception, items: dict[str, Any]) -> UserError:
  """The one-line error for a failed restore of `items` ({item: abstract tree}) from step `step`: a
  DamagedCheckpoint for unreadable files, else a mismatch naming the first array of another shape."""
  if is_damage(e):
    return DamagedCheckpoint(step, directory, reason(e))
  mismatch = describe_mismatch(directory, step, items)
  if 'opt_state' not in items:  # Parameters only: sampling, evaluation.
    return UserError(f'checkpoint {step} in {directory}: cannot restore parameters'
                     + (f': {mismatch}.' if mismatch else f' ({first_line(e)})'))
  return UserError(f'checkpoint {step} in {directory} does not fit the configured model and optimizer: '
                   + (mismatch or (f'{first_line(e).rstrip(":")}. Resume with the settings it was saved '
                                   'with (the config.json beside the checkpoints: the model section and '
                                   'train.optimizer, muon_batched, ema_decay, grad_clip)')) + '.')


def write_error(directory: str, step: Optional[int], e: Exception) -> CheckpointWriteError:
  """The one-line error for a failed save of step `step`, naming the complete steps that remain."""
  what, advice = os_reason(e)
  good = [s for s in step_dirs(directory) if s != step]  # Renamed into place: complete.
  return CheckpointWriteError(
      f'could not write checkpoint {step} to {directory} ({what}); training stopped. '
      + (f'The earlier checkpoints ({", ".join(map(str, good))}) are intact: {advice}, then continue '
         'with --config.train.resume=True.' if good else f'No checkpoint was written: {advice}, then '
         'start the run again.'))


def describe_mismatch(directory: str, step: int, items: dict[str, Any]) -> Optional[str]:
  """Names the first array of `items` ({item: abstract tree}) whose shape on disk differs, and what to
  do about it; None if every shape matches (or the saved shapes cannot be read)."""
  import orbax.checkpoint as ocp
  from etils import epath
  step_dir = os.path.join(directory, str(step))
  config_json = os.path.join(os.path.dirname(directory), 'config.json')
  where = config_json if os.path.isfile(config_json) else f'the model section of {step_dir}/meta'
  for item, abstract in items.items():
    try:
      saved = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir, item))
    except Exception:  # No readable metadata: the caller reports Orbax's own words.
      continue
    shapes = {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(a.shape)
              for p, a in jax.tree_util.tree_leaves_with_path(saved) if hasattr(a, 'shape')}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      if name in shapes and hasattr(leaf, 'shape') and shapes[name] != tuple(leaf.shape):
        if item == 'opt_state':
          return (f'optimizer state {name} is {shapes[name]} in the checkpoint but {tuple(leaf.shape)} '
                  'here; resume with the optimizer settings it was saved with (train.optimizer, '
                  f'muon_batched, ema_decay, grad_clip in {where})')
        return (f'parameter {name} is {shapes[name]} in the checkpoint but {tuple(leaf.shape)} in this '
                f'model; the model section must match the checkpoint\'s (saved in {where})')
  return None


class _AwaitingLoopPolicy(asyncio.DefaultEventLoopPolicy):
  """Event loops that, when closed, first await the tasks still pending in them (see `reads_awaited`)."""

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
def reads_awaited() -> Iterator[None]:
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


def step_dirs(directory: str) -> list[int]:
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


def is_damage(e: Exception) -> bool:
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


def reason(e: BaseException) -> str:
  """The innermost cause's first line: TensorStore's own words beat Orbax's wrapper."""
  return first_line(_chain(e)[-1])


def os_reason(e: BaseException) -> tuple[str, str]:
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
  return reason(e), 'fix the cause'


def _plural(damaged: list) -> str:
  steps = ', '.join(str(d.step) for d in damaged)
  return f'checkpoint {steps}' if len(damaged) == 1 else f'checkpoints {steps}'


def first_line(e: BaseException) -> str:
  """The error's first line, at most 300 characters (Orbax may append the whole tree's keys)."""
  s = str(e).strip()
  s = s.splitlines()[0] if s else type(e).__name__
  return s if len(s) <= 300 else s[:300] + ' ...'

"""One writer per run directory: an OS lock on `out_dir/train.lock`, held for the whole run.

`fcntl.flock` is released by the kernel when the holder exits, however it exits (kill -9 included), so a
lock left behind never blocks a resume, unlike a PID file. The file also names its holder (pid, host,
start time), which the refusal quotes. In a multi-process run process 0 holds the lock for all of them
and tells the others whether it got it.

Before the lock, `claim` makes sure the folder is the run's to write: new, empty, or a run folder of
gpt_jax (a `checkpoints/` folder, or a config.json of gpt_jax's run config beside metrics.jsonl); a user's
other folder is refused and never written to.

Filesystems without flock (some Lustre or NFS mounts) make the lock a no-op with a warning: the run
then goes on unprotected rather than not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator, Optional

from gpt_jax import files
from gpt_jax.errors import UserError
from gpt_jax.parallel import distributed

LOCK_NAME = 'train.lock'
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f'pid {h["pid"]} on host {h["host"]}, started {h["started"]}'
  except (ValueError, KeyError, TypeError):  # Being written this very moment, or not ours.
    return 'another process'


_CONFIG_KEYS = ('model', 'train', 'data', 'out_dir')  # Top-level sections of every run config.


def is_run_dir(path: str) -> bool:
  """Whether `path` is a run folder of gpt_jax: a checkpoints/ folder, or its run config as config.json."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return True
  try:
    with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and all(k in config for k in _CONFIG_KEYS)


def claim(out_dir: str) -> tuple[str, bool]:
  """(absolute out_dir, whether it was created now), once it is sure to be this run's to write.

  New or empty folders are created / taken; a folder holding anything but a gpt_jax run is refused.
  """
  if not str(out_dir).strip():
    raise UserError('out_dir is empty; give the folder the run writes to, e.g. '
                    '--config.out_dir=out/my_run (a new folder, or an earlier run\'s to resume it).')
  path = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f'out_dir {path} is a file, not a folder; pick another --config.out_dir.')
  existed = os.path.isdir(path)
  if existed:
    with files.guard(path, 'list out_dir'):
      entries = [e for e in os.listdir(path) if e != LOCK_NAME]
    if entries and not is_run_dir(path):
      shown = ', '.join(sorted(entries)[:3]) + (', ...' if len(entries) > 3 else '')
      raise UserError(f'out_dir {path} already holds files that are not a gpt_jax run ({shown}); '
                      'nothing was written there. Pick a new or empty --config.out_dir.')
  files.make_dir(path, 'out_dir')
  return path, not existed


def release_unused(out_dir: str) -> None:
  """Removes an out_dir that `claim` created if the run left nothing in it but its lock file."""
  try:
    if set(os.listdir(out_dir)) <= {LOCK_NAME}:
      if os.path.exists(os.path.join(out_dir, LOCK_NAME)):
        os.remove(os.path.join(out_dir, LOCK_NAME))
      os.rmdir(out_dir)
  except OSError:
    pass  # Another process took it meanwhile, or it is not ours to remove: leave it.


def acquire(out_dir: str) -> Optional[int]:
  """Takes the lock of `out_dir` (created if absent) and returns its file descriptor.

  Raises UserError naming the holder if another live process has it; returns None where the
  filesystem cannot lock.
  """
  path = os.path.join(out_dir, LOCK_NAME)
  with files.guard(path, 'take the lock'):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace')
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise UserError(f'{out_dir} is in use by another training run ({_describe(holder)}; lock '
                      f'{path}). Wait for it to finish or stop it, or pick another --config.out_dir; '
                      'nothing was changed.') from None
    if e.errno in _UNSUPPORTED:
      print(f'warning: cannot lock {path} ({e.strerror}); nothing stops a second run from writing '
            'to this directory at the same time.')
      return None
    raise
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                            'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode() + b'\n', 0)
  return fd


@contextlib.contextmanager
def hold(out_dir: str) -> Iterator[None]:
  """Holds `out_dir`'s lock for the duration of the block (process 0 for all processes)."""
  fd, error = None, None
  if distributed.is_main():
    try:
      fd = acquire(out_dir)
    except UserError as e:
      error = e
  if distributed.any_process(error is not None):  # Every process leaves if process 0 could not lock.
    raise error or UserError(f'{out_dir} is in use by another training run (process 0 says more).')
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # Closing the descriptor releases the lock; the file stays (harmless).

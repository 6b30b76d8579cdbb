"""One writer per run directory: an OS lock on `out_dir/train.lock`, held for the whole run.

`fcntl.flock` is released by the kernel when the holder exits, however it exits (kill -9 included), so a
lock left behind never blocks a resume, unlike a PID file. The file also names its holder (pid, host,
start time), which the refusal quotes. In a multi-process run process 0 holds the lock for all of them
and tells the others whether it got it.

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


def acquire(out_dir: str) -> Optional[int]:
  """Takes the lock of `out_dir` (created if absent) and returns its file descriptor.

  Raises UserError naming the holder if another live process has it; returns None where the
  filesystem cannot lock.
  """
  path = os.path.join(out_dir, LOCK_NAME)
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

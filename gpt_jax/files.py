"""The few helpers through which scripts read and write the paths a user gives them.

Each turns the OS's and the decoders' errors (a file where a folder should be, a read-only or full disk,
no permission, bytes that are not UTF-8, a meta.json without a key) into one `UserError` line that names
the path and what to do, and none leaves a partial file behind: writes go to a temporary file of a unique
name beside the target and are renamed over it only when complete, so two processes writing one file
never share a temporary file, and a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Iterator, Mapping

from gpt_jax.errors import UserError

# errno -> what to do about it (after "cannot <verb> <path>: <strerror>").
_FIXES = {
    errno.ENOENT: 'check the path',
    errno.ENOTDIR: 'a file stands where a folder is needed; give a folder path',
    errno.EISDIR: 'it is a folder; give a file path',
    errno.EEXIST: 'a file is in the way; remove it or give another path',
    errno.EACCES: 'you lack permission for it; fix its permissions or give another path',
    errno.EPERM: 'you lack permission for it; fix its permissions or give another path',
    errno.EROFS: 'the disk is read-only; give a path on a writable disk',
    errno.ENOSPC: 'the disk is full; free some space or give a path on another disk',
    errno.EDQUOT: 'your disk quota is used up; free some space or give a path on another disk',
    errno.ENAMETOOLONG: 'the name is too long; give a shorter path',
}


def os_error_message(e: OSError, path: str, verb: str) -> str:
  """`cannot <verb> <path>: <reason>; <what to do>.` for an OSError."""
  reason = e.strerror or str(e)
  fix = _FIXES.get(e.errno or 0, 'check the path and the disk')
  return f'cannot {verb} {path}: {reason}; {fix}.'


@contextlib.contextmanager
def guard(path: str, verb: str) -> Iterator[None]:
  """Turns an OSError or UnicodeDecodeError in the block into one UserError line about `path`."""
  try:
    yield
  except UserError:
    raise
  except UnicodeDecodeError as e:
    raise UserError(f'cannot {verb} {path}: it is not UTF-8 text (byte {e.start}); convert it to '
                    'UTF-8 first.') from None
  except OSError as e:
    raise UserError(os_error_message(e, getattr(e, 'filename', None) or path, verb)) from None


def make_dir(path: str, what: str = 'the folder') -> str:
  """Creates folder `path` (and its parents) if absent; returns it."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'cannot use {path} as {what}: it is a file; give a folder path.')
  with guard(path, f'create {what}'):
    os.makedirs(path, exist_ok=True)
  return path


def read_text(path: str, what: str = 'the file') -> str:
  """The UTF-8 text of a file."""
  if os.path.isdir(path):
    raise UserError(f'cannot read {what} {path}: it is a folder; give a file path.')
  with guard(path, f'read {what}'), open(path, encoding='utf-8') as f:
    return f.read()


def read_json(path: str, what: str = 'the file', keys: Mapping[str, type] | None = None) -> Any:
  """The JSON in a file; with `keys`, it must be an object holding each key with a value of that type."""
  text = read_text(path, what)
  try:
    obj = json.loads(text)
  except ValueError as e:
    raise UserError(f'{what} {path} is not valid JSON ({e}); restore it or write it again.') from None
  for key, kind in (keys or {}).items():
    if not isinstance(obj, dict) or key not in obj:
      raise UserError(f'{what} {path} has no {key!r}; restore it or write it again.')
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is not bool:
      raise UserError(f'{what} {path} has {key}={obj[key]!r}, not a {kind.__name__}; restore it '
                      'or write it again.')
  return obj


def check_writable(path: str, what: str = 'the output file') -> str:
  """Fails early, before any work, if the file `path` could not be written; creates nothing.

  Its folder may be missing (it is created when the file is written): the nearest existing folder
  above it must then be writable.
  """
  if os.path.isdir(path):
    raise UserError(f'cannot write {what} {path}: it is a folder; give a file path.')
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise UserError(os_error_message(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), folder,
                                     f'write {what} {path} under'))
  with guard(path, f'write {what}'):  # Trying is the only sure test (root passes os.access).
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.gpt_jax_check.', suffix='.tmp')
    os.close(fd)
    os.remove(tmp)
  return path


def write_bytes(path: str, data: bytes | Iterator[bytes], what: str = 'the file') -> str:
  """Writes `data` to `path` atomically (a unique temporary file, renamed over it when complete)."""
  folder = os.path.dirname(os.path.abspath(path))
  tmp = None
  with guard(path, f'write {what}'):
    try:
      fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
      with os.fdopen(fd, 'wb') as f:
        for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
          f.write(chunk)
      os.replace(tmp, path)
      tmp = None
    finally:
      if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)
  return path


def write_text(path: str, text: str, what: str = 'the file') -> str:
  """Writes UTF-8 `text` to `path` atomically."""
  return write_bytes(path, text.encode('utf-8'), what)


def write_json(path: str, obj: Any, what: str = 'the file') -> str:
  """Writes `obj` as indented JSON to `path` atomically."""
  return write_text(path, json.dumps(obj, indent=1, ensure_ascii=False), what)

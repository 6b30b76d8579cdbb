"""Shared plumbing for the thin entry points in scripts/: flag errors, quiet library logs, clean exits."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Mapping, Optional, Sequence

from absl import flags, logging as absl_logging

from gpt_jax.errors import exit_on_user_error


class _DropOrbaxChatter(logging.Filter):
  """Orbax logs every file it writes (and read-only notices) through absl; keep only its errors.

  Those come one line each, without their tracebacks: a failed write (a full disk) is logged by every
  writer thread, and the error itself reaches gpt_jax, which reports it in one line of its own.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' not in record.pathname:
      return True
    if record.levelno < logging.ERROR:
      return False
    first = (record.getMessage().strip().splitlines() or [''])[0]
    record.msg, record.args, record.exc_info, record.exc_text = first[:300], (), None, None
    return True


def quiet_library_logs() -> None:
  """absl's app.run logs at INFO; show warnings and errors only, minus Orbax's routine notices."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxChatter) for f in handler.filters):
    handler.addFilter(_DropOrbaxChatter())
  sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


def _without_closed_loop_noise(hook: Callable) -> Callable:
  """After a failed checkpoint write, TensorStore's I/O threads still call back into Orbax's finished
  asyncio loop, and report each failed call ('Event loop is closed') with a traceback. Drop just those."""
  def unraisablehook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed':
      return
    hook(unraisable)
  return unraisablehook


def _innermost_message(e: BaseException) -> str:
  """ml_collections wraps a KeyError's text in an AttributeError; unwrap to the readable words."""
  msg = e.args[0] if e.args else str(e)
  while isinstance(msg, BaseException):
    msg = msg.args[0] if msg.args else str(msg)
  msg = str(msg).replace('\\n', '\n').replace("\\'", "'").strip('"')
  m = re.match(r"^'([^']+)'\s*(.*)$", msg, re.S)  # KeyError text: "'name'\nDid you mean ...?"
  if m:
    return f"there is no config field '{m.group(1)}'. {m.group(2).strip()}".strip()
  return ' '.join(msg.split())


def _without_traceback(msg: str) -> str:
  """Config-file errors arrive with the loader's traceback pasted into the text; keep the gist."""
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  if any(l.startswith('Traceback') for l in lines):
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(l for l in lines if not l.startswith(('Attempted', 'Failed loading config file',
                                                        'Configuration is not available')))


_HELP_FLAGS = {'--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml'}


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that reports a bad flag (e.g. a config-override typo) in one line, no traceback.

  An asked-for --help exits with status 0 (absl's own exits with 1, as if it were an error).
  """
  try:
    try:
      args = flags.FLAGS(argv)
    except SystemExit as e:
      if e.code == 1 and set(argv[1:]) & _HELP_FLAGS:
        sys.exit(0)
      raise
    for name in list(flags.FLAGS):
      value = flags.FLAGS[name].value
      if type(value).__name__ == '_ErrorConfig':  # ml_collections defers config-file errors.
        _ = value.to_dict  # Raises the deferred error now, while we can report it.
    return args
  except flags.Error as e:
    sys.stderr.write(f'error: {_without_traceback(str(e))}\nPass --help to see the flags.\n')
  except OSError as e:
    sys.stderr.write(f'error: {_without_traceback(str(e))}\n')
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    sys.stderr.write(f'error: invalid config override: {_innermost_message(e)} '
                     f'(in: {" ".join(bad) or "the --config flag"})\n')
  sys.exit(2)


CACHE_ENV_VAR = 'GPT_JAX_COMPILATION_CACHE'


def compilation_cache_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """Where the scripts keep JAX's persistent compilation cache; None = leave JAX's setting alone.

  Compiled steps (and, on GPUs, XLA's autotuning of them) are reused across runs. On by default in
  $XDG_CACHE_HOME/gpt_jax/jax_compilation_cache (~/.cache/...). GPT_JAX_COMPILATION_CACHE=off turns
  it off, =DIR puts it elsewhere; a JAX_COMPILATION_CACHE_DIR already set (the test-suite's) wins.
  """
  environ = os.environ if environ is None else environ
  choice = environ.get(CACHE_ENV_VAR, '').strip()
  if environ.get('JAX_COMPILATION_CACHE_DIR') or choice.lower() in ('off', '0', 'false', 'none'):
    return None
  if choice and choice.lower() not in ('on', '1', 'true'):
    return os.path.abspath(os.path.expanduser(choice))
  root = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'gpt_jax', 'jax_compilation_cache')


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache as `compilation_cache_dir` says; returns the folder."""
  path = compilation_cache_dir()
  if path is not None:
    import jax  # Lazily: --help and flag errors stay instant.
    jax.config.update('jax_compilation_cache_dir', path)
  return path


def run_main(fn: Callable[[], object]) -> None:
  """Runs `fn` with quiet logs and the compilation cache on; a UserError becomes one line on stderr
  and exit status 1."""
  quiet_library_logs()
  enable_compilation_cache()
  try:
    with exit_on_user_error():
      fn()
  except SystemExit as e:
    if e.code:  # Reported in one line. What Orbax's I/O coroutines of a failed read or write still
      sys.unraisablehook = lambda unraisable: None  # raise while the interpreter exits is noise.
    raise

"""Shared plumbing for the thin entry points in scripts/: flag errors, quiet library logs, clean exits."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Mapping, Optional, Sequence

from absl import flags, logging as absl_logging

from gpt_jax import files
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


class _ConfigFileError(flags.Error):
  """A config file that cannot be used; its message says what to do (no 'pass --help')."""


def _config_file_args(argv: Sequence[str], with_preset: bool = False) -> list[tuple[str, str]]:
  """(flag, path) of every config-file flag (ml_collections' DEFINE_config_file) given in argv."""
  names = {n for n in flags.FLAGS if type(flags.FLAGS[n]).__name__ == '_ConfigFlag'}
  found = []
  for i, arg in enumerate(argv[1:], 1):
    name, eq, value = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in names:
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else '')
      found.append((name, value if with_preset else value.split(':', 1)[0]))
  return found


def _check_config_files(argv: Sequence[str]) -> None:
  """A config file that is a folder or does not parse as Python: one line, before absl reads it."""
  for name, path in _config_file_args(argv):
    if not path:
      raise _ConfigFileError(f'--{name} needs a file, e.g. --{name}=configs/shakespeare.py:tiny')
    if os.path.isdir(path):
      raise _ConfigFileError(f'--{name}={path} is a folder; give a config file in it, e.g. '
                        f'--{name}={os.path.join(path, "shakespeare.py")}')
    if os.path.isfile(path):
      try:
        with open(path, 'rb') as f:
          compile(f.read(), path, 'exec')
      except SyntaxError as e:
        raise _ConfigFileError(f'the config file {path} has a syntax error at line {e.lineno}: {e.msg}; '
                          'fix it') from None
      except (OSError, ValueError) as e:
        raise _ConfigFileError(f'cannot read the config file {path}: {e}') from None
    elif not os.path.exists(path):
      raise _ConfigFileError(f'cannot read the config file {path}: No such file or directory; check '
                             'the path (e.g. --config=configs/shakespeare.py:tiny)')


def _check_config_values(argv: Sequence[str]) -> None:
  """Every loaded config must be a ConfigDict (a get_config() returning None or a number is not)."""
  from ml_collections import ConfigDict
  for name, value in _config_file_args(argv, with_preset=True):
    try:
      config = flags.FLAGS[name].parser.parse(value)  # The file's own value, before any override.
    except Exception:  # noqa: BLE001  (its own errors are reported by absl's parse)
      continue
    if config is not None and not isinstance(config, ConfigDict):
      raise _ConfigFileError(f'the config file {value} (--{name}) returned {type(config).__name__}, not '
                             'an ml_collections.ConfigDict; make its get_config() return one')


_DEFINE_ERRORS: list[str] = []


def define_config_file(name: str, default: str, help_string: str):
  """ml_collections' DEFINE_config_file, whose parse of sys.argv at definition (an override typo with the
  default config file) is reported by `parse_flags` in one line instead of a traceback."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    bad = [a for a in sys.argv[1:] if a.startswith(f'--{name}.')]
    _DEFINE_ERRORS.append(f'invalid config override: {_innermost_message(e)} '
                          f'(in: {" ".join(bad) or f"the --{name} flag"})')
    return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that reports a bad flag (e.g. a config-override typo) in one line, no traceback.

  An asked-for --help exits with status 0 (absl's own exits with 1, as if it were an error).
  """
  if _DEFINE_ERRORS:
    sys.stderr.write(f'error: {_DEFINE_ERRORS[0]}\n')
    sys.exit(2)
  try:
    try:
      if not set(argv[1:]) & _HELP_FLAGS:
        _check_config_files(argv)
      args = flags.FLAGS(argv)
    except SystemExit as e:
      if e.code == 1 and set(argv[1:]) & _HELP_FLAGS:
        sys.exit(0)
      raise
    except (AttributeError, KeyError, ValueError, TypeError):
      _check_config_values(argv)  # An override failed because the config file returned no ConfigDict?
      raise
    _check_config_values(argv)
    return args
  except _ConfigFileError as e:
    sys.stderr.write(f'error: {e}.\n')
  except flags.Error as e:
    msg = _without_traceback(str(e)) or type(e).__name__
    m = re.match(r'flag --(\S+?)=(.*?): Error whilst parsing config file: (.*)$', msg)
    if m:  # get_config() raised: the file's own error, in one line.
      sys.stderr.write(f'error: the config file {m.group(2)} (--{m.group(1)}) failed: {m.group(3)}\n')
      sys.exit(2)
    sys.stderr.write(f'error: {msg}; pass --help to see the flags.\n')
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
      try:
        fn()
      except (OSError, UnicodeDecodeError) as e:  # A path no helper of gpt_jax/files.py guarded yet.
        with files.guard(getattr(e, 'filename', None) or 'a file', 'use'):
          raise
  except SystemExit as e:
    if e.code:  # Reported in one line. What Orbax's I/O coroutines of a failed read or write still
      sys.unraisablehook = lambda unraisable: None  # raise while the interpreter exits is noise.
    raise

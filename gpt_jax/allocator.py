"""Runs the entry points on mimalloc instead of glibc's malloc (Linux), with no step by the user.

Why: XLA:CPU allocates and frees its large temporary buffers (activations, gradients) on every
step. glibc's malloc hands the memory of large freed blocks back to the OS (munmap, heap trimming),
so each step page-faults the same memory in again, and the kernel zeroes every page. An allocator that keeps
freed memory mapped (mimalloc, tcmalloc, jemalloc) removes nearly all of those faults and makes the
small train step much faster, with bit-identical losses. docs/performance.md has the
measured table (`python scripts/bench_allocator.py`) and why mimalloc: it is the one shipped in a
pip wheel (`cmeel-mimalloc`, pinned in requirements.txt), so `pip install -r requirements.txt`
is all it takes.

malloc cannot be replaced inside a running process, so `preload()`, called at the top of a script
before jax or numpy is imported, sets LD_PRELOAD (and mimalloc's tuning variables, `mimalloc_env`:
the `speedrun` preset's command needs none set by hand) and re-executes
the same interpreter with the same arguments, once, the way Intel's PyTorch launcher preloads
tcmalloc. `os.execve` keeps the process id, stdin/stdout/stderr and the exit status.

  GPT_JAX_ALLOCATOR=system   turns it off (glibc malloc)
  GPT_JAX_ALLOCATOR=/path/libtcmalloc.so.4   preloads another allocator instead

Elsewhere than Linux on x86_64 or aarch64 (where the wheel exists), and where JAX will run on a GPU or
TPU (`accelerator_backend`: malloc serves only the host side there), nothing happens. If the library
is missing or cannot be loaded, the script runs on the system allocator after one note line on
stderr. Processes the script starts inherit LD_PRELOAD, so a script started by a script does not
execute again.
"""

from __future__ import annotations

import os
import re
import sys

ENV_VAR = 'GPT_JAX_ALLOCATOR'
# Set to the process id just before the re-exec. execve keeps the id, so the re-executed process
# recognises itself and never executes again, even if the loader refused the library.
_REEXEC_VAR = '_GPT_JAX_ALLOCATOR_PID'
# mimalloc's options for the re-executed process (a value the user already set wins).
# arena_max_object_size: mimalloc maps blocks above this size (2 GiB by default) straight from the
# OS and unmaps them on free, as glibc does. XLA:CPU holds a step's temporaries in one block, which
# passes 2 GiB on the 6/6/384 step, so without this every such step faults it all in again.
MIMALLOC_ENV = {'MIMALLOC_ARENA_MAX_OBJECT_SIZE': '256GiB'}
# Presets whose step runs faster when mimalloc never hands freed memory back to the OS
# (MIMALLOC_PURGE_DELAY=-1): on the `speedrun` step its purging (after 10 ms by default) returns the
# pages that the next step faults in again. Never purging lets the heap grow through the run, and on
# the 6/6/384 step it grew far past glibc's peak, so only these presets get it (docs/performance.md
# has both measurements). A value the user set wins; MIMALLOC_PURGE_DELAY=10 is mimalloc's default.
NEVER_PURGE_PRESETS = ('speedrun',)
PURGE_VAR = 'MIMALLOC_PURGE_DELAY'
# An allocator already in the process (inherited LD_PRELOAD, or the user's own): leave it alone.
_ALLOCATOR_RE = re.compile(r'/lib(mi|tc|je)malloc[^/]*\.so[^/]*$')


def library_path() -> str | None:
  """Path of libmimalloc from the installed `cmeel-mimalloc` wheel, or None if it is not installed."""
  from importlib import metadata
  try:
    dist = metadata.distribution('cmeel-mimalloc')
  except metadata.PackageNotFoundError:
    return None
  for f in dist.files or ():
    if f.name == 'libmimalloc.so':
      path = str(dist.locate_file(f))
      return path if os.path.isfile(path) else None
  return None


def loaded_allocator() -> str | None:
  """Path of the mimalloc/tcmalloc/jemalloc library mapped into this process, if any (Linux)."""
  try:
    with open('/proc/self/maps') as f:
      for line in f:
        m = _ALLOCATOR_RE.search(line.rstrip('\n'))
        if m:
          return line.split(None, 5)[-1].strip()
  except OSError:
    pass
  return None


def accelerator_backend(environ: dict[str, str] | None = None) -> str | None:
  """'gpu' or 'tpu' when JAX will run on one here, else None (decided before jax is imported).

  On an accelerator the preload buys nothing: XLA's device memory and pinned host buffers do not go
  through malloc. JAX takes a GPU when a CUDA plugin is installed and the machine has an NVIDIA
  device, a TPU when libtpu is installed and a TPU is attached, unless JAX_PLATFORMS says cpu only.
  """
  environ = os.environ if environ is None else environ
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').lower().split(',') if p.strip()]
  if platforms and platforms[0] == 'cpu':
    return None
  import glob
  gpu = bool(glob.glob('/dev/nvidia[0-9]*'))  # Device nodes first: cheap, and usually absent.
  tpu = bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))
  if not (gpu or tpu):
    return None
  from importlib import metadata
  names = {(d.metadata['Name'] or '').lower().replace('_', '-') for d in metadata.distributions()}
  if gpu and any(re.fullmatch(r'jax-cuda\d+-plugin', n) for n in names):
    return 'gpu'
  if tpu and 'libtpu' in names:
    return 'tpu'
  return None


def preset_of(argv: list[str]) -> str | None:
  """The preset named by a script's `--config PATH:PRESET` (or `--config=PATH:PRESET`), else None."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    else:
      continue
    return value.rpartition(':')[2] if ':' in value else None
  return None


def mimalloc_env(argv: list[str]) -> dict[str, str]:
  """mimalloc's options for a script started with these arguments (see NEVER_PURGE_PRESETS)."""
  env = dict(MIMALLOC_ENV)
  if preset_of(argv) in NEVER_PURGE_PRESETS:
    env[PURGE_VAR] = '-1'
  return env


def _note(msg: str) -> None:
  print(f'note: {msg}; running on the system allocator ({ENV_VAR}=system hides this note)',
        file=sys.stderr)


def preload() -> None:
  """Re-executes this script once with a faster malloc preloaded (see the module docstring).

  Call it at the top of a script, before heavy imports: everything imported before it is imported
  twice. Does nothing when imported from anything but the `__main__` script, off Linux, under
  GPT_JAX_ALLOCATOR=system, or when an allocator is already preloaded.
  """
  caller = sys._getframe(1).f_globals.get('__name__')  # pylint: disable=protected-access
  choice = os.environ.get(ENV_VAR, '')
  if caller != '__main__' or choice == 'system' or not sys.platform.startswith('linux'):
    return
  if choice not in ('', 'mimalloc') and not os.path.isabs(choice):
    sys.exit(f"error: {ENV_VAR}={choice!r}: use 'mimalloc' (the default), 'system', "
             'or the absolute path of a malloc library to preload')
  if loaded_allocator() or accelerator_backend():
    return
  if os.environ.get(_REEXEC_VAR) == str(os.getpid()):
    _note('the dynamic loader did not preload the allocator')
    return
  if not sys.argv or not os.path.isfile(sys.argv[0]):
    return  # `python -c` or a script read from stdin: it cannot be started again.
  if not choice and os.uname().machine not in ('x86_64', 'aarch64'):
    return  # requirements.txt installs the wheel only where it is built.
  lib = choice if os.path.isabs(choice) else library_path()
  if lib is None:
    _note('mimalloc is not installed (pip install -r requirements.txt)')
    return
  env = dict(os.environ)
  env['LD_PRELOAD'] = ':'.join(p for p in (lib, env.get('LD_PRELOAD')) if p)
  # A bare interpreter start tries the preload first: the loader skips a library it cannot open
  # with a message, but a missing dependency of it would stop the script itself.
  import subprocess
  check = subprocess.run([sys.executable, '-I', '-S', '-c', ''], env=env, capture_output=True,
                         text=True, check=False)
  if check.returncode or 'cannot be preloaded' in check.stderr:
    reason = check.stderr.strip().splitlines()[-1:] or [f'status {check.returncode}']
    _note(f'cannot preload {lib} ({reason[0][:200]})')
    return
  if not os.path.isabs(choice):
    env.update({k: v for k, v in mimalloc_env(sys.argv[1:]).items() if k not in env})
  env[_REEXEC_VAR] = str(os.getpid())
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:
    _note(f'cannot re-execute {sys.executable} ({e})')

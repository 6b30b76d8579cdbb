"""Executes the walkthrough notebook top to bottom and writes it with its outputs.

    python scripts/build_notebook.py                  # re-execute; rewrite notebooks/walkthrough.ipynb
    python scripts/build_notebook.py --out FILE.ipynb # re-execute; write FILE instead (the test does)
    python scripts/build_notebook.py --check          # no execution: is the .ipynb in sync with the .py?

The source of truth is notebooks/walkthrough.py (jupytext percent format): it is read with jupytext,
executed with nbclient in a fresh `python3` kernel (this interpreter's ipykernel) started in notebooks/,
and written as .ipynb only if every cell ran; a cell that raises stops the run with exit status 1 and
leaves the committed notebook as it was. Like the training scripts, the kernel runs on mimalloc where
the wheel is installed (gpt_jax/allocator.py); GPT_JAX_ALLOCATOR=system turns that off.
Needs the tooling in requirements-dev.txt (jupytext, nbclient, ipykernel, nbformat).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

from gpt_jax import allocator

NOTEBOOKS = os.path.join(_bootstrap.REPO_ROOT, 'notebooks')
SOURCE = os.path.join(NOTEBOOKS, 'walkthrough.py')
TARGET = os.path.join(NOTEBOOKS, 'walkthrough.ipynb')
CELL_TIMEOUT_S = 900  # Per cell: generous, as the slowest cell (the training run) runs for about a minute.


def _tooling():
  try:
    import jupytext
    import nbclient
    import nbformat
  except ImportError as e:
    sys.exit(f'error: {e.name} is not installed; pip install -r requirements-dev.txt')
  return jupytext, nbclient, nbformat


def cells(nb) -> list[tuple[str, str]]:
  """(cell type, source) of every cell: what must agree between the .py and the .ipynb."""
  return [(c.cell_type, c.source) for c in nb.cells]


def kernel_env() -> dict[str, str]:
  """The kernel's environment: this one, plus mimalloc preloaded as the scripts do (Linux only)."""
  env = dict(os.environ)
  choice = env.get(allocator.ENV_VAR, '')
  if (sys.platform.startswith('linux') and choice in ('', 'mimalloc')
      and os.uname().machine in ('x86_64', 'aarch64') and not allocator.loaded_allocator()):
    lib = allocator.library_path()
    if lib:
      env['LD_PRELOAD'] = ':'.join(p for p in (lib, env.get('LD_PRELOAD')) if p)
      env.update({k: v for k, v in allocator.MIMALLOC_ENV.items() if k not in env})
  return env


def check(source: str = SOURCE, target: str = TARGET) -> str | None:
  """None if `target` has exactly the cells of `source`, else what differs."""
  jupytext, _, nbformat = _tooling()
  if not os.path.exists(target):
    return f'{target} does not exist'
  want, have = cells(jupytext.read(source)), cells(nbformat.read(target, as_version=4))
  if want == have:
    return None
  for i, (w, h) in enumerate(zip(want, have)):
    if w != h:
      return f'cell {i} differs: the .py has {w[1][:80]!r}, the .ipynb {h[1][:80]!r}'
  return f'the .py has {len(want)} cells, the .ipynb {len(have)}'


def build(source: str = SOURCE, out: str = TARGET) -> float:
  """Executes `source` and writes it with its outputs to `out`; returns the seconds it took."""
  jupytext, nbclient, nbformat = _tooling()
  nb = jupytext.read(source)
  t0 = time.time()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': NOTEBOOKS}})
  try:
    client.execute(env=kernel_env())
  except nbclient.exceptions.CellExecutionError as e:
    sys.exit(f'error: the notebook failed; {out} was not written.\n{e}')
  seconds = time.time() - t0
  tmp = f'{out}.tmp'
  nbformat.write(nb, tmp)
  os.replace(tmp, out)  # Never a half-written notebook.
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default=TARGET, help='where to write the executed notebook')
  parser.add_argument('--check', action='store_true',
                      help='only check that the .ipynb has the cells of the .py (no execution)')
  args = parser.parse_args()
  if args.check:
    problem = check()
    if problem:
      sys.exit(f'error: {os.path.relpath(TARGET)} is out of date ({problem}); '
               'run python scripts/build_notebook.py')
    print(f'{os.path.relpath(TARGET)} is in sync with {os.path.relpath(SOURCE)}')
    return
  seconds = build(out=args.out)
  print(f'executed {os.path.relpath(SOURCE)} in {seconds:.0f} s; wrote {args.out}')


if __name__ == '__main__':
  main()

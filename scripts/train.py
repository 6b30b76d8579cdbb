"""Trains a GPT. Intentionally kept short: the loop is gpt_jax/training/loop.py
(its setup in run_setup.py, its evals in evaluator.py).

  python scripts/train.py --config configs/shakespeare.py:cpu
  python scripts/train.py --config configs/shakespeare.py --config.train.max_steps=200
  python scripts/train.py --config configs/shakespeare.py:cpu --config.train.resume=True
"""
import os

from absl import app

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

_CONFIG = cli.define_config_file(
    'config', os.path.join(_bootstrap.REPO_ROOT, 'configs', 'shakespeare.py'),
    'Run config: a configs/*.py file, optionally with :preset (e.g. configs/shakespeare.py:cpu).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax.training import loop as loop_lib  # Imported after flag parsing so --help is instant.
  cli.run_main(lambda: loop_lib.train_and_evaluate(_CONFIG.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

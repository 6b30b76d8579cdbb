"""Shared plumbing for the thin entry points in scripts/: quiet library logs, clean error exits."""

from __future__ import annotations

import logging
from typing import Callable

from absl import logging as absl_logging

from gpt_jax.errors import exit_on_user_error


def quiet_library_logs() -> None:
  """absl's app.run logs at INFO; Orbax then narrates every file it writes. Keep warnings only."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ('orbax', 'absl', 'jax._src.xla_bridge'):
    logging.getLogger(name).setLevel(logging.WARNING)


def run_main(fn: Callable[[], object]) -> None:
  """Runs `fn` with quiet logs; a UserError becomes one line on stderr and exit status 1."""
  quiet_library_logs()
  with exit_on_user_error():
    fn()

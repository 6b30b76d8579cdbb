"""One exception type for mistakes a user can fix.

Library code raises `UserError` with a message that says what went wrong *and what to do*; the thin
entry points in `scripts/` catch it and print just that message (no traceback) before exiting with
status 1. Programming errors stay ordinary exceptions, so genuine bugs still show their traceback.
`Stopped` (a run stopped on SIGTERM/SIGINT after saving a checkpoint, gpt_jax/training/preemption.py) prints
its one line and exits with its own status, 75.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
  """A problem with the user's input (paths, configs, checkpoints, text), with a fix in the message."""


class Stopped(Exception):
  """Training stopped on a signal after saving checkpoint `step`; the message names the resume command."""

  exit_status = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run it again (resume) later.

  def __init__(self, message: str, step: int, signal_name: str):
    super().__init__(message)
    self.step = step
    self.signal_name = signal_name


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """Turns a `UserError` into `error: <message>` on stderr and exit status 1."""
  try:
    yield
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except Stopped as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)

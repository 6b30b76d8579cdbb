"""One exception type for mistakes a user can fix.

Library code raises `UserError` with a message that says what went wrong *and what to do*; the thin
entry points in `scripts/` catch it and print just that message (no traceback) before exiting with
status 1. Programming errors stay ordinary exceptions, so genuine bugs still show their traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
  """A problem with the user's input (paths, configs, checkpoints, text), with a fix in the message."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
  """Turns a `UserError` into `error: <message>` on stderr and exit status 1."""
  try:
    yield
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)

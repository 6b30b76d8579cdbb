"""The suite's skip policy: with requirements-dev.txt installed nothing skips.

A quiet skip can hide a broken implementation behind a green run (a missing data file once skipped
every tiktoken equality check). So any skip, from `pytest.skip` or `importorskip`, fails the session.
The one exception is the GPU tier (`@pytest.mark.gpu`): the default run deselects it (conftest.py), and
under `pytest -m gpu` on a machine without a GPU its tests skip with a reason that says why. A skip
during collection (a module-level `importorskip`) skips a whole file and has no test to carry a mark,
so it always fails the session: a GPU-only module skips inside its tests instead.
conftest.py installs these hooks.
"""

from __future__ import annotations

import pytest

_unexpected: list[str] = []


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
  return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
  if report.skipped and 'gpu' not in report.keywords and not hasattr(report, 'wasxfail'):
    _unexpected.append(f'{report.nodeid}: {_reason(report)}')


def pytest_collectreport(report: pytest.CollectReport) -> None:
  """A file skipped while it is collected (under xdist the controller gets the workers' reports)."""
  if report.skipped:
    _unexpected.append(f'{report.nodeid} (the whole file, at collection): {_reason(report)}')


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
  if _unexpected:
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    lines = ['', f'{len(_unexpected)} test(s) or file(s) skipped; only @pytest.mark.gpu tests may skip '
             '(install requirements-dev.txt):', *(f'  {u}' for u in _unexpected)]
    if reporter is not None:
      for line in lines:
        reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

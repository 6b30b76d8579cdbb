"""The skip policy itself: a quiet skip fails the run; a GPU-only skip does not."""

import pathlib
import textwrap

import pytest

TESTS = pathlib.Path(__file__).resolve().parent

SKIPPING = textwrap.dedent('''
    import pytest

    def test_passes():
        assert True

    def test_needs_a_missing_module():
        pytest.importorskip('no_such_module_anywhere')

    @pytest.mark.gpu
    def test_gpu_only():
        pytest.skip('needs a GPU')
''')


def _run(pytester, monkeypatch, body, *args):
  """A separate pytest process (the policy's record of skips is per process)."""
  monkeypatch.setenv('PYTHONPATH', str(TESTS))
  pytester.makeconftest('from skip_policy import pytest_runtest_logreport, pytest_sessionfinish\n')
  pytester.makeini('[pytest]\nmarkers =\n  gpu: needs a GPU\n')
  pytester.makepyfile(body)
  return pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider', *args)


@pytest.mark.slow
@pytest.mark.parametrize('workers', [(), ('-n', '2')], ids=['serial', 'xdist'])
def test_a_quiet_skip_fails_the_session(pytester, monkeypatch, workers):
  # CI runs the suite on pytest-xdist workers, whose skips reach the controlling process as reports.
  result = _run(pytester, monkeypatch, SKIPPING, *workers)
  assert result.ret == 1
  result.stdout.fnmatch_lines(['*1 test(s) skipped; only @pytest.mark.gpu tests may skip*',
                               '*test_needs_a_missing_module*no_such_module_anywhere*'])


@pytest.mark.slow
def test_gpu_only_skips_are_allowed(pytester, monkeypatch):
  result = _run(pytester, monkeypatch,
                SKIPPING.replace("pytest.importorskip('no_such_module_anywhere')", 'pass'))
  assert result.ret == 0
  result.assert_outcomes(passed=2, skipped=1)

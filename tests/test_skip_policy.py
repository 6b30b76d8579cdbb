"""The skip policy itself: a quiet skip fails the run; the GPU tier is deselected by default and may
skip when it is selected."""

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


SKIPPED_FILE = textwrap.dedent('''
    import pytest

    pytest.importorskip('no_such_module_anywhere')

    def test_never_collected():
        assert True
''')


def _run(pytester, monkeypatch, files, *args):
  """A separate pytest process (the policy's record of skips is per process), with the suite's own
  tests/conftest.py loaded as a plugin: the policy under test is the one that conftest installs."""
  monkeypatch.setenv('PYTHONPATH', str(TESTS))
  pytester.makeini('[pytest]\nmarkers =\n  gpu: needs a GPU\n')
  pytester.makepyfile(**files)
  return pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider', '-p', 'conftest', *args)


@pytest.mark.slow
@pytest.mark.parametrize('workers', [(), ('-n', '2')], ids=['serial', 'xdist'])
def test_a_quiet_skip_fails_the_session(pytester, monkeypatch, workers):
  # CI runs the suite on pytest-xdist workers, whose skips reach the controlling process as reports.
  result = _run(pytester, monkeypatch, {'test_skipping': SKIPPING}, *workers)
  assert result.ret == 1
  result.stdout.fnmatch_lines(['*1 test(s) or file(s) skipped; only @pytest.mark.gpu tests may skip*',
                               '*test_needs_a_missing_module*no_such_module_anywhere*'])


@pytest.mark.slow
@pytest.mark.parametrize('workers', [(), ('-n', '2')], ids=['serial', 'xdist'])
def test_a_file_skipped_at_collection_fails_the_session(pytester, monkeypatch, workers):
  # A module-level importorskip skips during collection: a collect report, not a test report.
  result = _run(pytester, monkeypatch, {'test_skipped_file': SKIPPED_FILE,
                                        'test_fine': 'def test_passes():\n  assert True\n'}, *workers)
  assert result.ret == 1
  result.stdout.fnmatch_lines(['*1 test(s) or file(s) skipped; only @pytest.mark.gpu tests may skip*',
                               '*test_skipped_file.py (the whole file, at collection)*'
                               'no_such_module_anywhere*'])


@pytest.mark.slow
def test_the_gpu_tier_is_deselected_by_default_and_may_skip_when_selected(pytester, monkeypatch):
  files = {'test_skipping': SKIPPING.replace("pytest.importorskip('no_such_module_anywhere')", 'pass')}
  # The default run (the README's command): the GPU test is not run at all, so nothing skips.
  result = _run(pytester, monkeypatch, files)
  assert result.ret == 0
  result.assert_outcomes(passed=2, deselected=1)
  # `pytest -m gpu` on a machine without one: its skip, with its reason, is allowed.
  result = _run(pytester, monkeypatch, files, '-m', 'gpu')
  assert result.ret == 0
  result.assert_outcomes(skipped=1, deselected=2)

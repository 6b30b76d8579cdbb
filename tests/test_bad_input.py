"""Bad input, table-driven: every case ends in one `error: ...` line on stderr and a non-zero exit, with no
traceback and no byte of the user's files changed.

Two kinds of cases: `lib` cases call what a script calls, in this process, through `cli.run_main` (the
scripts' own wrapper), with OS faults (a read-only or full disk, no permission) simulated by making the
OS calls for one folder fail with that errno (the tests run as root, who ignores file permissions);
`script` cases run a script as a user would, all of them at once in parallel subprocesses.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Callable

import pytest

from gpt_jax import cli, files
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError

from conftest import make_synthetic_text

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_RUN = REPO / 'tests' / 'fixtures' / 'checkpoints_v1' / 'optax'  # A tiny char-level run.
CONFIG = str(REPO / 'configs' / 'shakespeare.py') + ':tiny'


# --- the user's world: files whose bytes must survive every refusal ------------------------------------

def _tree(root: pathlib.Path) -> dict[str, str]:
  """SHA-256 of every file under root, keyed by relative path."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _world(tmp: pathlib.Path) -> pathlib.Path:
  """A user's folder: a text, a prepared data folder, a run, a folder of their own, odd files."""
  (tmp / 'my.txt').write_text(make_synthetic_text(3000), encoding='utf-8')
  (tmp / 'other.txt').write_text(make_synthetic_text(3000, seed=1), encoding='utf-8')
  (tmp / 'no_newline.txt').write_text('abcdefgh ' * 400, encoding='utf-8')
  (tmp / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me\n'.encode('latin-1') * 50)
  (tmp / 'a_file').write_text('not a folder\n')
  (tmp / 'my_folder').mkdir()
  (tmp / 'my_folder' / 'config.json').write_text('{"mine": 1}\n')
  (tmp / 'notes').mkdir()
  (tmp / 'notes' / 'todo.txt').write_text('buy milk\n')
  shutil.copytree(FIXTURE_RUN, tmp / 'run')
  return tmp


def _data_cfg(tmp: pathlib.Path, **kw):
  from configs import shakespeare
  c = shakespeare.get_config('tiny').data
  c.update(text_path=str(tmp / 'my.txt'), data_dir=str(tmp / 'my_data'), cache_dir=str(tmp / 'cache'))
  c.update(**kw)
  return c


def _run_config(tmp: pathlib.Path, **kw):
  from configs import shakespeare
  c = shakespeare.get_config('tiny')
  c.out_dir = str(tmp / 'out')
  c.data.update(text_path=str(tmp / 'my.txt'), data_dir=str(tmp / 'my_data'),
                cache_dir=str(tmp / 'cache'))
  c.train.max_steps = 2
  for k, v in kw.items():
    section, _, field = k.rpartition('.')
    (c if not section else c[section])[field] = v
  return c


# --- simulated OS faults ----------------------------------------------------------------------------

@contextlib.contextmanager
def failing(root: pathlib.Path, err: int, reads: bool = False):
  """OS calls that write under `root` (with `reads`: also those that read) fail with `err`."""
  root_s = os.path.abspath(root)

  def under(p) -> bool:
    try:
      p = os.path.abspath(os.fspath(p))
    except TypeError:
      return False
    return p == root_s or p.startswith(root_s + os.sep)

  def fail(p):
    raise OSError(err, os.strerror(err), os.fspath(p))

  real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

  def fake_open(file, mode='r', *a, **k):
    if not isinstance(file, int) and under(file) and (reads or set(mode) & set('wax+')):
      fail(file)
    return real_open(file, mode, *a, **k)

  def fake_os_open(path, flags, *a, **k):
    if under(path) and (reads or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
      fail(path)
    return real_os_open(path, flags, *a, **k)

  def fake_mkdir(path, *a, **k):
    if under(path):
      fail(path)
    return real_mkdir(path, *a, **k)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builtins, 'open', fake_open)
    mp.setattr(os, 'open', fake_os_open)
    mp.setattr(os, 'mkdir', fake_mkdir)
    yield


@contextlib.contextmanager
def full_disk_after(n_bytes: int):
  """Files opened with os.fdopen (gpt_jax/files.py's writes) fail with ENOSPC past n_bytes."""
  real_fdopen = os.fdopen

  class Full:
    def __init__(self, f):
      self.f, self.n = f, 0

    def write(self, b):
      self.n += len(b)
      if self.n > n_bytes:
        self.f.write(bytes(b)[:max(0, n_bytes - self.n + len(b))])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self.f.write(b)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(os, 'fdopen', lambda *a, **k: Full(real_fdopen(*a, **k)))
    yield


# --- in-process cases ---------------------------------------------------------------------------------

def _prepare(tmp, **kw):
  return lambda: text_lib.prepare(_data_cfg(tmp, **kw), verbose=False)


def _train(tmp, **kw):
  from gpt_jax.training import loop
  return lambda: loop.train_and_evaluate(_run_config(tmp, **kw))


def _prepared_then(tmp, edit: Callable[[pathlib.Path], None], then: Callable[[], object]):
  """Prepares my.txt into my_data (part of the user's world), applies `edit`, then runs `then`."""
  text_lib.prepare(_data_cfg(tmp), verbose=False)
  edit(tmp)
  return then


def _edit_meta(**changes):
  def edit(tmp):
    path = tmp / 'my_data' / 'meta.json'
    meta = json.loads(path.read_text())
    for k, v in changes.items():
      if v is None:
        meta.pop(k)
      else:
        meta[k] = v
    path.write_text(json.dumps(meta))
  return edit


def _in(ctx_factory, fn):
  def run():
    with ctx_factory():
      fn()
  return run


def _shards(tmp, **kw):
  from gpt_jax.data import shards
  kw.setdefault('shards_dir', str(tmp / 'shards'))
  return lambda: shards.prepare(_data_cfg(tmp, **kw), force=False)


def _evaluate_output(tmp, output):
  """What scripts/evaluate.py checks before any work."""
  return lambda: files.check_writable(str(output), 'the results (--output)')


def _export(tmp, hf_dir):
  from gpt_jax import hf
  return lambda: hf.export_checkpoint(str(tmp / 'run'), str(hf_dir))


def _plot(tmp, out, run='run'):
  from gpt_jax.lab import plots
  return lambda: plots.overview([plots.read_run(str(tmp / run))], str(out))


def _metrics_line(line):
  def edit(tmp):
    with (tmp / 'run' / 'metrics.jsonl').open('a') as f:
      f.write(line + '\n')
  return edit


def _sample(tmp, **kw):
  from gpt_jax import sample_run
  return lambda: sample_run.sample_from_checkpoint(str(tmp / 'run'), max_new_tokens=4, **kw)


def _encode_eval_prompt(tmp):
  from gpt_jax import sample_run
  from gpt_jax.data import tokenizer
  tok = tokenizer.CharTokenizer.from_text((tmp / 'no_newline.txt').read_text())
  return lambda: sample_run.encode_prompt(tok, '\n', '--config.sample.prompt')


def _lock(tmp, err):
  from gpt_jax.training import runlock

  def run():
    with failing(tmp / 'run', err):
      runlock.acquire(str(tmp / 'run'))
  return run


# (id, builds the call from the world's folder, words the message must hold)
LIB_CASES = [
    # A user's folder is never a run's out_dir.
    ('out_dir_user_config', lambda t: _train(t, out_dir=str(t / 'my_folder')), 'not a gpt_jax run'),
    ('out_dir_user_notes', lambda t: _train(t, out_dir=str(t / 'notes')), 'not a gpt_jax run'),
    ('out_dir_empty_string', lambda t: _train(t, out_dir=''), 'out_dir is empty'),
    ('out_dir_is_a_file', lambda t: _train(t, out_dir=str(t / 'a_file')), 'is a file'),
    ('out_dir_current_folder', lambda t: _train(t, out_dir=str(t)), 'not a gpt_jax run'),
    ('out_dir_under_a_file', lambda t: _train(t, out_dir=str(t / 'a_file' / 'out')), 'a_file'),
    # Calls of 4 steps: evals and logs between calls only, at multiples of 4.
    ('steps_per_call_not_dividing_the_intervals',
     lambda t: _train(t, **{'train.steps_per_call': 4, 'train.eval_interval': 10}),
     'train.eval_interval (10), train.log_interval (10) must be multiples of 4'),
    ('out_dir_read_only', lambda t: _in(lambda: failing(t / 'ro', errno.EROFS),
                                        _train(t, out_dir=str(t / 'ro' / 'out'))), 'read-only'),
    # A prepared corpus is never replaced by another text.
    ('data_of_another_text', lambda t: _prepared_then(t, lambda t: None,
                                                      _prepare(t, text_path=str(t / 'other.txt'))),
     'prepared from'),
    ('data_source_gone_and_damaged', lambda t: _prepared_then(
        t, lambda t: (_edit_meta(train_tokens=None)(t), (t / 'my.txt').rename(t / 'moved.txt')),
        _prepare(t, text_path='')), 'no longer exists'),
    # Files and folders of the data.
    ('data_dir_is_a_file', lambda t: _prepare(t, data_dir=str(t / 'a_file')), 'is a file'),
    ('data_dir_under_a_file', lambda t: _prepare(t, data_dir=str(t / 'a_file' / 'd')), 'a_file'),
    ('data_dir_read_only', lambda t: _in(lambda: failing(t / 'ro', errno.EROFS),
                                         _prepare(t, data_dir=str(t / 'ro' / 'd'))), 'read-only'),
    ('data_dir_no_permission', lambda t: _in(lambda: failing(t / 'ro', errno.EACCES),
                                             _prepare(t, data_dir=str(t / 'ro' / 'd'))), 'permission'),
    ('data_dir_full_disk', lambda t: _in(lambda: full_disk_after(100), _prepare(t)), 'disk is full'),
    ('data_dir_quota', lambda t: _in(lambda: failing(t / 'q', errno.EDQUOT),
                                     _prepare(t, data_dir=str(t / 'q'))), 'quota'),
    ('text_not_utf8', lambda t: _prepare(t, text_path=str(t / 'latin1.txt')), 'UTF-8'),
    ('text_unreadable', lambda t: _in(lambda: failing(t / 'my.txt', errno.EACCES, reads=True),
                                      _prepare(t)), 'permission'),
    ('text_folder_without_txt', lambda t: _prepare(t, text_path=str(t / 'my_folder')),
     'no .txt files'),
    ('train_meta_missing_key', lambda t: _prepared_then(
        t, lambda t: (_edit_meta(val_tokens=None)(t), (t / 'my.txt').unlink()),
        _train(t, **{'data.text_path': ''})), "no 'val_tokens'"),
    ('train_meta_bad_dtype', lambda t: _prepared_then(
        t, lambda t: (_edit_meta(dtype='float7')(t), (t / 'my.txt').unlink()),
        _train(t, **{'data.text_path': ''})), 'dtype'),
    ('shards_dir_is_a_file', lambda t: _in(lambda: contextlib.nullcontext(),
                                           _shards(t, shards_dir=str(t / 'a_file'))), 'a_file'),
    ('shards_dir_read_only', lambda t: _in(lambda: failing(t / 'shards', errno.EROFS), _shards(t)),
     'read-only'),
    # The eval sample's prompt is the prompt's problem, not the text's.
    ('eval_prompt_not_in_vocab', _encode_eval_prompt, 'sample.prompt'),
    # Run folders, results and pictures.
    ('resume_read_only_out_dir', lambda t: _lock(t, errno.EROFS), 'train.lock'),
    ('evaluate_output_is_folder', lambda t: _evaluate_output(t, t / 'notes'), 'is a folder'),
    ('evaluate_output_read_only', lambda t: _in(lambda: failing(t / 'notes', errno.EROFS),
                                                _evaluate_output(t, t / 'notes' / 'e.json')), 'read-only'),
    ('export_read_only', lambda t: _in(lambda: failing(t / 'hf', errno.EROFS), _export(t, t / 'hf')),
     'read-only'),
    ('export_under_a_file', lambda t: _export(t, t / 'a_file' / 'hf'), 'a_file'),
    ('plot_read_only_run', lambda t: _in(lambda: failing(t / 'run', errno.EROFS),
                                         _plot(t, t / 'run' / 'plots.png')), 'read-only'),
    ('plot_step_not_a_number', lambda t: _prepared_then(t, _metrics_line('{"step": "abc", "loss": 1}'),
                                                        _plot(t, t / 'p.png')), 'not a number'),
    ('plot_out_txt', lambda t: _plot(t, t / 'x.txt'), 'not an image format'),
    ('plot_not_a_run', lambda t: _plot(t, t / 'p.png', run='notes'), 'no metrics.jsonl'),
    ('sample_prompt_file_not_utf8', lambda t: _sample(t, prompt_file=str(t / 'latin1.txt')), 'UTF-8'),
    ('sample_prompt_file_folder', lambda t: _sample(t, prompt_file=str(t / 'notes')), 'is a folder'),
    ('sample_prompt_not_in_vocab', lambda t: _sample(t, prompt='€uro'), "'€'"),
]


def _call(fn: Callable[[], object], capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `fn` run as a script runs it."""
  hook = sys.unraisablehook
  capsys.readouterr()
  try:
    with pytest.raises(SystemExit) as e:
      cli.run_main(fn)
  finally:
    sys.unraisablehook = hook
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def _assert_one_clean_line(code, stdout, stderr, words):
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith(('WARNING:', 'W0', 'I0'))]
  assert code not in (0, None), (code, stderr)
  assert 'Traceback' not in stdout + stderr, stderr
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  assert words in lines[0], lines[0]


@pytest.mark.parametrize('name,build,words', LIB_CASES, ids=[c[0] for c in LIB_CASES])
def test_bad_input_in_process(name, build, words, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  world = _world(tmp_path)
  fn = build(world)  # Builds the user's world further where a case needs it (e.g. prepared data).
  before = _tree(world)
  code, out, err = _call(fn, capsys)
  _assert_one_clean_line(code, out, err, words)
  assert _tree(world) == before, 'a user file changed, or a file was left behind'


# --- script cases ----------------------------------------------------------------------------------

def _script_world(root: pathlib.Path) -> pathlib.Path:
  w = _world(root)
  (w / 'syntax.py').write_text('def get_config(:\n')
  (w / 'raises.py').write_text('def get_config():\n  raise ValueError("boom")\n')
  (w / 'returns_int.py').write_text('def get_config():\n  return 3\n')
  (w / 'cfgdir').mkdir()
  (w / 'hf_bad').mkdir()
  (w / 'hf_bad' / 'config.json').write_text('{"n_layer": "abc", "n_head": 2, "n_embd": 8}')
  (w / 'bad_meta').mkdir()
  (w / 'bad_meta' / 'meta.json').write_text('{"version": 2}')
  return w


def _s(w):
  """Common argument pieces of the script cases."""
  return {'T': ['--config', CONFIG, '--config.train.max_steps=2', f'--config.data.data_dir={w}/my_data',
                f'--config.data.text_path={w}/my.txt', f'--config.data.cache_dir={w}/cache']}


SCRIPT_CASES = [
    ('train_out_dir_user_folder', 'train.py', lambda w: [*_s(w)['T'], f'--config.out_dir={w}/my_folder'],
     'not a gpt_jax run'),
    ('train_out_dir_empty', 'train.py', lambda w: [*_s(w)['T'], '--config.out_dir='], 'out_dir is empty'),
    ('train_config_folder', 'train.py', lambda w: ['--config', f'{w}/cfgdir'], 'is a folder'),
    ('train_config_syntax_error', 'train.py', lambda w: ['--config', f'{w}/syntax.py'], 'syntax error'),
    ('train_config_raises', 'train.py', lambda w: ['--config', f'{w}/raises.py'], 'boom'),
    ('train_config_returns_int', 'train.py', lambda w: ['--config', f'{w}/returns_int.py'],
     'not an ml_collections.ConfigDict'),
    ('train_config_returns_int_with_override', 'train.py',
     lambda w: ['--config', f'{w}/returns_int.py', '--config.train.max_steps=3'], 'ConfigDict'),
    ('train_config_missing', 'train.py', lambda w: ['--config', f'{w}/nope.py'], 'No such file'),
    ('train_override_typo_default_config', 'train.py', lambda w: ['--config.train.max_stepz=1'],
     "no config field 'max_stepz'"),
    ('prepare_data_dir_is_a_file', 'prepare_data.py',
     lambda w: ['--config', CONFIG, f'--config.data.text_path={w}/my.txt', f'--config.data.data_dir={w}/a_file'],
     'is a file'),
    ('prepare_text_not_utf8', 'prepare_data.py',
     lambda w: ['--config', CONFIG, f'--config.data.text_path={w}/latin1.txt',
                f'--config.data.data_dir={w}/d'], 'UTF-8'),
    ('inspect_batch_size_negative', 'inspect_model.py', lambda w: ['--config', CONFIG, '--batch_size', '-2'],
     '--batch_size must be >= 1'),
    ('inspect_meta_without_vocab', 'inspect_model.py',
     lambda w: ['--config', CONFIG, f'--config.data.data_dir={w}/bad_meta'], "no 'vocab_size'"),
    ('plot_dpi_zero', 'plot.py', lambda w: [f'{w}/run', '--dpi', '0', f'--out={w}/p.png'], '--dpi'),
    ('plot_out_txt', 'plot.py', lambda w: [f'{w}/run', f'--out={w}/x.txt'], 'not an image format'),
    ('plot_out_under_a_file', 'plot.py', lambda w: [f'{w}/run', f'--out={w}/a_file/p.png'], 'a_file'),
    ('evaluate_output_folder', 'evaluate.py', lambda w: [f'--ckpt_dir={w}/run', f'--output={w}/notes'],
     'is a folder'),
    ('evaluate_meta_missing_keys', 'evaluate.py',
     lambda w: [f'--ckpt_dir={w}/run', f'--data_dir={w}/bad_meta', '--output='], 'meta.json'),
    ('convert_import_n_layer_abc', 'convert_hf.py', lambda w: [f'--hf_dir={w}/hf_bad', f'--out_dir={w}/gpt2'],
     "n_layer is 'abc'"),
    ('convert_export_hf_dir_is_a_file', 'convert_hf.py',
     lambda w: ['--direction=export', f'--ckpt_dir={w}/run', f'--hf_dir={w}/a_file'], 'a_file'),
    ('convert_import_into_user_folder', 'convert_hf.py',
     lambda w: [f'--hf_dir={w}/hf_bad', f'--out_dir={w}/notes'], 'not a gpt_jax run'),
    ('sample_prompt_file_not_utf8', 'sample.py', lambda w: [f'--ckpt_dir={w}/run',
                                                            f'--prompt_file={w}/latin1.txt'], 'UTF-8'),
]


@pytest.fixture(scope='module')
def script_results(tmp_path_factory):
  """Every script case, run at once in parallel subprocesses: {name: (status, stdout, stderr, before, after)}."""
  worlds = {}
  for name, *_ in SCRIPT_CASES:
    worlds[name] = _script_world(tmp_path_factory.mktemp(name))
  before = {n: _tree(w) for n, w in worlds.items()}
  env = dict(os.environ, PYTHONUNBUFFERED='1', GPT_JAX_COMPILATION_CACHE='off')

  def run(case):
    name, script, args, _ = case
    w = worlds[name]
    r = subprocess.run([sys.executable, str(REPO / 'scripts' / script), *args(w)], cwd=w,
                       capture_output=True, text=True, timeout=600, env=env)
    return name, r

  with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
    done = dict(pool.map(run, SCRIPT_CASES))
  return {n: (r.returncode, r.stdout, r.stderr, before[n], _tree(worlds[n])) for n, r in done.items()}


# Slow tier: 22 Python processes, each importing JAX; the in-process cases above (quick tier) reach the
# same refusals through cli.run_main, as the scripts do.
@pytest.mark.slow
@pytest.mark.parametrize('name,words', [(c[0], c[3]) for c in SCRIPT_CASES],
                         ids=[c[0] for c in SCRIPT_CASES])
def test_bad_input_in_scripts(name, words, script_results):
  code, out, err, before, after = script_results[name]
  _assert_one_clean_line(code, out, err, words)
  assert after == before, 'a user file changed, or a file was left behind'


# --- what must work (the other side of the refusals) ------------------------------------------------

def test_a_run_naming_no_text_uses_the_text_prepared_in_data_dir(tmp_path):
  w = _world(tmp_path)
  mine = text_lib.prepare(_data_cfg(w), verbose=False)
  again = text_lib.prepare(_data_cfg(w, text_path=''), verbose=False)  # Not TinyShakespeare.
  assert again['source_sha256'] == mine['source_sha256'] == text_lib.sha256_file(str(w / 'my.txt'))
  (w / 'my.txt').unlink()  # Gone, but the prepared files are intact: still used.
  assert text_lib.prepare(_data_cfg(w, text_path=''), verbose=False)['source_sha256'] == mine['source_sha256']


def test_a_full_disk_leaves_no_partial_file_and_two_writers_never_share_a_temporary_file(tmp_path):
  target = tmp_path / 'train.bin'
  target.write_bytes(b'old')
  with full_disk_after(10), pytest.raises(UserError, match='disk is full'):
    files.write_bytes(str(target), b'x' * 100)
  assert [p.name for p in tmp_path.iterdir()] == ['train.bin'] and target.read_bytes() == b'old'
  names = set()
  real = os.replace
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(os, 'replace', lambda a, b: (names.add(a), real(a, b)))
    files.write_bytes(str(target), b'1')
    files.write_bytes(str(target), b'2')
  assert len(names) == 2 and target.read_bytes() == b'2'


def test_a_run_refused_before_it_wrote_anything_leaves_no_out_dir(tmp_path, capsys):
  w = _world(tmp_path)
  code, _, err = _call(_train(w, out_dir=str(w / 'new_out'), **{'data.text_path': str(w / 'latin1.txt')}),
                       capsys)
  assert code == 1 and 'UTF-8' in err and not (w / 'new_out').exists()


def test_plot_reports_the_file_it_wrote(tmp_path, capsys):
  from gpt_jax.lab import plots
  w = _world(tmp_path)
  out = plots.overview([plots.read_run(str(w / 'run'))], str(w / 'pics' / 'x'), ['loss'], 30)
  assert out == str(w / 'pics' / 'x.png') and os.path.isfile(out)


# --- Ctrl-C during sampling; a text without a newline ---------------------------------------------------

@pytest.mark.slow  # Compiles the chunked generation loop for two runs.
def test_generation_stops_between_chunks_with_the_tokens_so_far(monkeypatch):
  """A stop request ends generation after the chunk in flight; the tokens made are those of a full run."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from gpt_jax import sampling
  from gpt_jax.config import ModelConfig
  from gpt_jax.model import GPT
  cfg = ModelConfig(vocab_size=17, block_size=8, n_layer=1, n_head=1, n_embd=8)
  params = jax.jit(GPT(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  monkeypatch.setattr(sampling, 'CHUNK', 5)
  prompt, key = np.array([[1, 2, 3]]), jax.random.PRNGKey(1)
  full = np.asarray(sampling.generate(params, cfg, prompt, 40, key, 0.8, 5, 2))
  asked = []
  part = np.asarray(sampling.generate(params, cfg, prompt, 40, key, 0.8, 5, 2,
                                      stop=lambda: asked.append(1) or len(asked) > 3))
  assert 3 < part.shape[1] < full.shape[1] and (part == full[:, :part.shape[1]]).all()


@pytest.mark.slow
def test_ctrl_c_stops_sampling_and_prints_the_text_so_far(tmp_path):
  import signal
  import time
  shutil.copytree(FIXTURE_RUN, tmp_path / 'run')
  p = subprocess.Popen([sys.executable, str(REPO / 'scripts' / 'sample.py'), f'--ckpt_dir={tmp_path / "run"}',
                        '--max_new_tokens=4000000'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  assert p.stdout.readline().startswith('checkpoint step')  # Loaded; generation starts.
  time.sleep(3)
  p.send_signal(signal.SIGINT)
  t0 = time.monotonic()
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130 and 'Traceback' not in err and err.strip() == 'interrupted', err
  assert '---------- sample 1/1 ----------' in out and len(out) < 4_000_000
  assert time.monotonic() - t0 < 60  # Seconds on an idle machine: the chunk in flight, or a compile.


@pytest.mark.slow
def test_a_text_without_a_newline_trains(tmp_path):
  """The eval sample's default prompt is '\\n': without a sample none is encoded; with one, the message
  names the prompt."""
  from gpt_jax.training import loop
  w = _world(tmp_path)
  config = _run_config(w, **{'data.text_path': str(w / 'no_newline.txt'), 'sample.eval_tokens': 0,
                             'train.eval_interval': 1})
  assert loop.train_and_evaluate(config)['final_step'] == 2

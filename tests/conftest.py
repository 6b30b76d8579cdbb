"""Shared fixtures: the data shipped in gpt_jax/data/assets, small synthetic text, tiny configs."""

import atexit
import os
import pathlib
import random
import shutil
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Many tests compile the same tiny train and eval steps, in this process, in the xdist workers and in
# the scripts they run as subprocesses. JAX's persistent compilation cache lets all but the first reuse
# the executable (it halves tests/training/test_training.py). The cache is a fresh directory made by
# the first pytest process, inherited by the workers and subprocesses, and removed at its exit: every
# run starts cold and nothing leaks into the user's own cache. A size limit turns on the cache's file
# lock, which makes concurrent writers and readers (workers, multi-process tests) safe.
COMPILATION_CACHE_ENV = ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE',
                         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='gpt_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ.update(zip(COMPILATION_CACHE_ENV, (_cache_dir, str(4 << 30), '0', '0')))


def gpu_tier(markexpr: str) -> bool:
  """True for the opt-in GPU tier (`pytest -m gpu`, or an expression selecting gpu, not `not gpu`)."""
  return 'gpu' in markexpr and 'not gpu' not in markexpr


def pytest_configure(config: pytest.Config) -> None:
  """The default run pins JAX to the CPU, where every float32 tolerance, golden loss and parity test
  was set: on a GPU, float32 matmuls would run as tf32. The GPU tier (`pytest -m gpu`) keeps the GPU
  and asks for full float32 matmuls. Both make XLA allocate GPU memory as needed instead of 75% per
  process up front, so xdist workers and the scripts' subprocesses can share one GPU.
  Environment variables reach workers and subprocesses; jax.config covers a jax imported already."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if gpu_tier(config.option.markexpr or ''):
    os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
    settings = {'jax_default_matmul_precision': os.environ['JAX_DEFAULT_MATMUL_PRECISION']}
  else:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    settings = {'jax_platforms': 'cpu'}
  if 'jax' in sys.modules:
    for name, value in settings.items():
      sys.modules['jax'].config.update(name, value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """The default run leaves the GPU tier out: deselected, not skipped, so a CPU run reports 0 skipped
  and any skip at all is a finding (tests/skip_policy.py). `pytest -m gpu` selects it."""
  if gpu_tier(config.option.markexpr or ''):
    return
  gpu = [item for item in items if item.get_closest_marker('gpu') is not None]
  if gpu:
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if item.get_closest_marker('gpu') is None]


from configs import shakespeare  # noqa: E402
from gpt_jax.data import text as text_lib  # noqa: E402

from skip_policy import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish  # noqa: E402,F401


def load_script(name: str):
  """scripts/NAME.py as a module (scripts are not a package); importing one runs nothing."""
  import importlib.util
  scripts = REPO / 'scripts'
  if str(scripts) not in sys.path:
    sys.path.insert(0, str(scripts))  # For the scripts' `import _bootstrap`.
  spec = importlib.util.spec_from_file_location(name, scripts / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shipped_file(*parts: str) -> pathlib.Path:
  """A data file shipped in gpt_jax/data/assets (TinyShakespeare, GPT-2's BPE files): always there."""
  path = text_lib.ASSETS_DIR.joinpath(*parts)
  assert path.is_file(), f'{path} is missing: the package ships it (see gpt_jax/data/assets/README.md)'
  return path


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
  return shipped_file('tinyshakespeare.txt')


def make_synthetic_text(n_chars: int = 30_000, seed: int = 0) -> str:
  """Pseudo-English with structure a tiny model can learn quickly (and a fixed character set)."""
  rng = random.Random(seed)
  words = ['the', 'king', 'and', 'queen', 'of', 'rome', 'speak', 'thou', 'art', 'my', 'lord',
           'what', 'say', 'you', 'good', 'night', 'sweet', 'prince']
  lines = []
  while sum(len(l) + 1 for l in lines) < n_chars:
    name = rng.choice(['ROMEO', 'JULIET', 'HAMLET'])
    lines.append(f'{name}:\n' + ' '.join(rng.choice(words) for _ in range(rng.randint(3, 9))) + '.\n')
  return '\n'.join(lines)[:n_chars]


@pytest.fixture
def synthetic_text_path(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / 'input.txt'
  path.write_text(make_synthetic_text(), encoding='utf-8')
  return path


@pytest.fixture
def tiny_config(tmp_path: pathlib.Path, synthetic_text_path: pathlib.Path):
  """The `tiny` preset pointed at synthetic text and a temporary out_dir / data_dir."""
  c = shakespeare.get_config('tiny')
  c.out_dir = str(tmp_path / 'out')
  c.data.text_path = str(synthetic_text_path)
  c.data.data_dir = str(tmp_path / 'data')
  c.data.cache_dir = str(tmp_path / 'cache')
  c.train.peak_flops = 1e12  # Skip the matmul measurement in tests.
  return c

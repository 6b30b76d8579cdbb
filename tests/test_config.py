"""Settings: every preset is its file's base recipe plus its overrides, every field is read by some code,
and every check of a run config is in gpt_jax/config_checks.py and runs before any work starts."""

import functools
import glob
import math
import os
import pathlib
import re
import time

import pytest

from gpt_jax import config as config_lib, config_checks, config_files
from gpt_jax.config import ModelConfig, SampleConfig
from gpt_jax.errors import UserError
from gpt_jax.training import loop as loop_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(glob.glob(str(ROOT / 'configs' / '*.py')))
# Where settings are read: the package and the scripts; not the checks (a field only checked is unread).
READERS = [p for p in sorted(ROOT.glob('gpt_jax/**/*.py')) + sorted(ROOT.glob('scripts/*.py'))
           if p.name != 'config_checks.py']


def _presets(path: str) -> dict:
  """The PRESETS table of a config file, loaded as config_flags loads it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('_preset_table_' + pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.PRESETS


ALL_PRESETS = [(os.path.relpath(f, ROOT), p) for f in CONFIG_FILES for p in _presets(f)]


def _leaves(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


@functools.cache  # Read once per worker, not once per preset.
def _sources() -> dict[str, str]:
  return {str(p.relative_to(ROOT)): p.read_text(encoding='utf-8') for p in READERS}


@functools.cache  # The presets share most fields: each is searched for once per worker.
def _is_read(section: str, field: str) -> bool:
  """Whether some file that names `section` reads `.field`, `['field']` or `.get('field'`."""
  # FLAGS.name is a command-line flag of the same name, not this field.
  access = re.compile(rf"(?<!FLAGS)\.{field}\b|\[['\"]{field}['\"]\]|get\(['\"]{field}['\"]")
  in_section = re.compile(rf'\b{section}\b' + (r'|ModelConfig|model_cfg' if section == 'model' else ''))
  return any(access.search(text) and in_section.search(text) for text in _sources().values())


def unread_fields(config) -> list[str]:
  """The dotted fields of `config` that no reader accesses: no file that names the field's section
  reads `.field`, `['field']` or `.get('field'` (a static search)."""
  unread = []
  for key in _leaves(config.to_dict()):
    *sections, field = key.split('.')
    if not _is_read(sections[-1] if sections else 'config', field):
      unread.append(key)
  return unread


@pytest.mark.parametrize('path,preset', ALL_PRESETS)
def test_every_field_of_every_preset_is_read_by_some_code(path, preset):
  config = config_files.load_config_file(str(ROOT / path), preset)
  assert unread_fields(config) == []


def test_the_unread_field_search_finds_a_made_up_field():
  config = config_files.load_config_file(str(ROOT / 'configs' / 'shakespeare.py'))
  config.train.learning_rate_multiplier_xyz = 2.0
  config.sample.made_up_sample_field = 1
  assert sorted(unread_fields(config)) == ['sample.made_up_sample_field',
                                                       'train.learning_rate_multiplier_xyz']


@pytest.mark.parametrize('path,preset', ALL_PRESETS)
def test_every_preset_passes_the_checks(path, preset):
  config_checks.validate(config_files.load_config_file(str(ROOT / path), preset))


@pytest.mark.parametrize('path', [os.path.relpath(f, ROOT) for f in CONFIG_FILES])
def test_an_unknown_preset_names_the_valid_ones(path):
  with pytest.raises(ValueError, match=r"unknown preset 'huge': use one of ''"):
    config_files.load_config_file(str(ROOT / path), 'huge')


def test_a_misspelt_override_is_an_error_not_a_new_field():
  config = config_files.load_config_file(str(ROOT / 'configs' / 'shakespeare.py'))
  with pytest.raises(KeyError, match='train.max_stepz'):
    config_files.with_overrides(config, {'train.max_stepz': 3})


def test_the_model_and_sample_sections_are_the_dataclass_defaults():
  """One home per default: the base recipe's model and sample sections are ModelConfig's and
  SampleConfig's own defaults (vocab_size 0: from the data)."""
  c = config_files.load_config_file(str(ROOT / 'configs' / 'shakespeare.py'))
  assert config_lib.model_config_from(c, ModelConfig().vocab_size) == ModelConfig()
  assert c.model.vocab_size == 0
  assert c.sample.to_dict() == SampleConfig().__dict__


BAD_SETTINGS = [
    ('train.beta1', 1.5, 'train.beta1 must be in [0, 1) (got 1.5)'),
    ('train.beta2', math.nan, 'train.beta2 must be in [0, 1) (got nan)'),
    ('train.warmup_steps', -10, 'train.warmup_steps must be >= 0 (got -10)'),
    ('train.learning_rate', math.nan, 'train.learning_rate must be > 0 (got nan)'),
    ('train.learning_rate', math.inf, 'train.learning_rate must be > 0 (got inf)'),
    ('train.min_learning_rate', 1.0, 'train.min_learning_rate (1.0) must be <= train.learning_rate'),
    ('train.grad_clip', -1.0, 'train.grad_clip must be >= 0, 0 = no clipping (got -1.0)'),
    ('train.weight_decay', math.nan, 'train.weight_decay must be >= 0 (got nan)'),
    ('train.ema_decay', math.nan, 'train.ema_decay must be in [0, 1), 0 = off (got nan)'),
    ('train.target_val_loss', math.inf, 'train.target_val_loss must be >= 0, 0 = none (got inf)'),
    ('train.peak_flops', -1.0, 'train.peak_flops must be >= 0'),
    ('train.layer_stats_interval', -1, 'train.layer_stats_interval must be >= 0'),
    ('sample.temperature', -1.0, 'sample.temperature must be >= 0 (got -1.0)'),
    ('sample.temperature', math.nan, 'sample.temperature must be >= 0 (got nan)'),
    ('sample.top_k', -1, 'sample.top_k must be >= 0 (got -1)'),
    ('sample.eval_tokens', -5, 'sample.eval_tokens must be >= 0 (got -5)'),
    ('sample.window_shift', -1, 'sample.window_shift must be >= 0 (got -1)'),
    ('data.val_fraction', 1.0, 'data.val_fraction must be between 0 and 1 (got 1.0)'),
    ('data.val_fraction', math.nan, 'data.val_fraction must be between 0 and 1 (got nan)'),
    ('data.tokenizer', 'words', "data.tokenizer must be one of ('char', 'gpt2', 'bpe') (got 'words')"),
    ('data.shard_tokens', 0, 'data.shard_tokens must be >= 1 (got 0)'),
    ('checkpoint.keep_last', 0, 'checkpoint.keep_last must be >= 1 (got 0)'),
    ('mesh.data', 0, 'mesh.data must be >= 1, or -1'),
    ('model.dropout', math.nan, 'model.dropout must be in [0, 1) (got nan)'),
    ('model.rope_base', math.inf, 'model.rope_base must be a finite number (got inf)'),
    ('model.n_head', 5, 'model.n_embd (32) must be divisible by model.n_head (5)'),
    ('model.vocab_size', -1, 'model.vocab_size must be >= 0, 0 = from the data (got -1)'),
]


@pytest.mark.parametrize('key,value,problem', BAD_SETTINGS)
def test_each_bad_setting_is_named_before_anything_is_written(tiny_config, key, value, problem):
  config_files.with_overrides(tiny_config, {key: value})
  with pytest.raises(UserError) as e:
    loop_lib.train_and_evaluate(tiny_config)
  assert str(e.value).startswith('invalid config: ') and problem in str(e.value)
  assert not pathlib.Path(tiny_config.out_dir).exists()  # No stray out_dir (nor its train.lock).


def test_several_problems_in_one_message(tiny_config):
  config_files.with_overrides(tiny_config, {'train.beta1': 1.5, 'train.warmup_steps': -10,
                                          'sample.temperature': -1.0, 'model.n_head': 5})
  with pytest.raises(UserError) as e:
    config_checks.validate(tiny_config)
  assert str(e.value).count(';') == 3


def test_the_sampling_checks_serve_the_flags_too():
  assert config_checks.check_sampling({'temperature': math.nan, 'top_k': 5, 'max_new_tokens': 0},
                                      prefix='--') == ['--max_new_tokens must be >= 1 (got 0)',
                                                       '--temperature must be >= 0 (got nan)']


def test_block_size_longer_than_a_split_is_refused_before_compiling():
  """A block_size of 200000 on the tiny preset: refused at once, naming the split and the memory."""
  m = ModelConfig(vocab_size=65, block_size=200_000, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
  c = config_files.load_config_file(str(ROOT / 'configs' / 'shakespeare.py'), 'tiny')
  with pytest.raises(UserError) as e:
    config_checks.check_fits(m, c.train, {'train': 1_003_854, 'val': 111_540})
  message = str(e.value)
  assert 'the val split has only 111,540 tokens in a row, fewer than model.block_size + 1' in message
  assert 'the train split' not in message
  assert 'a training step needs at least' in message and 'Lower model.block_size' in message


def test_an_impossible_block_size_is_one_message_within_seconds(tiny_config):
  """Before the check, block_size 200000 on the tiny preset compiled its eval for many minutes."""
  tiny_config.model.block_size = 200_000
  t0 = time.perf_counter()
  with pytest.raises(UserError, match=r'fewer than model.block_size \+ 1 = 200,001.*needs at least'):
    loop_lib.train_and_evaluate(tiny_config)
  assert time.perf_counter() - t0 < 60


def test_every_preset_fits_its_splits_and_a_large_host():
  """The memory estimate is a lower bound: no shipped preset but GPT-2's real sizes needs 16 GiB."""
  for path, preset in ALL_PRESETS:
    c = config_files.load_config_file(str(ROOT / path), preset)
    vocab = {'char': 65, 'gpt2': 50257, 'bpe': c.data.bpe_vocab_size}[c.data.tokenizer]
    m = config_lib.model_config_from(c, vocab)
    need = config_checks.step_memory_bytes(m, c.train.batch_size)
    assert need < (64 << 30), (path, preset, need / 2**30)

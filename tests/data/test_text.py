"""Data preparation (real file and synthetic), staleness checks, download, on-device batches."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax.data import batches as batches_lib, text as text_lib
from gpt_jax.errors import UserError

SHAKESPEARE_SHA = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'


def _data_cfg(tmp_path, text_path):
  c = shakespeare.get_config('tiny').data
  c.text_path = str(text_path)
  c.data_dir = str(tmp_path / 'prepared')
  c.cache_dir = str(tmp_path / 'cache')
  return c


def test_prepare_real_tinyshakespeare(tmp_path, shakespeare_path):
  meta = text_lib.prepare(_data_cfg(tmp_path, shakespeare_path), verbose=False)
  assert meta['vocab_size'] == 65
  assert (meta['train_tokens'], meta['val_tokens']) == (1_003_854, 111_540)
  assert meta['source_sha256'] == SHAKESPEARE_SHA
  ds = text_lib.Dataset(str(tmp_path / 'prepared'))
  assert ds.train.dtype == np.uint16 and ds.train.shape == (1_003_854,)
  text = shakespeare_path.read_text(encoding='utf-8')
  assert ds.tokenizer.decode(ds.train[:200]) == text[:200]
  assert ds.tokenizer.decode(ds.val[-100:]) == text[-100:]


def test_prepare_is_idempotent(tmp_path, synthetic_text_path, capsys):
  cfg = _data_cfg(tmp_path, synthetic_text_path)
  text_lib.prepare(cfg)
  mtime = os.path.getmtime(tmp_path / 'prepared' / 'train.bin')
  text_lib.prepare(cfg)
  assert 'up to date' in capsys.readouterr().out
  assert os.path.getmtime(tmp_path / 'prepared' / 'train.bin') == mtime


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'delete', 'meta'])
def test_damaged_preparation_is_detected_and_redone(tmp_path, synthetic_text_path, damage, capsys):
  cfg = _data_cfg(tmp_path, synthetic_text_path)
  meta = text_lib.prepare(cfg, verbose=False)
  train_bin = tmp_path / 'prepared' / 'train.bin'
  good = train_bin.read_bytes()
  if damage == 'truncate':
    train_bin.write_bytes(good[:-10])
  elif damage == 'flip':
    train_bin.write_bytes(bytes([good[0] ^ 1]) + good[1:])
  elif damage == 'delete':
    train_bin.unlink()
  else:
    (tmp_path / 'prepared' / 'meta.json').write_text('{broken')
  assert text_lib.check_prepared(str(tmp_path / 'prepared'))[0] is None
  with pytest.raises(UserError, match='prepare_data'):
    text_lib.Dataset(str(tmp_path / 'prepared'))  # Never trained on.
  again = text_lib.prepare(cfg)
  assert 're-preparing' in capsys.readouterr().out
  assert again['train_sha256'] == meta['train_sha256']
  assert train_bin.read_bytes() == good


def test_changed_source_text_is_stale(tmp_path, synthetic_text_path):
  cfg = _data_cfg(tmp_path, synthetic_text_path)
  text_lib.prepare(cfg, verbose=False)
  synthetic_text_path.write_text('something else entirely, with new letters: xyzzy\n' * 20)
  meta = text_lib.prepare(cfg, verbose=False)
  assert meta['source_sha256'] == text_lib.sha256_file(str(synthetic_text_path))
  assert text_lib.Dataset(cfg.data_dir).tokenizer.decode(text_lib.Dataset(cfg.data_dir).train[:9]) == 'something'


def test_missing_text_path_says_what_to_do(tmp_path):
  cfg = _data_cfg(tmp_path, tmp_path / 'nope.txt')
  with pytest.raises(UserError, match='does not exist.*text_path'):
    text_lib.prepare(cfg)


@pytest.fixture
def no_shipped_data(tmp_path, monkeypatch):
  """As if the package shipped no data: exercises the cache and download paths."""
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', tmp_path / 'no_assets')


def test_shipped_files_match_their_checksums_and_the_configs():
  shipped = text_lib.shipped_files()
  assert shipped[SHAKESPEARE_SHA].name == 'tinyshakespeare.txt'
  assert shakespeare.get_config().data.sha256 == SHAKESPEARE_SHA
  for digest, path in shipped.items():
    assert text_lib.sha256_file(str(path)) == digest, path
  for name, digest in text_lib.GPT2_FILES.items():
    assert shipped[digest].name == name


def test_lookup_order_text_path_then_shipped_then_cache(tmp_path, synthetic_text_path, monkeypatch,
                                                       capsys):
  cfg = _data_cfg(tmp_path, synthetic_text_path)
  assert text_lib.find_text(cfg) == str(synthetic_text_path)  # An explicit file wins.
  cfg.text_path = ''
  cfg.url = 'http://127.0.0.1:9/input.txt'  # Nothing listens there: any download attempt fails.
  shipped = text_lib.find_text(cfg)
  assert shipped == str(text_lib.ASSETS_DIR / 'tinyshakespeare.txt')
  assert not (tmp_path / 'cache').exists()  # Nothing downloaded or cached.
  # A damaged shipped copy is never used: it is reported and the cache answers instead.
  assets = tmp_path / 'assets'
  assets.mkdir()
  (assets / 'SHA256SUMS').write_text(f'{SHAKESPEARE_SHA}  tinyshakespeare.txt\n')
  (assets / 'tinyshakespeare.txt').write_text('damaged')
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', assets)
  with pytest.raises(UserError, match='could not download'):
    text_lib.find_text(cfg)
  assert 'does not match its SHA-256' in capsys.readouterr().out
  assert not any((tmp_path / 'cache').glob('*'))  # No partial download left behind.
  (tmp_path / 'cache' / 'input.txt').write_bytes(pathlib.Path(shipped).read_bytes())
  assert text_lib.find_text(cfg) == str(tmp_path / 'cache' / 'input.txt')
  # Another text (another sha256) never picks up the shipped TinyShakespeare.
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', pathlib.Path(shipped).parent)
  cfg.sha256 = text_lib.sha256_file(str(synthetic_text_path))
  with pytest.raises(UserError, match='could not download'):
    text_lib.find_text(cfg)


def test_gpt2_files_come_from_the_shipped_copy(tmp_path):
  cfg = _data_cfg(tmp_path, '')
  encoder, vocab = text_lib.find_gpt2_files(cfg)
  assert pathlib.Path(encoder).parent == text_lib.ASSETS_DIR / 'gpt2'
  assert text_lib.sha256_file(vocab) == text_lib.GPT2_FILES['vocab.bpe']
  assert not (tmp_path / 'cache').exists()


def test_offline_download_says_how_to_pass_a_file(tmp_path, no_shipped_data):
  cfg = _data_cfg(tmp_path, '')
  cfg.url = 'http://127.0.0.1:9/input.txt'  # Nothing listens on the discard port.
  with pytest.raises(UserError, match='text_path'):
    text_lib.prepare(cfg)
  assert not any((tmp_path / 'cache').glob('*'))  # No partial file left behind.


def test_download_verifies_checksum_and_caches(tmp_path, shakespeare_path, no_shipped_data):
  cfg = _data_cfg(tmp_path, '')
  cfg.url = shakespeare_path.as_uri()  # A file:// URL exercises the real download code offline.
  assert text_lib.find_text(cfg) == str(tmp_path / 'cache' / 'tinyshakespeare.txt')
  assert text_lib.sha256_file(str(tmp_path / 'cache' / 'tinyshakespeare.txt')) == SHAKESPEARE_SHA
  cfg.url = 'http://127.0.0.1:9/tinyshakespeare.txt'  # Now served from the cache, no network.
  assert text_lib.find_text(cfg).endswith('tinyshakespeare.txt')


def test_download_with_wrong_checksum_is_not_kept(tmp_path, synthetic_text_path, no_shipped_data):
  cfg = _data_cfg(tmp_path, '')
  cfg.url = synthetic_text_path.as_uri()
  with pytest.raises(UserError, match='SHA-256'):
    text_lib.find_text(cfg)
  assert not any((tmp_path / 'cache').glob('*'))


def test_empty_and_non_utf8_text(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  with pytest.raises(UserError, match='empty'):
    text_lib.prepare(_data_cfg(tmp_path, empty))
  binary = tmp_path / 'bin.txt'
  binary.write_bytes(b'\xff\xfe\x00abc')
  with pytest.raises(UserError, match='UTF-8'):
    text_lib.prepare(_data_cfg(tmp_path, binary))


def test_get_batch_targets_are_inputs_shifted_by_one():
  data = jnp.arange(1000, dtype=jnp.uint16)
  x, y = jax.jit(batches_lib.get_batch, static_argnums=(2, 3))(data, jax.random.PRNGKey(0), 16, 32)
  assert x.shape == y.shape == (16, 32) and x.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(y[:, :-1]), np.asarray(x[:, 1:]))
  np.testing.assert_array_equal(np.asarray(x[:, 1:] - x[:, :-1]), 1)  # Contiguous windows.
  assert int(y.max()) <= 999


def test_get_batch_covers_the_whole_range_including_the_last_token():
  data = jnp.arange(40, dtype=jnp.uint16)
  x, y = batches_lib.get_batch(data, jax.random.PRNGKey(1), 2000, 8)
  assert int(x.min()) == 0 and int(y.max()) == 39


def test_get_batch_is_a_function_of_the_key():
  data = jnp.arange(5000, dtype=jnp.uint16)
  a = batches_lib.get_batch(data, jax.random.PRNGKey(3), 4, 16)[0]
  b = batches_lib.get_batch(data, jax.random.PRNGKey(3), 4, 16)[0]
  c = batches_lib.get_batch(data, jax.random.PRNGKey(4), 4, 16)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_too_little_data_for_the_block_size():
  with pytest.raises(UserError, match='block_size'):
    batches_lib.get_batch(jnp.arange(10, dtype=jnp.uint16), jax.random.PRNGKey(0), 2, 10)

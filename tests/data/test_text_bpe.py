"""Data preparation with BPE tokenizers (GPT-2's and a trained one), folders, dtypes, configs."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

from configs import shakespeare, shakespeare_bpe, shakespeare_bpe_compact
from gpt_jax.data import bpe, text as text_lib
from gpt_jax.errors import UserError

from conftest import make_synthetic_text, shipped_file

SHAKESPEARE_SHA = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'


def _data_cfg(tmp_path, text_path, tokenizer='char', **fields):
  c = shakespeare.get_config('tiny').data
  c.update(text_path=str(text_path), data_dir=str(tmp_path / 'prepared'),
           cache_dir=str(tmp_path / 'cache'), tokenizer=tokenizer, **fields)
  return c


@pytest.fixture
def gpt2_dir():
  return shipped_file('gpt2', 'encoder.json').parent


@pytest.fixture
def split_text_path(tmp_path):
  """Synthetic text whose last 10% (the val split) is 'zq' repeated: a pair never seen in train."""
  path = tmp_path / 'split.txt'
  path.write_text(make_synthetic_text(27_000) + 'zq' * 1500, encoding='utf-8')  # Split at 27,000.
  return path


def test_gpt2_tinyshakespeare_token_counts_match_nanogpt(tmp_path, shakespeare_path, gpt2_dir):
  meta = text_lib.prepare(_data_cfg(tmp_path, shakespeare_path, 'gpt2', gpt2_dir=str(gpt2_dir)),
                          verbose=False)
  assert (meta['train_tokens'], meta['val_tokens']) == (301_966, 36_059)
  assert (meta['train_chars'], meta['val_chars']) == (1_003_854, 111_540)
  assert meta['vocab_size'] == 50_257 and meta['dtype'] == 'uint16'
  assert meta['source_sha256'] == SHAKESPEARE_SHA
  ds = text_lib.Dataset(str(tmp_path / 'prepared'))
  assert ds.train.dtype == np.uint16 and ds.val.shape == (36_059,)
  text = shakespeare_path.read_text(encoding='utf-8')
  assert ds.tokenizer.decode(ds.train) == text[:1_003_854]  # Split by characters, then encoded.
  assert ds.tokenizer.decode(ds.val) == text[1_003_854:]


def test_gpt2_files_come_from_the_cache_or_a_verified_download(tmp_path, gpt2_dir, monkeypatch):
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', tmp_path / 'no_assets')  # As if nothing were shipped.
  cfg = _data_cfg(tmp_path, '', 'gpt2')
  monkeypatch.setattr(text_lib, 'GPT2_URL', gpt2_dir.as_uri() + '/')  # file:// exercises download.
  paths = text_lib.find_gpt2_files(cfg)
  assert paths == (str(tmp_path / 'cache' / 'gpt2' / 'encoder.json'),
                   str(tmp_path / 'cache' / 'gpt2' / 'vocab.bpe'))
  assert [text_lib.sha256_file(p) for p in paths] == list(text_lib.GPT2_FILES.values())
  monkeypatch.setattr(text_lib, 'GPT2_URL', 'http://127.0.0.1:9/')  # Now served from the cache.
  assert text_lib.find_gpt2_files(cfg) == paths


def test_gpt2_download_with_wrong_checksum_is_not_kept(tmp_path, gpt2_dir, monkeypatch):
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', tmp_path / 'no_assets')
  monkeypatch.setattr(text_lib, 'GPT2_URL', gpt2_dir.as_uri() + '/')
  monkeypatch.setitem(text_lib.GPT2_FILES, 'encoder.json', '0' * 64)
  with pytest.raises(UserError, match='SHA-256.*gpt2_dir'):
    text_lib.find_gpt2_files(_data_cfg(tmp_path, '', 'gpt2'))
  assert not any((tmp_path / 'cache' / 'gpt2').glob('encoder.json*'))


def test_gpt2_offline_and_bad_gpt2_dir_say_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(text_lib, 'ASSETS_DIR', tmp_path / 'no_assets')
  monkeypatch.setattr(text_lib, 'GPT2_URL', 'http://127.0.0.1:9/')
  with pytest.raises(UserError, match='offline.*gpt2_dir'):
    text_lib.find_gpt2_files(_data_cfg(tmp_path, '', 'gpt2'))
  with pytest.raises(UserError, match='has no encoder.json'):
    text_lib.find_gpt2_files(_data_cfg(tmp_path, '', 'gpt2', gpt2_dir=str(tmp_path)))


def test_compact_bpe_is_trained_on_the_train_split_only(tmp_path, split_text_path):
  meta = text_lib.prepare(_data_cfg(tmp_path, split_text_path, 'bpe', bpe_vocab_size=300),
                          verbose=False)
  assert meta['train_chars'] == 27_000 and meta['vocab_size'] == 300
  assert meta['bpe_train_seconds'] >= 0
  ds = text_lib.Dataset(str(tmp_path / 'prepared'))
  text = split_text_path.read_text(encoding='utf-8')
  assert ds.tokenizer.to_dict() == bpe.train_bpe(text[:27_000], 300, progress=False,
                                                 name='bpe300').to_dict()
  # 'zq' only occurs in the val text: a tokenizer that saw it would have merged it at once.
  assert not any(b'zq' in ds.tokenizer.token_bytes(i) or b'qz' in ds.tokenizer.token_bytes(i)
                 for i in range(ds.tokenizer.vocab_size))
  assert ds.val.size == 3000 and ds.tokenizer.decode(ds.val) == 'zq' * 1500
  assert ds.tokenizer.decode(ds.train) == text[:27_000]
  saved = json.loads((tmp_path / 'prepared' / 'tokenizer.json').read_text(encoding='utf-8'))
  assert saved['type'] == 'bpe' and len(saved['merges']) == 300 - 256


def test_changing_tokenizer_settings_reprepares(tmp_path, synthetic_text_path, capsys):
  def prep(**fields):
    meta = text_lib.prepare(_data_cfg(tmp_path, synthetic_text_path, **fields))
    return meta, capsys.readouterr().out

  meta, _ = prep(tokenizer='char')
  assert meta['tokenizer'] == 'char'
  meta, out = prep(tokenizer='bpe', bpe_vocab_size=300)
  assert "re-preparing" in out and "tokenizer: 'char' -> 'bpe'" in out
  assert meta['vocab_size'] == 300
  meta, out = prep(tokenizer='bpe', bpe_vocab_size=280)
  assert 'bpe_vocab_size: 300 -> 280' in out and meta['vocab_size'] == 280
  meta, out = prep(tokenizer='bpe', bpe_vocab_size=280)
  assert 'up to date' in out
  meta, out = prep(tokenizer='bpe', bpe_vocab_size=280, val_fraction=0.2)
  assert 'val_fraction: 0.1 -> 0.2' in out and meta['val_chars'] == 6000
  # A damaged tokenizer.json is caught like a damaged token file.
  tok_json = tmp_path / 'prepared' / 'tokenizer.json'
  tok_json.write_text(tok_json.read_text(encoding='utf-8').replace('"bpe280"', '"x"'), encoding='utf-8')
  assert 'tokenizer.json does not match' in text_lib.check_prepared(str(tmp_path / 'prepared'))[1]


def test_endoftext_in_the_source_is_ordinary_text(tmp_path, gpt2_dir):
  text = 'ROMEO:\nO, she doth teach <|endoftext|> the torches to burn bright!\n' * 40
  path = tmp_path / 'eot.txt'
  path.write_text(text, encoding='utf-8')
  tok = bpe.load_gpt2_tokenizer(gpt2_dir / 'encoder.json', gpt2_dir / 'vocab.bpe')
  for fields in (dict(tokenizer='gpt2', gpt2_dir=str(gpt2_dir)),
                 dict(tokenizer='bpe', bpe_vocab_size=270), dict(tokenizer='char')):
    meta = text_lib.prepare(_data_cfg(tmp_path, path, **fields), verbose=False)
    ds = text_lib.Dataset(str(tmp_path / 'prepared'))
    ids = np.concatenate([ds.train, ds.val])
    assert ds.tokenizer.decode(ds.train) + ds.tokenizer.decode(ds.val) == text, fields
    if fields['tokenizer'] == 'gpt2':
      assert bpe.GPT2_ENDOFTEXT_ID not in ids
      n = meta['train_chars']
      assert list(ds.train) == tok.encode(text[:n], disallowed_special=())


def test_folder_of_text_files(tmp_path, capsys):
  folder = tmp_path / 'corpus'
  (folder / 'sub').mkdir(parents=True)
  (folder / '.git').mkdir()
  files = {'b.txt': 'second file\n' * 300, 'a.txt': 'first file\n' * 300, 'sub/c.txt': 'third' * 100}
  for name, content in files.items():
    (folder / name).write_text(content, encoding='utf-8')
  (folder / 'notes.md').write_text('not text data')
  (folder / '.hidden.txt').write_text('hidden')
  (folder / '.git' / 'x.txt').write_text('git internals')
  cfg = _data_cfg(tmp_path, folder)
  meta = text_lib.prepare(cfg, verbose=False)
  order = ['a.txt', 'b.txt', 'sub/c.txt']
  assert meta['source_files'] == order
  joined = text_lib.FILE_SEPARATOR.join(files[f] for f in order)
  assert meta['source_sha256'] == hashlib.sha256(joined.encode()).hexdigest()
  assert meta['train_chars'] + meta['val_chars'] == len(joined)
  ds = text_lib.Dataset(cfg.data_dir)
  assert ds.tokenizer.decode(ds.train) + ds.tokenizer.decode(ds.val) == joined
  # Renaming changes the order, hence the text: the preparation is stale.
  os.rename(folder / 'a.txt', folder / 'd.txt')
  meta = text_lib.prepare(cfg)
  assert 'source text has changed' in capsys.readouterr().out
  assert meta['source_files'] == ['b.txt', 'd.txt', 'sub/c.txt']
  empty = tmp_path / 'empty_folder'
  empty.mkdir()
  with pytest.raises(UserError, match='no .txt files'):
    text_lib.prepare(_data_cfg(tmp_path, empty))


def test_token_dtype_is_uint16_while_ids_fit():
  assert text_lib.token_dtype(65) == np.uint16
  assert text_lib.token_dtype(50_257) == np.uint16
  assert text_lib.token_dtype(65_536) == np.uint16  # Ids 0..65535.
  assert text_lib.token_dtype(65_537) == np.uint32


def test_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
  chars = [chr(c) for c in range(0x100, 0x100 + 70_000 + 2048) if not 0xD800 <= c <= 0xDFFF][:70_000]
  path = tmp_path / 'wide.txt'
  path.write_text(''.join(chars) * 2, encoding='utf-8')
  cfg = _data_cfg(tmp_path, path)
  meta = text_lib.prepare(cfg, verbose=False)
  assert meta['vocab_size'] == 70_000 and meta['dtype'] == 'uint32'
  ds = text_lib.Dataset(cfg.data_dir)
  assert ds.train.dtype == np.uint32 and int(ds.train[69_999]) == 69_999
  assert ds.tokenizer.decode(ds.val) == (''.join(chars) * 2)[meta['train_chars']:]
  train_bin = pathlib.Path(cfg.data_dir) / 'train.bin'
  train_bin.write_bytes(train_bin.read_bytes()[:-2])  # Half a uint32 token: truncation is caught.
  assert 'wrong size' in text_lib.check_prepared(cfg.data_dir)[1]


def test_bad_tokenizer_settings_say_what_to_do(tmp_path, synthetic_text_path):
  with pytest.raises(UserError, match="'wordpiece' is not supported; use one of char, gpt2, bpe"):
    text_lib.prepare(_data_cfg(tmp_path, synthetic_text_path, 'wordpiece'))
  with pytest.raises(UserError, match='bpe_vocab_size >= 256.*1024'):
    text_lib.prepare(_data_cfg(tmp_path, synthetic_text_path, 'bpe'))
  with pytest.raises(UserError, match='runs out of pairs'):
    text_lib.prepare(_data_cfg(tmp_path, synthetic_text_path, 'bpe', bpe_vocab_size=5000))


@pytest.mark.parametrize('module,preset', [(m, p) for m in (shakespeare_bpe, shakespeare_bpe_compact)
                                            for p in ('', 'cpu', 'tiny')])
def test_bpe_configs(module, preset):
  c = module.get_config(preset)
  base = shakespeare.get_config(preset)
  for section in ('model', 'data', 'train', 'checkpoint', 'sample'):
    assert set(c[section].keys()) == set(base[section].keys()), section  # Nothing misspelt.
  assert c.model.vocab_size % 64 == 0
  if module is shakespeare_bpe:
    assert c.data.tokenizer == 'gpt2' and c.model.vocab_size == 50_304
  else:
    assert c.data.tokenizer == 'bpe' and c.model.vocab_size >= c.data.bpe_vocab_size
    c.data.bpe_vocab_size = 1000  # As --config.data.bpe_vocab_size=1000 would: the model follows.
    assert c.model.vocab_size == 1024 and c.model.to_dict()['vocab_size'] == 1024
    c.data.bpe_vocab_size = 2000
    assert c.model.vocab_size == 2048
  with pytest.raises(ValueError, match='unknown preset'):
    module.get_config('gpu')

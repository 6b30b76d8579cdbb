"""Sharded token datasets: streaming writer, checksums, deterministic per-process memmap batches."""

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO, make_synthetic_text
from gpt_jax import data as data_lib
from gpt_jax import sharding as sharding_lib
from gpt_jax import shards
from gpt_jax.errors import UserError


@pytest.fixture
def corpus(tmp_path):
  """A folder of text files (nested, one non-.txt file that must be ignored), ~60k characters."""
  root = tmp_path / 'corpus'
  (root / 'b').mkdir(parents=True)
  for i, rel in enumerate(['a1.txt', 'a2.txt', 'b/b1.txt', 'b/b2.txt', 'c.txt']):
    text = make_synthetic_text(12_000, seed=i) + ('é ✓\n' if i == 2 else '')  # Multi-byte chars.
    (root / rel).write_text(text, encoding='utf-8')
  (root / 'notes.md').write_text('not part of the corpus', encoding='utf-8')
  return root


def _stream(out_dir, index):
  return np.concatenate([np.fromfile(os.path.join(out_dir, s['file']), np.uint16)
                         for s in index['shards']])


def test_shards_hold_the_corpus_exactly(corpus, tmp_path):
  out = tmp_path / 'shards'
  # Small chunks and shards, so that chunk edges fall inside multi-byte characters' neighbourhood
  # and the stream spans many shard files.
  index = shards.write_shards(str(corpus), str(out), 'char', shard_tokens=7_000, chunk_chars=777,
                              verbose=False)
  text = data_lib.read_text(str(corpus))  # The same files, order and separators as data.py.
  tok = shards.ShardedTokens(str(out)).tokenizer
  assert tok.chars == sorted(set(text))
  assert tok.decode(_stream(out, index)) == text
  assert index['total_tokens'] == len(text) == index['chars']
  assert [s['tokens'] for s in index['shards'][:-1]] == [7_000] * (len(index['shards']) - 1)
  assert 0 < index['shards'][-1]['tokens'] <= 7_000
  assert sorted(os.listdir(out)) == sorted([s['file'] for s in index['shards']] + ['index.json'])
  for s in index['shards']:
    assert hashlib.sha256((out / s['file']).read_bytes()).hexdigest() == s['sha256']
  assert index['source_files'] == ['a1.txt', 'a2.txt', 'b/b1.txt', 'b/b2.txt', 'c.txt']
  assert index['source_sha256'] == data_lib.source_sha256(data_lib.source_files(str(corpus)))


def test_writer_memory_stays_flat(tmp_path):
  """Peak allocations do not grow with the corpus: 2 MB and 4 MB of text need the same, and far less
  than the text itself (one chunk of text and one shard buffer)."""
  block = make_synthetic_text(200_000, seed=1)
  peaks = []
  for n_files in (10, 20):
    root = tmp_path / f'corpus{n_files}'
    root.mkdir()
    for i in range(n_files):
      (root / f'part{i:02d}.txt').write_text(block, encoding='utf-8')
    tracemalloc.start()
    try:
      index = shards.write_shards(str(root), str(tmp_path / f'out{n_files}'), 'char',
                                  shard_tokens=1 << 17, chunk_chars=1 << 15, verbose=False)
      peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    assert index['total_tokens'] > n_files * 200_000
  assert peaks[1] < 1.1 * peaks[0] + 100_000, peaks
  assert peaks[1] < 2_000_000, peaks  # The 4 MB corpus as one str alone would be > 4 MB.


def test_subword_tokenizer_object(corpus, tmp_path):
  from gpt_jax import bpe
  text = data_lib.read_text(str(corpus))
  tok = bpe.train_bpe(text[:20_000], 300, progress=False)
  index = shards.write_shards(str(corpus), str(tmp_path / 's'), tok, shard_tokens=5_000,
                              chunk_chars=1_000, verbose=False)
  loaded = shards.ShardedTokens(str(tmp_path / 's')).tokenizer
  assert loaded.to_dict() == tok.to_dict()
  assert loaded.decode(_stream(tmp_path / 's', index).tolist()) == text  # Lossless, chunk by chunk.
  assert index['total_tokens'] < len(text)  # It really is a subword vocabulary.


@pytest.fixture
def dataset(corpus, tmp_path):
  out = tmp_path / 'shards'
  shards.write_shards(str(corpus), str(out), 'char', shard_tokens=5_000, chunk_chars=4_096,
                      verbose=False)
  return out


def test_batches_are_windows_of_the_stream_and_a_pure_function_of_seed_and_step(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=7)
  stream = _stream(dataset, ds.index).astype(np.int32)
  x, y = ds.host_batch(3, 16, 32)
  assert x.shape == y.shape == (16, 32) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  shard, offset = ds.windows(3, 16, 32)
  starts = np.concatenate([[0], np.cumsum(ds.sizes)])[shard] + offset
  for row, s in zip(range(16), starts):
    np.testing.assert_array_equal(x[row], stream[s:s + 32])
    np.testing.assert_array_equal(y[row], stream[s + 1:s + 33])
  assert np.all(offset + 33 <= ds.sizes[shard])  # Windows never cross a shard boundary.

  # Resumption: a fresh loader (a restarted run) gives the same batch for the same step ...
  again = shards.ShardedTokens(str(dataset), seed=7)
  for step in (0, 3, 1000):
    np.testing.assert_array_equal(again.host_batch(step, 16, 32)[0], ds.host_batch(step, 16, 32)[0])
  # ... and other steps / seeds give other batches.
  assert not np.array_equal(ds.host_batch(4, 16, 32)[0], x)
  assert not np.array_equal(shards.ShardedTokens(str(dataset), seed=8).host_batch(3, 16, 32)[0], x)


def test_processes_read_disjoint_rows_of_one_global_batch(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=1, verify=False)
  whole = ds.host_batch(5, 12, 16, process_index=0, process_count=1)[0]
  parts = [ds.host_batch(5, 12, 16, process_index=p, process_count=3)[0] for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(UserError, match='does not split over 5 processes'):
    ds.host_batch(5, 12, 16, process_index=0, process_count=5)


def test_global_batch_is_a_sharded_jax_array(dataset):
  ds = shards.ShardedTokens(str(dataset), seed=1)
  mesh = sharding_lib.make_mesh(None)
  x, y = ds.global_batch(2, 8, 16, sharding_lib.batch_sharding(mesh))
  assert isinstance(x, jax.Array) and x.shape == (8, 16)
  assert x.sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(np.asarray(x), ds.host_batch(2, 8, 16)[0])
  np.testing.assert_array_equal(np.asarray(y), ds.host_batch(2, 8, 16)[1])


def test_process_rows_follow_the_sharding():
  mesh = sharding_lib.make_mesh(None)
  assert shards.process_rows(sharding_lib.batch_sharding(mesh), (8, 4)).tolist() == list(range(8))
  assert shards.process_rows(NamedSharding(mesh, P()), (6, 4)).tolist() == list(range(6))


def test_damaged_truncated_or_missing_shards_are_detected(dataset):
  index = json.loads((dataset / 'index.json').read_text())
  name = index['shards'][1]['file']
  path = dataset / name
  good = path.read_bytes()

  damaged = bytearray(good)
  damaged[100] ^= 0x01  # One flipped bit, size unchanged.
  path.write_bytes(bytes(damaged))
  with pytest.raises(UserError, match=f'{name} .*damaged.*SHA-256'):
    shards.ShardedTokens(str(dataset))
  shards.ShardedTokens(str(dataset), verify=False)  # The size check alone cannot see a flipped bit.

  path.write_bytes(good[:-2])
  with pytest.raises(UserError, match=f'{name} .*truncated'):
    shards.ShardedTokens(str(dataset), verify=False)
  path.unlink()
  with pytest.raises(UserError, match=f'{name} .*missing'):
    shards.ShardedTokens(str(dataset), verify=False)
  path.write_bytes(good)
  shards.ShardedTokens(str(dataset))  # Restored: fine again.

  (dataset / 'index.json').unlink()  # An interrupted writer leaves no index.
  with pytest.raises(UserError, match='index.json is missing'):
    shards.ShardedTokens(str(dataset))


def test_existing_output_is_not_overwritten_silently(corpus, dataset):
  with pytest.raises(UserError, match='already holds a sharded dataset.*overwrite'):
    shards.write_shards(str(corpus), str(dataset), verbose=False)
  before = sorted(os.listdir(dataset))
  index = shards.write_shards(str(corpus), str(dataset), shard_tokens=50_000, overwrite=True,
                              verbose=False)
  assert len(index['shards']) < len(before) - 1  # Fewer, bigger shards; the old ones are gone.
  assert sorted(os.listdir(dataset)) == sorted([s['file'] for s in index['shards']] + ['index.json'])


def test_prepare_shards_script(corpus, tmp_path):
  out = tmp_path / 'script_shards'
  run = lambda *a: subprocess.run([sys.executable, str(REPO / 'scripts' / 'prepare_shards.py'), *a],
                                  capture_output=True, text=True, timeout=120)
  r = run(f'--source={corpus}', f'--out_dir={out}', '--shard_tokens=25000')
  assert r.returncode == 0, r.stderr
  assert 'wrote 3 shard(s)' in r.stdout
  r = run(f'--check={out}')
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr
  r = run(f'--source={corpus}', f'--out_dir={out}')
  assert r.returncode == 1 and r.stderr.startswith('error: ') and 'overwrite' in r.stderr

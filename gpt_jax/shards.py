"""Sharded token datasets: a corpus of any size as numbered uint16 files, streamed in and out.

For corpora too big to tokenize in memory or to replicate on every device (TinyShakespeare is
neither; see gpt_jax/data.py for the in-memory path).

Writing (`write_shards`, scripts/prepare_shards.py). A text file or a folder of `*.txt` files
(the same files, order and separator as gpt_jax/data.py) is read in chunks of `chunk_chars`
characters, encoded, and appended to `shard_000000.bin`, `shard_000001.bin`, ... of `shard_tokens`
tokens each (the last one shorter): raw uint16 ids, memmap-able. Memory stays flat whatever the
corpus size: one chunk of text and one shard buffer. The char tokenizer is built by a first
streaming pass (the sorted set of characters). Any other tokenizer object with
encode/decode/to_dict/vocab_size (e.g. a saved BPE) encodes chunks cut at line ends, so a word is
never split between two encode calls. `index.json`, written last (a crash leaves no index, never a
half-written dataset that looks complete), holds the tokenizer, every shard's token count and
SHA-256, and the source's SHA-256.

Reading (`ShardedTokens`). Shards are checked (size, and SHA-256 unless verify=False) and opened as
read-only memmaps. The global batch of step k is `batch_size` windows of block_size + 1 tokens
(never crossing a shard boundary) at positions drawn by `np.random.default_rng([seed, k])`: a pure
function of (seed, step), so a resumed run continues the very same stream, and independent of how
many processes read it. Each process reads only its own rows of that batch, i.e. disjoint windows:
by default the block `process_index` of `process_count`, and in `global_batch` exactly the rows its
devices hold under the batch sharding, assembled into one global `jax.Array` with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np

from gpt_jax import data as data_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

FORMAT = 'gpt_jax.shards'
VERSION = 1
INDEX = 'index.json'
DTYPE = np.dtype(np.uint16)


def shard_name(i: int) -> str:
  return f'shard_{i:06d}.bin'


# --- writing ---------------------------------------------------------------------------------------

def stream_text(files: Sequence[str], chunk_chars: int) -> Iterator[str]:
  """The files' text, joined by data.FILE_SEPARATOR, in pieces of at most `chunk_chars` characters."""
  for i, path in enumerate(files):
    if i:
      yield data_lib.FILE_SEPARATOR
    try:
      with open(path, encoding='utf-8') as f:  # Text mode decodes incrementally: chunk edges are
        for piece in iter(lambda: f.read(chunk_chars), ''):  # never inside a UTF-8 sequence.
          yield piece
    except UnicodeDecodeError as e:
      raise UserError(f'{path} is not UTF-8 text ({e}); convert it to UTF-8 first.') from None


def _line_cut(pieces: Iterator[str], max_carry: int) -> Iterator[str]:
  """Re-cuts pieces at line ends (a single over-long line is cut after `max_carry` characters)."""
  carry = ''
  for piece in pieces:
    buf = carry + piece
    cut = buf.rfind('\n') + 1
    if cut == 0 and len(buf) < max_carry:
      carry = buf
      continue
    cut = cut or len(buf)
    yield buf[:cut]
    carry = buf[cut:]
  if carry:
    yield carry


class _ShardWriter:
  """Fills a fixed buffer with token ids and writes it out as the next shard whenever it is full."""

  def __init__(self, out_dir: str, shard_tokens: int):
    self.out_dir, self.shard_tokens = out_dir, shard_tokens
    self.buf = np.empty(shard_tokens, DTYPE)
    self.fill = 0
    self.shards: list[dict[str, Any]] = []

  def add(self, ids: np.ndarray) -> None:
    while ids.size:
      n = min(ids.size, self.shard_tokens - self.fill)
      self.buf[self.fill:self.fill + n] = ids[:n]
      self.fill += n
      ids = ids[n:]
      if self.fill == self.shard_tokens:
        self.flush()

  def flush(self) -> None:
    if not self.fill:
      return
    name = shard_name(len(self.shards))
    data = memoryview(self.buf[:self.fill]).cast('B')  # No copy of the shard in memory.
    tmp = os.path.join(self.out_dir, name + '.tmp')
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.path.join(self.out_dir, name))
    self.shards.append({'file': name, 'tokens': self.fill, 'sha256': hashlib.sha256(data).hexdigest()})
    self.fill = 0


def write_shards(source: str, out_dir: str, tokenizer: Any = 'char', *, shard_tokens: int = 1 << 24,
                 chunk_chars: int = 1 << 20, overwrite: bool = False, verbose: bool = True,
                 ) -> dict[str, Any]:
  """Tokenizes `source` (a text file or folder of *.txt) into shards in `out_dir`; returns the index.

  `tokenizer`: 'char' (built from the corpus in a first pass) or a tokenizer object.
  """
  if shard_tokens < 1 or chunk_chars < 1:
    raise UserError(f'shard_tokens and chunk_chars must be >= 1 (got {shard_tokens}, {chunk_chars})')
  source = os.path.expanduser(source)
  if not os.path.exists(source):
    raise UserError(f'{source} does not exist; pass a text file or a folder of .txt files.')
  files = data_lib.source_files(source)
  out_dir = os.path.expanduser(out_dir)
  index_path = os.path.join(out_dir, INDEX)
  if os.path.exists(index_path) and not overwrite:
    raise UserError(f'{out_dir} already holds a sharded dataset ({INDEX}); pass --overwrite to '
                    'replace it, or choose another output folder.')
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(index_path):
    os.remove(index_path)  # First: a crash from here on leaves 'no dataset', never a stale mix.
  for old in glob.glob(os.path.join(out_dir, 'shard_*.bin')):
    os.remove(old)

  if tokenizer == 'char':  # First pass: the vocabulary is the set of characters of the corpus.
    chars: set[str] = set()
    for piece in stream_text(files, chunk_chars):
      chars.update(piece)
    if not chars:
      raise UserError(f'{source} is empty; give text to tokenize.')
    tokenizer = tokenizer_lib.CharTokenizer(sorted(chars))
  elif isinstance(tokenizer, str):
    raise UserError(f"tokenizer {tokenizer!r}: use 'char' or pass a tokenizer object.")
  if tokenizer.vocab_size > 1 << 16:
    raise UserError(f'the tokenizer has {tokenizer.vocab_size:,} ids; uint16 shards hold at most '
                    '65,536.')

  writer = _ShardWriter(out_dir, shard_tokens)
  pieces = stream_text(files, chunk_chars)
  if not isinstance(tokenizer, tokenizer_lib.CharTokenizer):
    pieces = _line_cut(pieces, 4 * chunk_chars)  # Chunk edges may not split a word for subwords.
  n_chars = 0
  for piece in pieces:
    n_chars += len(piece)
    writer.add(np.asarray(data_lib.encode_text(tokenizer, piece), DTYPE))
  writer.flush()
  if not writer.shards:
    raise UserError(f'{source} produced no tokens; give text to tokenize.')

  index = {
      'format': FORMAT, 'version': VERSION, 'dtype': DTYPE.name,
      'tokenizer': tokenizer.to_dict(), 'vocab_size': int(tokenizer.vocab_size),
      'shard_tokens': int(shard_tokens), 'total_tokens': int(sum(s['tokens'] for s in writer.shards)),
      'chars': n_chars, 'shards': writer.shards,
      'source': os.path.abspath(source), 'source_sha256': data_lib.source_sha256(files),
      'source_files': [os.path.relpath(p, source).replace(os.sep, '/') if os.path.isdir(source)
                       else os.path.basename(p) for p in files],
  }
  tmp = index_path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(index, f, indent=1, ensure_ascii=False)
  os.replace(tmp, index_path)
  if verbose:
    print(f'wrote {len(writer.shards)} shard(s), {index["total_tokens"]:,} tokens (vocab '
          f'{tokenizer.vocab_size:,}) from {len(files)} file(s) to {out_dir}')
  return index


# --- reading ---------------------------------------------------------------------------------------

def read_index(directory: str) -> dict[str, Any]:
  path = os.path.join(os.path.expanduser(directory), INDEX)
  try:
    with open(path, encoding='utf-8') as f:
      index = json.load(f)
  except FileNotFoundError:
    raise UserError(f'no sharded dataset in {directory} ({INDEX} is missing: not written yet, or '
                    'the writer was interrupted); run scripts/prepare_shards.py.') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e}); re-create the dataset.') from None
  if not isinstance(index, dict) or index.get('format') != FORMAT or index.get('version') != VERSION:
    raise UserError(f'{path} is not a gpt_jax sharded-dataset index (version {VERSION}).')
  return index


def check_shards(directory: str, index: dict[str, Any], verify: bool = True) -> None:
  """Raises a UserError naming the first missing, truncated or (with `verify`) damaged shard."""
  for s in index['shards']:
    path = os.path.join(directory, s['file'])
    if not os.path.isfile(path):
      raise UserError(f'shard {s["file"]} of {directory} is missing; re-create the dataset.')
    size = os.path.getsize(path)
    if size != s['tokens'] * DTYPE.itemsize:
      raise UserError(f'shard {s["file"]} of {directory} has {size:,} bytes, expected '
                      f'{s["tokens"] * DTYPE.itemsize:,} (truncated?); re-create the dataset.')
    if verify and data_lib.sha256_file(path) != s['sha256']:
      raise UserError(f'shard {s["file"]} of {directory} is damaged: its SHA-256 does not match the '
                      'index; re-create the dataset (or restore that file).')


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> np.ndarray:
  """The global batch rows held by this process's devices, in the order that
  `jax.make_array_from_process_local_data` expects its local rows (sorted by position)."""
  starts, rows = set(), None
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    sl = index[0]
    start, stop = sl.start or 0, shape[0] if sl.stop is None else sl.stop
    starts.add(start)
    rows = stop - start
  return np.concatenate([np.arange(s, s + rows) for s in sorted(starts)])


class ShardedTokens:
  """A sharded token dataset opened by memmap, drawing deterministic batches for (seed, step)."""

  def __init__(self, directory: str, seed: int = 0, verify: bool = True):
    self.directory = os.path.expanduser(directory)
    self.index = read_index(self.directory)
    check_shards(self.directory, self.index, verify)
    self.seed = int(seed)
    self.shards = [np.memmap(os.path.join(self.directory, s['file']), dtype=DTYPE, mode='r')
                   for s in self.index['shards']]
    self.sizes = np.array([s['tokens'] for s in self.index['shards']], np.int64)

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.tokenizer_from_dict(self.index['tokenizer'])

  @property
  def total_tokens(self) -> int:
    return int(self.sizes.sum())

  def windows(self, step: int, batch_size: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, offset) of all `batch_size` windows of the global batch of `step`."""
    valid = np.maximum(self.sizes - block_size, 0)  # Window starts that fit inside each shard.
    ends = np.cumsum(valid)
    if ends[-1] == 0:
      raise UserError(f'no shard in {self.directory} has more than block_size = {block_size} tokens; '
                      'use a smaller block_size or larger shards.')
    rng = np.random.default_rng([self.seed, int(step)])
    g = rng.integers(0, ends[-1], size=batch_size)
    shard = np.searchsorted(ends, g, side='right')
    return shard, g - (ends[shard] - valid[shard])

  def host_batch(self, step: int, batch_size: int, block_size: int,
                 rows: Optional[np.ndarray] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the global batch of `step`: inputs x and targets y, int32 (n, T).

    `rows` picks global rows explicitly; otherwise the block `process_index` of `process_count`
    (default: this process of all), which needs batch_size divisible by process_count.
    """
    if rows is None:
      p = jax.process_index() if process_index is None else process_index
      n = jax.process_count() if process_count is None else process_count
      if batch_size % n:
        raise UserError(f'batch_size={batch_size} does not split over {n} processes.')
      rows = np.arange(p * batch_size // n, (p + 1) * batch_size // n)
    shard, offset = self.windows(step, batch_size, block_size)
    win = np.stack([self.shards[s][o:o + block_size + 1] for s, o in zip(shard[rows], offset[rows])])
    win = win.astype(np.int32)  # Only the selected windows are read from disk.
    return win[:, :-1], win[:, 1:]

  def global_batch(self, step: int, batch_size: int, block_size: int,
                   sharding: jax.sharding.Sharding) -> tuple[jax.Array, jax.Array]:
    """The global batch of `step` as (x, y) jax.Arrays with `sharding`, each process feeding
    only the rows its own devices hold."""
    shape = (batch_size, block_size)
    rows = process_rows(sharding, shape)
    x, y = self.host_batch(step, batch_size, block_size, rows=rows)
    return (jax.make_array_from_process_local_data(sharding, x, shape),
            jax.make_array_from_process_local_data(sharding, y, shape))

"""Sharded token datasets: a corpus of any size as numbered uint16 files, streamed in and out.

For corpora too big to tokenize in memory or to replicate on every device (TinyShakespeare is
neither; see gpt_jax/data/text.py for the in-memory path).

Writing (`write_shards`, scripts/prepare_shards.py). A text file or a folder of `*.txt` files
(the same files, order and separator as gpt_jax/data/text.py) is read in chunks of `chunk_chars`
characters, encoded, and appended to `shard_000000.bin`, `shard_000001.bin`, ... of `shard_tokens`
tokens each (the last one shorter): raw uint16 ids, memmap-able. Memory stays flat whatever the
corpus size: one chunk of text and one shard buffer. The char tokenizer is built by a first
streaming pass (the sorted set of characters). Any other tokenizer object with
encode/decode/to_dict/vocab_size (e.g. a saved BPE) encodes chunks cut at line ends, so a word is
never split between two encode calls. `index.json`, written last (a crash leaves no index, never a
half-written dataset that looks complete), holds the tokenizer, every shard's token count and
SHA-256, and the source's SHA-256.

Training (`write_splits`, `prepare`, `load`; scripts/prepare_data.py with data.shards_dir). The
text is split as in gpt_jax/data/text.py (the first 1 - val_fraction of its characters train, the rest
val) into two such shard sets, `shards_dir/train` and `shards_dir/val`; val/index.json is written
last, so both indexes present means a complete dataset. Training draws step k's batch from the train
set with (train.seed, k) and evaluation batch i from either set with a fixed eval seed, so every
eval sees the same batches (gpt_jax/training/evaluator.py).

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

import copy
import glob
import hashlib
import json
import os
import shlex
from typing import Any, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np

from gpt_jax import files as files_lib
from gpt_jax.data import text as text_lib, tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

FORMAT = 'gpt_jax.shards'
VERSION = 1
INDEX = 'index.json'
DTYPE = np.dtype(np.uint16)
SPLITS = ('train', 'val')  # The sub-folders of a dataset for training (`write_splits`).


def shard_name(i: int) -> str:
  return f'shard_{i:06d}.bin'


# --- writing ---------------------------------------------------------------------------------------

def stream_text(files: Sequence[str], chunk_chars: int) -> Iterator[str]:
  """The files' text, joined by data.FILE_SEPARATOR, in pieces of at most `chunk_chars` characters."""
  for i, path in enumerate(files):
    if i:
      yield text_lib.FILE_SEPARATOR
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
    files_lib.write_bytes(os.path.join(self.out_dir, name), data, 'the token shard')
    self.shards.append({'file': name, 'tokens': self.fill, 'sha256': hashlib.sha256(data).hexdigest()})
    self.fill = 0


def _check_sizes(shard_tokens: int, chunk_chars: int) -> None:
  if shard_tokens < 1 or chunk_chars < 1:
    raise UserError(f'shard_tokens and chunk_chars must be >= 1 (got {shard_tokens}, {chunk_chars})')


def _source(source: str) -> tuple[str, list[str]]:
  """The source path (user-expanded) and its files, or a UserError if it does not exist."""
  source = os.path.expanduser(source)
  if not os.path.exists(source):
    raise UserError(f'{source} does not exist; pass a text file or a folder of .txt files.')
  return source, text_lib.source_files(source)


def _clear(out_dir: str) -> None:
  """Removes a dataset in `out_dir` (index first: a crash from here on leaves 'no dataset', never a
  stale mix) and makes sure the folder exists."""
  files_lib.make_dir(out_dir, 'the shards folder')
  index_path = os.path.join(out_dir, INDEX)
  with files_lib.guard(out_dir, 'clear the shards folder'):
    if os.path.exists(index_path):
      os.remove(index_path)
    for old in glob.glob(os.path.join(out_dir, 'shard_*.bin')):
      os.remove(old)


def _scan(files: Sequence[str], chunk_chars: int) -> tuple[int, set[str]]:
  """A first streaming pass: the number of characters and the set of characters."""
  n_chars, chars = 0, set()
  for piece in stream_text(files, chunk_chars):
    n_chars += len(piece)
    chars.update(piece)
  return n_chars, chars


def _checked_tokenizer(tokenizer: Any, chars: set[str]) -> Any:
  """'char' (from the corpus's characters `chars`) or a tokenizer object whose ids fit in uint16."""
  if tokenizer == 'char':
    tokenizer = tokenizer_lib.CharTokenizer(sorted(chars))
  elif isinstance(tokenizer, str):
    raise UserError(f"tokenizer {tokenizer!r}: use 'char' or pass a tokenizer object.")
  if tokenizer.vocab_size > 1 << 16:
    raise UserError(f'the tokenizer has {tokenizer.vocab_size:,} ids; uint16 shards hold at most '
                    '65,536.')
  return tokenizer


def _encode_into(out_dir: str, pieces: Iterator[str], tokenizer: Any, shard_tokens: int,
                 chunk_chars: int) -> tuple[list[dict[str, Any]], int]:
  """Encodes a stream of text pieces into shards in `out_dir`: (the shards' entries, characters)."""
  writer = _ShardWriter(out_dir, shard_tokens)
  if not isinstance(tokenizer, tokenizer_lib.CharTokenizer):
    pieces = _line_cut(pieces, 4 * chunk_chars)  # Chunk edges may not split a word for subwords.
  n_chars = 0
  for piece in pieces:
    n_chars += len(piece)
    writer.add(np.asarray(text_lib.encode_text(tokenizer, piece), DTYPE))
  writer.flush()
  return writer.shards, n_chars


def _make_index(tokenizer: Any, shard_tokens: int, shards: list[dict[str, Any]], n_chars: int,
                source: str, files: Sequence[str], source_sha: str, **extra: Any) -> dict[str, Any]:
  return {
      'format': FORMAT, 'version': VERSION, 'dtype': DTYPE.name,
      'tokenizer': tokenizer.to_dict(), 'vocab_size': int(tokenizer.vocab_size),
      'shard_tokens': int(shard_tokens), 'total_tokens': int(sum(s['tokens'] for s in shards)),
      'chars': n_chars, 'shards': shards,
      'source': os.path.abspath(source), 'source_sha256': source_sha,
      'source_files': [os.path.relpath(p, source).replace(os.sep, '/') if os.path.isdir(source)
                       else os.path.basename(p) for p in files],
      **extra,
  }


def _write_index(out_dir: str, index: dict[str, Any]) -> None:
  files_lib.write_json(os.path.join(out_dir, INDEX), index, 'the shard index')


def write_shards(source: str, out_dir: str, tokenizer: Any = 'char', *, shard_tokens: int = 1 << 24,
                 chunk_chars: int = 1 << 20, overwrite: bool = False, verbose: bool = True,
                 ) -> dict[str, Any]:
  """Tokenizes `source` (a text file or folder of *.txt) into shards in `out_dir`; returns the index.

  `tokenizer`: 'char' (built from the corpus in a first pass) or a tokenizer object.
  """
  _check_sizes(shard_tokens, chunk_chars)
  source, files = _source(source)
  out_dir = os.path.expanduser(out_dir)
  if os.path.exists(os.path.join(out_dir, INDEX)) and not overwrite:
    raise UserError(f'{out_dir} already holds a sharded dataset ({INDEX}); pass --overwrite to '
                    'replace it, or choose another output folder.')
  _clear(out_dir)

  chars: set[str] = set()
  if tokenizer == 'char':  # First pass: the vocabulary is the set of characters of the corpus.
    chars = _scan(files, chunk_chars)[1]
    if not chars:
      raise UserError(f'{source} is empty; give text to tokenize.')
  tokenizer = _checked_tokenizer(tokenizer, chars)
  shards, n_chars = _encode_into(out_dir, stream_text(files, chunk_chars), tokenizer, shard_tokens,
                                 chunk_chars)
  if not shards:
    raise UserError(f'{source} produced no tokens; give text to tokenize.')
  index = _make_index(tokenizer, shard_tokens, shards, n_chars, source, files,
                      text_lib.source_sha256(files))
  _write_index(out_dir, index)  # Last: a crash leaves no index, never a half-written dataset.
  if verbose:
    print(f'wrote {len(shards)} shard(s), {index["total_tokens"]:,} tokens (vocab '
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
                    'the writer was interrupted); run scripts/prepare_shards.py (one shard set) or '
                    'scripts/prepare_data.py --config.data.shards_dir=DIR (train/val sets for '
                    'training).') from None
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
    if verify and text_lib.sha256_file(path) != s['sha256']:
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

  def with_seed(self, seed: int) -> 'ShardedTokens':
    """The same dataset (memmaps shared, not verified again) drawing another stream of batches."""
    other = copy.copy(self)
    other.seed = int(seed)
    return other


# --- train/val datasets for training ---------------------------------------------------------------

def _split_stream(pieces: Iterator[str], n: int) -> tuple[Iterator[str], Iterator[str]]:
  """The first `n` characters of a stream of pieces, and the rest (consume the first one fully
  before the second: both read the same underlying stream, once)."""
  pieces = iter(pieces)
  rest: list[str] = []

  def head() -> Iterator[str]:
    left = n
    for piece in pieces:
      if len(piece) >= left:
        if left:
          yield piece[:left]
        if len(piece) > left:
          rest.append(piece[left:])
        return
      left -= len(piece)
      yield piece

  def tail() -> Iterator[str]:
    yield from rest
    yield from pieces

  return head(), tail()


def write_splits(source: str, out_dir: str, tokenizer: Any = 'char', val_fraction: float = 0.1, *,
                 shard_tokens: int = 1 << 24, chunk_chars: int = 1 << 20, overwrite: bool = False,
                 verbose: bool = True, settings: Optional[dict[str, Any]] = None,
                 ) -> dict[str, dict[str, Any]]:
  """Tokenizes `source` into two shard sets, `out_dir/train` and `out_dir/val`; returns their indexes.

  The split is gpt_jax/data/text.py's: the first 1 - val_fraction of the characters of the (joined) text
  are train, the rest val, each encoded separately; with the char tokenizer the train shards hold
  exactly data.py's train.bin. One pass counts the characters (and collects them for 'char'), a
  second one streams the text into the train writer up to the split point, then into the val writer.
  Each index records its `split`, the character span `split_chars` and the data `settings` (e.g.
  data.tokenizer_settings of the config); val/index.json is written last, so both indexes present
  means a complete dataset.
  """
  _check_sizes(shard_tokens, chunk_chars)
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f'val_fraction must be between 0 and 1 (got {val_fraction})')
  source, files = _source(source)
  out_dir = os.path.expanduser(out_dir)
  if not overwrite and any(os.path.exists(os.path.join(out_dir, s, INDEX)) for s in SPLITS):
    raise UserError(f'{out_dir} already holds a sharded dataset; re-prepare it with --force, or '
                    'choose another folder.')
  for split in reversed(SPLITS):  # val's index first: from here on the dataset reads as incomplete.
    _clear(os.path.join(out_dir, split))

  n_chars, chars = _scan(files, chunk_chars)
  if not n_chars:
    raise UserError(f'{source} is empty; give text to tokenize.')
  tokenizer = _checked_tokenizer(tokenizer, chars)
  if settings is None:
    settings = {'tokenizer': tokenizer.to_dict()['type'], 'val_fraction': float(val_fraction)}
  n_train = int(n_chars * (1.0 - val_fraction))  # Character split, as gpt_jax/data/text.py.
  source_sha = text_lib.source_sha256(files)
  train_pieces, val_pieces = _split_stream(stream_text(files, chunk_chars), n_train)
  indexes = {}
  for split, pieces, span in (('train', train_pieces, [0, n_train]),
                              ('val', val_pieces, [n_train, n_chars])):
    split_dir = os.path.join(out_dir, split)
    shards, n = _encode_into(split_dir, pieces, tokenizer, shard_tokens, chunk_chars)
    if not shards:
      raise UserError(f'the {split} split of {source} is empty (characters {span[0]:,} to '
                      f'{span[1]:,}); give more text or another val_fraction.')
    indexes[split] = _make_index(tokenizer, shard_tokens, shards, n, source, files, source_sha,
                                 split=split, split_chars=span, settings=settings)
    _write_index(split_dir, indexes[split])
  if verbose:
    print(f'wrote {out_dir}: {indexes["train"]["total_tokens"]:,} train / '
          f'{indexes["val"]["total_tokens"]:,} val tokens in '
          f'{len(indexes["train"]["shards"])} + {len(indexes["val"]["shards"])} shard(s) (vocab '
          f'{tokenizer.vocab_size:,}) from {len(files)} file(s)')
  return indexes


def shard_settings(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The data settings a sharded dataset is prepared with (data.tokenizer_settings of the config)."""
  settings = text_lib.tokenizer_settings(data_cfg)
  if settings['tokenizer'] == 'bpe':
    raise UserError("data.tokenizer='bpe' cannot be used with data.shards_dir: its vocabulary is "
                    'trained on the whole training text in memory, which shards exist to avoid. Use '
                    "data.tokenizer='char' or 'gpt2', or a saved tokenizer with "
                    'scripts/prepare_shards.py --tokenizer.')
  return settings


def prepare_command(data_cfg: ml_collections.ConfigDict) -> str:
  """The prepare_data.py command that (re-)creates `data.shards_dir` from the config's data settings."""
  d = data_cfg
  args = [f'--config.data.shards_dir={d.shards_dir}']
  if d.text_path:
    args.append(f'--config.data.text_path={d.text_path}')
  args += [f'--config.data.tokenizer={d.tokenizer}', f'--config.data.val_fraction={d.val_fraction}',
           f'--config.data.shard_tokens={d.get("shard_tokens", 1 << 24)}']
  if d.get('gpt2_dir'):
    args.append(f'--config.data.gpt2_dir={d.gpt2_dir}')
  return 'python scripts/prepare_data.py ' + ' '.join(shlex.quote(a) for a in args) + ' --force'


def _find(shards_dir: str) -> tuple[Optional[dict[str, dict[str, Any]]], str]:
  """({split: index}, '') for a complete dataset; (None, '') for an absent or empty folder; else
  (None, what is wrong with it)."""
  if not os.path.exists(shards_dir) or (os.path.isdir(shards_dir) and not os.listdir(shards_dir)):
    return None, ''
  if not os.path.isdir(shards_dir):
    return None, 'is a file, not a folder'
  missing = [f'{s}/{INDEX}' for s in SPLITS if not os.path.isfile(os.path.join(shards_dir, s, INDEX))]
  if not missing:
    return {s: read_index(os.path.join(shards_dir, s)) for s in SPLITS}, ''
  if os.path.isfile(os.path.join(shards_dir, INDEX)):
    return None, ('holds a single shard set (from scripts/prepare_shards.py), not the train/ and '
                  'val/ sets that training reads')
  if any(os.path.isdir(os.path.join(shards_dir, s)) for s in SPLITS):
    return None, (f'is an incomplete sharded dataset ({" and ".join(missing)} missing: the '
                  'preparation was interrupted?)')
  return None, f'holds no sharded dataset (no train/{INDEX} and val/{INDEX})'


def prepare(data_cfg: ml_collections.ConfigDict, force: bool = False, verbose: bool = True,
            ) -> dict[str, dict[str, Any]]:
  """Makes sure `data.shards_dir` holds the train/val shards of the configured text; their indexes.

  An absent or empty folder is prepared from the source (data.text_path, or the cached/downloaded
  default text, as gpt_jax/data/text.py). A complete dataset is used as it is, without reading the
  source again (re-hashing a large corpus at every start would cost as much as a pass over it);
  one prepared with other data settings, an incomplete one, or a folder holding anything else is a
  UserError naming the command that re-prepares it (`force` re-prepares unconditionally).
  """
  shards_dir = os.path.expanduser(data_cfg.shards_dir)
  settings = shard_settings(data_cfg)
  found, why = _find(shards_dir)
  if why == 'is a file, not a folder':
    raise UserError(f'data.shards_dir {shards_dir} is a file; point it at a folder (a new one, or '
                    'one prepared by scripts/prepare_data.py).')
  if found is not None and not force:
    old = found['train'].get('settings')
    if old != settings:
      change = text_lib._describe_change(old or {}, settings)
      raise UserError(f'{shards_dir} was prepared with other data settings ({change}). Re-prepare it '
                      f'with: {prepare_command(data_cfg)}  (or point data.shards_dir at a new '
                      'folder).')
    if verbose:
      print(f'{shards_dir} is prepared ({old["tokenizer"]}, vocab {found["train"]["vocab_size"]:,}: '
            f'{found["train"]["total_tokens"]:,} train / {found["val"]["total_tokens"]:,} val tokens '
            f'from {found["train"]["source"]}); --force re-prepares it')
    return found
  if why and not force:
    raise UserError(f'data.shards_dir {shards_dir} {why}. Prepare it with: '
                    f'{prepare_command(data_cfg)}  (or point data.shards_dir at a new folder).')
  source = text_lib.find_text(data_cfg)
  tok: Any = 'char'
  if settings['tokenizer'] == 'gpt2':
    from gpt_jax.data import bpe  # Imported lazily: only BPE users need the `regex` package.
    tok = bpe.load_gpt2_tokenizer(*text_lib.find_gpt2_files(data_cfg))
  if verbose:
    print(f'preparing token shards in {shards_dir} from {source}')
  return write_splits(source, shards_dir, tok, float(data_cfg.val_fraction),
                      shard_tokens=int(data_cfg.shard_tokens), overwrite=True,
                      verbose=verbose, settings=settings)


class ShardedSplits:
  """A prepared train/val sharded dataset: two ShardedTokens drawing batches for (seed, step)."""

  def __init__(self, directory: str, seed: int = 0, verify: bool = True, hint: str = ''):
    self.directory = os.path.expanduser(directory)
    try:
      self.train, self.val = (ShardedTokens(os.path.join(self.directory, s), seed, verify)
                              for s in SPLITS)
    except UserError as e:
      raise UserError(f'{e} {hint}'.strip()) from None
    if self.train.index['tokenizer'] != self.val.index['tokenizer']:
      raise UserError(f'the train and val shards in {self.directory} have different tokenizers; '
                      f're-create the dataset. {hint}'.strip())
    self.tokenizer = self.train.tokenizer
    self.hint = hint
    index = self.train.index
    kind = (index.get('settings') or {}).get('tokenizer', index['tokenizer']['type'])
    self.meta = {'tokenizer': kind,
                 'vocab_size': int(index['vocab_size']), 'source_sha256': index['source_sha256'],
                 'shards_dir': os.path.abspath(self.directory),
                 'train_tokens': self.train.total_tokens, 'val_tokens': self.val.total_tokens}

  def check_block_size(self, block_size: int) -> None:
    """A UserError unless every split has a shard longer than block_size (one window + target)."""
    for split, ds in (('train', self.train), ('val', self.val)):
      if ds.sizes.max() <= block_size:
        raise UserError(
            f'the {split} shards in {self.directory} hold at most {ds.sizes.max():,} tokens each '
            f'({ds.total_tokens:,} in all), not more than model.block_size = {block_size}. Use a '
            'smaller model.block_size, or re-prepare with a larger data.shard_tokens (or more text '
            f'/ another data.val_fraction if the split itself is that short). {self.hint}'.strip())


def load(data_cfg: ml_collections.ConfigDict, seed: int, verbose: bool = True) -> ShardedSplits:
  """Prepares `data.shards_dir` if it is absent (see `prepare`), then opens and verifies it."""
  prepare(data_cfg, verbose=verbose)
  return ShardedSplits(data_cfg.shards_dir, seed,
                       hint=f'To re-create the dataset: {prepare_command(data_cfg)}')

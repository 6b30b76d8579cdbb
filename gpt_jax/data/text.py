"""Text data: find the text, tokenize it once into token files (train.bin / val.bin), open them.

Source. `data.text_path` is a text file or a folder of text files. Empty means the copy shipped
inside the package (`gpt_jax/data/assets/`, listed in its SHA256SUMS) when `data.sha256` names it, so a
fresh clone or `pip install` trains offline; else the cached copy of `data.url`; else a download kept
only if its SHA-256 matches. A folder contributes every `*.txt` file
below it (recursively, hidden files and folders skipped) in sorted order of their relative paths,
joined by `FILE_SEPARATOR` (one blank line); `source_sha256` is then the SHA-256 of those files'
bytes joined by the same separator, so it covers all of them, in order (for a single file it is just
the file's SHA-256).

Tokenizers (`data.tokenizer`):
  char  the sorted set of characters of the whole text (65 for TinyShakespeare).
  gpt2  GPT-2's byte-level BPE (50,257 ids) from `data.gpt2_dir` (a folder with encoder.json and
        vocab.bpe); empty means the shipped copy (`gpt_jax/data/assets/gpt2/`), else the cached copy in
        `cache_dir/gpt2`, else a download from OpenAI's canonical URLs, kept only if its SHA-256
        matches.
  bpe   a compact byte-level BPE of `data.bpe_vocab_size` ids trained by `bpe.train_bpe` on the
        *training split only*, so no statistics of the validation text leak into the tokenizer.

The text is split by characters first (the first 1 - val_fraction of it is train, the rest val) and
each part is encoded separately, as nanoGPT's prepare scripts do. Text that spells a special token
('<|endoftext|>') is encoded as ordinary text: a corpus is data, not control codes, so a stray
'<|endoftext|>' in it never becomes the document-boundary id. GPT-2's vocabulary is encoded with
tiktoken's Rust encoder (`BPETokenizer.encode_fast`, proven id-for-id identical to the hand-written
one on all of TinyShakespeare), every other vocabulary with the hand-written encoder.

Preparation (`prepare`) writes into `data_dir`:
  train.bin, val.bin   token ids in numpy `tofile` format (memmap-able): uint16 while every id fits
                       (vocab_size <= 65,536, which covers GPT-2's 50,257), else uint32
  tokenizer.json       the tokenizer, JSON
  meta.json            tokenizer kind and settings, vocab size, dtype, split sizes in tokens and in
                       characters (for bits per character), and SHA-256 of the source and of every
                       file written, so a stale or truncated preparation is caught and redone.
A preparation is stale when the source, the tokenizer settings (kind, bpe_vocab_size, the GPT-2
files) or val_fraction change.

Batches are drawn from these splits by gpt_jax/data/batches.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import ml_collections
import numpy as np

from gpt_jax import files as files_lib
from gpt_jax.data import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

META_VERSION = 2
TOKENIZERS = ('char', 'gpt2', 'bpe')
FILE_SEPARATOR = '\n\n'  # Between the files of a folder source: one blank line.

# OpenAI's canonical GPT-2 tokenizer files and their SHA-256.
GPT2_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
GPT2_FILES = {
    'encoder.json': '3883827140ce17ad540fb21b7fd97c35f50e6ffc1435b0af34e465012286275b',
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
}

# Files shipped inside the package (TinyShakespeare; GPT-2's encoder.json and vocab.bpe), found by
# their SHA-256 through the SHA256SUMS file beside them; gpt_jax/data/assets/README.md gives their sources.
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / 'assets'

_TEXT_HINT = '--config.data.text_path=/path/to/input.txt'
_GPT2_HINT = '--config.data.gpt2_dir=DIR (a folder holding encoder.json and vocab.bpe)'


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with files_lib.guard(path, 'read'), open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 while every id (0 .. vocab_size - 1) fits in it, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- finding files ---------------------------------------------------------------------------------

def download(url: str, dest: str, sha256: str, timeout: float = 30.0, how_to_pass: str = _TEXT_HINT,
             ) -> None:
  """Downloads `url` to `dest`, keeping it only if its SHA-256 matches.

  `how_to_pass` names the config flag that gives the file without a download (for the messages).
  """
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or '.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as resp:
      shutil.copyfileobj(resp, out)
    got = sha256_file(tmp)
    if sha256 and got != sha256:
      raise UserError(f'the file downloaded from {url} has SHA-256 {got}, expected {sha256}; '
                      f'it was not kept. Download it yourself and pass {how_to_pass}.')
    os.replace(tmp, dest)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise UserError(f'could not download {url} ({e}). If this machine is offline, get the file '
                    f'another way and pass it with {how_to_pass}') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def shipped_files() -> dict[str, pathlib.Path]:
  """SHA-256 -> path of every file shipped in gpt_jax/data/assets (from its SHA256SUMS)."""
  sums = ASSETS_DIR / 'SHA256SUMS'
  if not sums.is_file():
    return {}
  out = {}
  for line in sums.read_text(encoding='utf-8').splitlines():
    if line.strip():
      digest, name = line.split(maxsplit=1)
      out[digest] = ASSETS_DIR / name.lstrip('*')
  return out


def shipped_copy(sha256: str) -> str | None:
  """The shipped file with this SHA-256, verified; None if none is shipped or the copy is damaged."""
  path = shipped_files().get(sha256)
  if path is None or not path.is_file():
    return None
  if sha256_file(str(path)) != sha256:  # A damaged install: say so once, then use the cache.
    print(f'note: the shipped copy {path} does not match its SHA-256 (reinstall gpt_jax to mend it); '
          'using the cache or a download instead')
    return None
  return str(path)


def fetch(url: str, sha256: str, cached: str, how_to_pass: str = _TEXT_HINT) -> str:
  """The shipped copy if one has this SHA-256, else the cached copy of `url` if its SHA-256 matches,
  else a verified download."""
  shipped = shipped_copy(sha256) if sha256 else None
  if shipped:
    return shipped
  if os.path.isfile(cached) and (not sha256 or sha256_file(cached) == sha256):
    return cached
  print(f'downloading {url} -> {cached}')
  download(url, cached, sha256, how_to_pass=how_to_pass)
  return cached


def find_text(data_cfg: ml_collections.ConfigDict) -> str:
  """The source: the configured file or folder, else the shipped copy, else the cache, else a download."""
  if data_cfg.text_path:
    path = os.path.expanduser(data_cfg.text_path)
    if not (os.path.isfile(path) or os.path.isdir(path)):
      raise UserError(f'data.text_path {path!r} does not exist; pass an existing text file or '
                      'folder of .txt files, or leave data.text_path empty to use '
                      'TinyShakespeare (shipped with gpt_jax).')
    return path
  cached = os.path.join(os.path.expanduser(data_cfg.cache_dir),
                        os.path.basename(data_cfg.url.rstrip('/')) or 'input.txt')
  return fetch(data_cfg.url, data_cfg.sha256, cached)


def find_gpt2_files(data_cfg: ml_collections.ConfigDict) -> tuple[str, str]:
  """(encoder.json, vocab.bpe): data.gpt2_dir, else the shipped copies, else the cache, else a download."""
  gpt2_dir = data_cfg.gpt2_dir
  if gpt2_dir:
    gpt2_dir = os.path.expanduser(gpt2_dir)
    paths = tuple(os.path.join(gpt2_dir, name) for name in GPT2_FILES)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise UserError(f'data.gpt2_dir {gpt2_dir!r} has no {os.path.basename(missing[0])}; point it '
                      f'at a folder holding GPT-2\'s encoder.json and vocab.bpe (from {GPT2_URL}), '
                      'or leave it empty to use the copy shipped with gpt_jax.')
    return paths  # type: ignore[return-value]
  cache = os.path.join(os.path.expanduser(data_cfg.cache_dir), 'gpt2')
  return tuple(fetch(GPT2_URL + name, sha, os.path.join(cache, name), _GPT2_HINT)  # type: ignore
               for name, sha in GPT2_FILES.items())


def source_files(path: str) -> list[str]:
  """The files of a source: the file itself, or a folder's `*.txt` files in sorted order."""
  if os.path.isfile(path):
    return [path]
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    found += [os.path.relpath(os.path.join(root, f), path) for f in files
              if f.endswith('.txt') and not f.startswith('.')]
  if not found:
    raise UserError(f'the folder {path} holds no .txt files; put the training text in *.txt files '
                    'there, or pass a single file as data.text_path.')
  # Sorted by relative path with '/' separators, so the order is the same on every OS.
  return [os.path.join(path, f) for f in sorted(found, key=lambda f: f.replace(os.sep, '/'))]


def source_sha256(files: Sequence[str]) -> str:
  """SHA-256 of the files' bytes joined by FILE_SEPARATOR (one file: the file's own SHA-256)."""
  h = hashlib.sha256()
  for i, path in enumerate(files):
    if i:
      h.update(FILE_SEPARATOR.encode('utf-8'))
    with files_lib.guard(path, 'read the text'), open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
  return h.hexdigest()


def _read_utf8(path: str) -> str:
  return files_lib.read_text(path, 'the text')


def read_text(path: str) -> str:
  """The text of a source file, or of a folder's files joined by FILE_SEPARATOR; never empty."""
  text = FILE_SEPARATOR.join(_read_utf8(p) for p in source_files(path))
  if not text:
    raise UserError(f'{path} is empty; give a text file with some content to train on.')
  return text


# --- tokenizers ------------------------------------------------------------------------------------

def tokenizer_settings(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything that decides the token files besides the text; a change makes them stale."""
  kind = data_cfg.tokenizer
  if kind not in TOKENIZERS:
    raise UserError(f'data.tokenizer {kind!r} is not supported; use one of {", ".join(TOKENIZERS)}.')
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise UserError(f'data.val_fraction must be between 0 and 1 (got {data_cfg.val_fraction})')
  settings: dict[str, Any] = {'tokenizer': kind, 'val_fraction': float(data_cfg.val_fraction)}
  if kind == 'bpe':
    size = int(data_cfg.bpe_vocab_size)
    if size < 256:
      raise UserError(f"data.tokenizer='bpe' needs data.bpe_vocab_size >= 256 (256 byte tokens plus "
                      f'merges; got {size}); e.g. --config.data.bpe_vocab_size=1024.')
    settings['bpe_vocab_size'] = size
  elif kind == 'gpt2':
    settings['gpt2_sha256'] = {os.path.basename(p): sha256_file(p) for p in find_gpt2_files(data_cfg)}
  return settings


def build_tokenizer(data_cfg: ml_collections.ConfigDict, text: str, train_text: str,
                    verbose: bool = True) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer; a compact BPE is trained on `train_text` (the training split) only."""
  kind = data_cfg.tokenizer
  if kind == 'char':
    # The whole text's characters: a val character missing from the vocabulary could not be encoded.
    return tokenizer_lib.CharTokenizer.from_text(text)
  from gpt_jax.data import bpe  # Imported lazily: only BPE users need the `regex` package.
  if kind == 'gpt2':
    return bpe.load_gpt2_tokenizer(*find_gpt2_files(data_cfg))
  return bpe.train_bpe(train_text, int(data_cfg.bpe_vocab_size), progress=verbose,
                       name=f'bpe{int(data_cfg.bpe_vocab_size)}')


def encode_text(tok: tokenizer_lib.Tokenizer, text: str) -> list[int]:
  """Text -> ids, with special-token text ('<|endoftext|>') encoded as ordinary text.

  BPE vocabularies go through `encode_fast`, which uses tiktoken only for GPT-2's vocabulary (where
  its ids are proven identical) and the hand-written encoder otherwise.
  """
  encode_fast = getattr(tok, 'encode_fast', None)
  if encode_fast is not None:
    return encode_fast(text, allowed_special=frozenset(), disallowed_special=())
  return tok.encode(text)


# --- preparation -----------------------------------------------------------------------------------

def _meta_path(data_dir: str) -> str:
  return os.path.join(data_dir, 'meta.json')


def _describe_change(old: dict, new: dict) -> str:
  keys = sorted(set(old) | set(new), key=lambda k: (k != 'tokenizer', k))
  return ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys
                   if old.get(k) != new.get(k))


# meta.json's keys that reading a preparation relies on, with their types.
_META_KEYS = {'tokenizer': str, 'vocab_size': int, 'dtype': str, 'train_tokens': int, 'val_tokens': int,
              'train_sha256': str, 'val_sha256': str, 'tokenizer_sha256': str}


def _meta_problem(meta: dict) -> str:
  """What is wrong with a meta.json of this version ('' if nothing): a missing key, a bad type or dtype."""
  for key, kind in _META_KEYS.items():
    if key not in meta:
      return f'meta.json has no {key!r}'
    if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
      return f'meta.json has {key}={meta[key]!r}, not a {kind.__name__}'
  try:
    dtype = np.dtype(meta['dtype'])
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind != 'u':
    return f'meta.json has dtype={meta["dtype"]!r}, not an unsigned integer type such as uint16'
  return ''


def check_prepared(data_dir: str, source_sha256: str | None = None,
                   settings: dict[str, Any] | None = None) -> tuple[dict | None, str]:
  """Returns (meta, '') if `data_dir` holds a complete, uncorrupted preparation, else (None, why).

  With `source_sha256` / `settings`, a preparation of another text / with other tokenizer settings
  counts as stale.
  """
  try:
    with files_lib.guard(_meta_path(data_dir), 'read'), open(_meta_path(data_dir), encoding='utf-8') as f:
      meta = json.load(f)
  except FileNotFoundError:
    return None, 'not prepared yet'
  except UserError as e:
    if os.path.isdir(data_dir) and not os.path.exists(_meta_path(data_dir)):
      return None, 'not prepared yet'
    return None, str(e)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None, 'meta.json is not valid JSON'
  if not isinstance(meta, dict) or meta.get('version') != META_VERSION:
    return None, 'meta.json is from another version'
  problem = _meta_problem(meta)
  if problem:
    return None, problem
  if source_sha256 and meta.get('source_sha256') != source_sha256:
    return None, 'the source text has changed since it was prepared'
  if settings is not None and meta.get('settings') != settings:
    change = _describe_change(meta.get('settings') or {}, settings)
    return None, f'the tokenizer settings changed ({change})'
  itemsize = np.dtype(meta['dtype']).itemsize
  for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
      return None, f'{split}.bin is missing'
    if os.path.getsize(path) != itemsize * meta[f'{split}_tokens']:
      return None, f'{split}.bin has the wrong size (truncated?)'
    if sha256_file(path) != meta[f'{split}_sha256']:
      return None, f'{split}.bin does not match its checksum'
  tok_path = os.path.join(data_dir, 'tokenizer.json')
  if not os.path.isfile(tok_path):
    return None, 'tokenizer.json is missing'
  if sha256_file(tok_path) != meta.get('tokenizer_sha256'):
    return None, 'tokenizer.json does not match its checksum'
  return meta, ''


def _prepared_meta(data_dir: str) -> dict | None:
  """meta.json of data_dir if it is one of this version (its files unchecked), else None."""
  try:
    with open(_meta_path(data_dir), encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) and meta.get('version') == META_VERSION else None


def _choose_source(data_cfg: ml_collections.ConfigDict, data_dir: str, force: bool,
                   verbose: bool) -> tuple[str | None, dict | None]:
  """(source to prepare from, or None to use what data_dir holds; that meta) by where data_dir's came from.

  Prepared data records its source (path and SHA-256). A run that names no text keeps using the text
  data_dir was prepared from; one that names a different file than the one prepared there is refused
  (with `force`, prepare_data.py's --force, it replaces it, saying so): a user's corpus is never
  replaced by another text silently.
  """
  old = _prepared_meta(data_dir)
  old_src, old_sha = (old or {}).get('source'), (old or {}).get('source_sha256')
  default_sha = data_cfg.get('sha256') or ''
  if not data_cfg.text_path and old_sha and old_sha != default_sha and old_src:
    # Prepared from the user's own text, and this run names none: that text, not TinyShakespeare.
    if os.path.exists(old_src):
      return old_src, old
    meta, why = check_prepared(data_dir, None, tokenizer_settings(data_cfg))
    if meta is not None:
      if verbose:
        print(f'using {data_dir}, prepared from {old_src} (that text is gone; the prepared files are intact)')
      return None, meta
    raise UserError(f'{data_dir} was prepared from {old_src}, which no longer exists, and cannot be used '
                    f'as it is ({why}); pass --config.data.text_path=TEXT to prepare a text there again, '
                    'or another --config.data.data_dir.')
  source = find_text(data_cfg)
  if old_src and old_sha and os.path.abspath(source) != old_src and not force:
    new_sha = source_sha256(source_files(source))
    if new_sha != old_sha:
      raise UserError(f'{data_dir} holds data prepared from {old_src}, not from {source}; nothing was '
                      f'changed. Give {source} its own --config.data.data_dir (or remove {data_dir}, '
                      'or run scripts/prepare_data.py --force to replace it).')
  elif old_src and force and os.path.abspath(source) != old_src and verbose:
    print(f'replacing the data in {data_dir} (prepared from {old_src}) with {source} (--force)')
  return source, old


def prepare(data_cfg: ml_collections.ConfigDict, force: bool = False, verbose: bool = True) -> dict:
  """Tokenizes the source text into `data_dir` unless an identical preparation is already there."""
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if not data_dir.strip():
    raise UserError('data.data_dir is empty; give the folder for the prepared data, e.g. '
                    '--config.data.data_dir=data/my_text.')
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise UserError(f'data.data_dir {data_dir} is a file, not a folder; pick another '
                    '--config.data.data_dir.')
  source, prepared = _choose_source(data_cfg, data_dir, force, verbose)
  if source is None:
    return prepared  # type: ignore[return-value]
  files = source_files(source)
  source_sha = source_sha256(files)
  settings = tokenizer_settings(data_cfg)
  meta, why = check_prepared(data_dir, source_sha, settings)
  if meta is not None and not force:
    if verbose:
      print(f'{data_dir} is up to date ({meta["tokenizer"]}, vocab {meta["vocab_size"]:,}: '
            f'{meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val tokens)')
    return meta
  if verbose and why != 'not prepared yet':
    print(f're-preparing {data_dir}: {why}')

  text = read_text(source)
  n_train = int(len(text) * (1.0 - data_cfg.val_fraction))  # Character split, as nanoGPT.
  train_text, val_text = text[:n_train], text[n_train:]
  t0 = time.perf_counter()
  tok = build_tokenizer(data_cfg, text, train_text, verbose)
  tokenizer_seconds = time.perf_counter() - t0
  dtype = token_dtype(tok.vocab_size)
  train_ids = np.array(encode_text(tok, train_text), dtype=dtype)
  val_ids = np.array(encode_text(tok, val_text), dtype=dtype)

  files_lib.make_dir(data_dir, 'data_dir')
  # Invalidate first: if we crash half-way, the next run sees 'not prepared', never a mix.
  with files_lib.guard(_meta_path(data_dir), 'replace'), contextlib.suppress(FileNotFoundError):
    os.remove(_meta_path(data_dir))  # (Another process preparing the same folder may have done it.)
  files_lib.write_bytes(os.path.join(data_dir, 'train.bin'), train_ids.tobytes(), 'the prepared data')
  files_lib.write_bytes(os.path.join(data_dir, 'val.bin'), val_ids.tobytes(), 'the prepared data')
  tok_path = os.path.join(data_dir, 'tokenizer.json')
  files_lib.write_text(tok_path, json.dumps(tok.to_dict(), ensure_ascii=False), 'the tokenizer')
  meta = {
      'version': META_VERSION,
      'tokenizer': data_cfg.tokenizer,
      'settings': settings,
      'vocab_size': tok.vocab_size,
      'dtype': dtype.name,
      'train_tokens': int(train_ids.size), 'val_tokens': int(val_ids.size),
      'train_chars': len(train_text), 'val_chars': len(val_text),
      'source': os.path.abspath(source), 'source_sha256': source_sha,
      'train_sha256': hashlib.sha256(train_ids.tobytes()).hexdigest(),
      'val_sha256': hashlib.sha256(val_ids.tobytes()).hexdigest(),
      'tokenizer_sha256': sha256_file(tok_path),
  }
  if os.path.isdir(source):
    meta['source_files'] = [os.path.relpath(p, source).replace(os.sep, '/') for p in files]
  if data_cfg.tokenizer == 'bpe':
    meta['bpe_train_seconds'] = round(tokenizer_seconds, 3)
  files_lib.write_json(_meta_path(data_dir), meta, 'the meta.json')
  if verbose:
    trained = (f' (BPE trained on the train split in {tokenizer_seconds:.1f}s)'
               if data_cfg.tokenizer == 'bpe' else '')
    print(f'prepared {data_dir}: {data_cfg.tokenizer} vocab {tok.vocab_size:,}{trained}, '
          f'{meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val tokens ({dtype.name}) '
          f'from {source}')
  return meta


class Dataset:
  """A prepared dataset: token splits as read-only memmaps, the tokenizer, and the metadata."""

  def __init__(self, data_dir: str):
    self.data_dir = data_dir
    meta, why = check_prepared(data_dir)
    if meta is None:
      raise UserError(f'no usable prepared data in {data_dir} ({why}); run scripts/prepare_data.py')
    self.meta = meta
    self.tokenizer = tokenizer_lib.load_tokenizer(os.path.join(data_dir, 'tokenizer.json'))
    dtype = np.dtype(meta['dtype'])
    self.train = np.memmap(os.path.join(data_dir, 'train.bin'), dtype=dtype, mode='r')
    self.val = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=dtype, mode='r')

  @property
  def directory(self) -> str:
    """Where it lives, under the name data/shards.ShardedSplits uses too."""
    return self.data_dir


def load(data_cfg: ml_collections.ConfigDict, verbose: bool = True) -> Dataset:
  """Prepares the data if needed (or if stale/corrupt), then opens it."""
  prepare(data_cfg, verbose=verbose)
  return Dataset(os.path.expanduser(data_cfg.data_dir))

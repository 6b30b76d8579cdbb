"""Data: find the text, tokenize it once into uint16 token files, and draw batches on the device.

Preparation (`prepare`) writes into `data_dir`:
  train.bin, val.bin   uint16 token ids (memmap-able; numpy `tofile` format)
  tokenizer.json       the tokenizer (vocabulary), JSON
  meta.json            tokenizer kind, vocab size, split sizes, and SHA-256 of the source text and of
                       both token files, so a stale or truncated file is caught before training on it.

Batches are drawn *inside* the jitted train step from the device-resident split with a key derived
from (seed, step): no host->device copy per step, and a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

META_VERSION = 1


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _atomic_write_json(path: str, obj: Any) -> None:
  _atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode('utf-8'))


def download(url: str, dest: str, sha256: str, timeout: float = 30.0) -> None:
  """Downloads `url` to `dest`, keeping it only if its SHA-256 matches."""
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or '.', suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as resp:
      shutil.copyfileobj(resp, out)
    got = sha256_file(tmp)
    if sha256 and got != sha256:
      raise UserError(f'the file downloaded from {url} has SHA-256 {got}, expected {sha256}; '
                      'it was not kept. Download it yourself and pass --config.data.text_path=FILE.')
    os.replace(tmp, dest)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise UserError(f'could not download {url} ({e}). If this machine is offline, get the file '
                    'another way and pass it with --config.data.text_path=/path/to/input.txt') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def find_text(data_cfg: ml_collections.ConfigDict) -> str:
  """Returns the path of the source text: the configured file, else the cache, else a download."""
  if data_cfg.text_path:
    path = os.path.expanduser(data_cfg.text_path)
    if not os.path.isfile(path):
      raise UserError(f'data.text_path {path!r} does not exist or is not a file; pass an existing '
                      'text file, or leave data.text_path empty to use the cached/downloaded copy.')
    return path
  cached = os.path.join(os.path.expanduser(data_cfg.cache_dir),
                        os.path.basename(data_cfg.url.rstrip('/')) or 'input.txt')
  if os.path.isfile(cached) and (not data_cfg.sha256 or sha256_file(cached) == data_cfg.sha256):
    return cached
  print(f'downloading {data_cfg.url} -> {cached}')
  download(data_cfg.url, cached, data_cfg.sha256)
  return cached


def read_text(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text ({e}); convert it to UTF-8 first.') from None
  if not text:
    raise UserError(f'{path} is empty; give a text file with some content to train on.')
  return text


def _meta_path(data_dir: str) -> str:
  return os.path.join(data_dir, 'meta.json')


def check_prepared(data_dir: str, source_sha256: str | None = None) -> tuple[dict | None, str]:
  """Returns (meta, '') if `data_dir` holds a complete, uncorrupted preparation, else (None, why).

  With `source_sha256`, a preparation made from a different text counts as stale.
  """
  try:
    with open(_meta_path(data_dir), encoding='utf-8') as f:
      meta = json.load(f)
  except FileNotFoundError:
    return None, 'not prepared yet'
  except json.JSONDecodeError:
    return None, 'meta.json is not valid JSON'
  if meta.get('version') != META_VERSION:
    return None, 'meta.json is from another version'
  if source_sha256 and meta.get('source_sha256') != source_sha256:
    return None, 'the source text has changed since it was prepared'
  for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.isfile(path):
      return None, f'{split}.bin is missing'
    if os.path.getsize(path) != 2 * meta[f'{split}_tokens']:
      return None, f'{split}.bin has the wrong size (truncated?)'
    if sha256_file(path) != meta[f'{split}_sha256']:
      return None, f'{split}.bin does not match its checksum'
  if not os.path.isfile(os.path.join(data_dir, 'tokenizer.json')):
    return None, 'tokenizer.json is missing'
  return meta, ''


def prepare(data_cfg: ml_collections.ConfigDict, force: bool = False, verbose: bool = True) -> dict:
  """Tokenizes the source text into `data_dir` unless an identical preparation is already there."""
  text_path = find_text(data_cfg)
  source_sha = sha256_file(text_path)
  data_dir = os.path.expanduser(data_cfg.data_dir)
  meta, why = check_prepared(data_dir, source_sha)
  if meta is not None and not force:
    if verbose:
      print(f'{data_dir} is up to date ({meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val tokens)')
    return meta
  if verbose and why != 'not prepared yet':
    print(f're-preparing {data_dir}: {why}')

  text = read_text(text_path)
  if data_cfg.tokenizer != 'char':
    raise UserError(f"data.tokenizer {data_cfg.tokenizer!r} is not supported; use 'char'.")
  tok = tokenizer_lib.CharTokenizer.from_text(text)
  if not 0.0 < data_cfg.val_fraction < 1.0:
    raise UserError(f'data.val_fraction must be between 0 and 1 (got {data_cfg.val_fraction})')
  n_train = int(len(text) * (1.0 - data_cfg.val_fraction))  # Character split, as nanoGPT.
  train_ids = np.array(tok.encode(text[:n_train]), dtype=np.uint16)
  val_ids = np.array(tok.encode(text[n_train:]), dtype=np.uint16)

  os.makedirs(data_dir, exist_ok=True)
  # Invalidate first: if we crash half-way, the next run sees 'not prepared', never a mix.
  if os.path.exists(_meta_path(data_dir)):
    os.remove(_meta_path(data_dir))
  _atomic_write_bytes(os.path.join(data_dir, 'train.bin'), train_ids.tobytes())
  _atomic_write_bytes(os.path.join(data_dir, 'val.bin'), val_ids.tobytes())
  tokenizer_lib.save_tokenizer(tok, os.path.join(data_dir, 'tokenizer.json'))
  meta = {
      'version': META_VERSION,
      'tokenizer': data_cfg.tokenizer,
      'vocab_size': tok.vocab_size,
      'train_tokens': int(train_ids.size), 'val_tokens': int(val_ids.size),
      'train_chars': n_train, 'val_chars': len(text) - n_train,
      'source': os.path.abspath(text_path), 'source_sha256': source_sha,
      'train_sha256': hashlib.sha256(train_ids.tobytes()).hexdigest(),
      'val_sha256': hashlib.sha256(val_ids.tobytes()).hexdigest(),
  }
  _atomic_write_json(_meta_path(data_dir), meta)
  if verbose:
    print(f'prepared {data_dir}: vocab {tok.vocab_size}, {meta["train_tokens"]:,} train / '
          f'{meta["val_tokens"]:,} val tokens from {text_path}')
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
    self.train = np.memmap(os.path.join(data_dir, 'train.bin'), dtype=np.uint16, mode='r')
    self.val = np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.uint16, mode='r')


def load(data_cfg: ml_collections.ConfigDict, verbose: bool = True) -> Dataset:
  """Prepares the data if needed (or if stale/corrupt), then opens it."""
  prepare(data_cfg, verbose=verbose)
  return Dataset(os.path.expanduser(data_cfg.data_dir))


def to_device(tokens: np.ndarray) -> jax.Array:
  """Puts a whole token split on the default device once (uint16: 2 bytes per token)."""
  return jnp.asarray(np.asarray(tokens))


def get_batch(data: jax.Array, key: jax.Array, batch_size: int,
              block_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws `batch_size` random windows from a device-resident token array (jit-friendly).

  Returns inputs x and next-token targets y, both (batch_size, block_size) int32.
  """
  if data.shape[0] < block_size + 1:
    raise UserError(f'the data has only {data.shape[0]} tokens, fewer than block_size + 1 = '
                    f'{block_size + 1}; use a smaller model.block_size or more text.')
  starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)
  windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (block_size + 1,)))(starts)
  windows = windows.astype(jnp.int32)  # (B, T + 1)
  return windows[:, :-1], windows[:, 1:]

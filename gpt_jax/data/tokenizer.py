"""Tokenizers: one small interface, saved and loaded as JSON (never pickle).

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, and
`to_dict()` / `tokenizer_from_dict()` for a JSON round trip. The character tokenizer keeps a 1:1 map
between characters and ids, so every prediction can be traced back to a single character.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence

from gpt_jax.errors import UserError


class Tokenizer(Protocol):
  """What the rest of gpt_jax needs from a tokenizer."""

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
  """Character-level tokenizer: the vocabulary is the sorted set of characters of the corpus."""

  def __init__(self, chars: Sequence[str]):
    chars = list(chars)
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
      raise ValueError('CharTokenizer needs a list of distinct single characters')
    self.chars = chars
    self.stoi = {c: i for i, c in enumerate(chars)}

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list[int]:
    try:
      return [self.stoi[c] for c in text]
    except KeyError:
      unknown = sorted({c for c in text if c not in self.stoi})
      shown = ', '.join(repr(c) for c in unknown[:10])
      raise UserError(
          f'the text contains {len(unknown)} character(s) that are not in this model\'s '
          f'vocabulary of {self.vocab_size}: {shown}. Remove or replace them (the vocabulary is '
          'the set of characters of the training text).') from None

  def decode(self, ids: Sequence[int]) -> str:
    return ''.join(self.chars[int(i)] for i in ids)

  def to_dict(self) -> dict[str, Any]:
    return {'type': 'char', 'chars': self.chars}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
  """Rebuilds a tokenizer from its `to_dict()` form."""
  kind = d.get('type')
  if kind == 'char':
    return CharTokenizer(d['chars'])
  if kind == 'bpe':
    from gpt_jax.data import bpe  # Imported lazily: only BPE users need the `regex` package.
    return bpe.BPETokenizer.from_dict(d)
  raise UserError(f'unknown tokenizer type {kind!r} in saved tokenizer metadata '
                  "(expected 'char' or 'bpe'); was it written by another program?")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
  """Writes the tokenizer as JSON, atomically (a crash never leaves half a file)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(tok.to_dict(), f, ensure_ascii=False)
  os.replace(tmp, path)


def load_tokenizer(path: str) -> Tokenizer:
  """Reads a tokenizer written by `save_tokenizer`."""
  if not os.path.exists(path):
    raise UserError(f'no tokenizer file at {path}')
  try:
    with open(path, encoding='utf-8') as f:
      return tokenizer_from_dict(json.load(f))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f'tokenizer file {path} is not valid ({e}); re-run scripts/prepare_data.py') from None

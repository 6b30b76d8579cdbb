r"""Byte-level BPE (GPT-2's tokenizer), written from first principles, plus a small BPE trainer.

How GPT-2 turns text into ids:
  1. Pre-tokenize: GPT-2's regex cuts the text into "words" (a letter run with an optional leading
     space, a digit run, a punctuation run, whitespace). BPE never merges across these pieces.
  2. Each piece becomes its UTF-8 bytes; every byte is a base token, so any string can be encoded.
  3. Merge: repeatedly merge the adjacent pair with the lowest merge rank (its line number in
     vocab.bpe) until no adjacent pair has a rank. Each final token maps to its id in encoder.json.
  4. Decode: concatenate the tokens' bytes and decode UTF-8 with errors='replace' (a token can hold
     half of a multi-byte character; only the full sequence is guaranteed to be valid UTF-8).

GPT-2's files store a token's bytes as a printable string: `bytes_to_unicode()` maps each of the 256
bytes to a visible character (e.g. the space byte is 'Ġ'), so that vocab.bpe can be a text file whose
lines are "left right". We keep that representation in `to_dict()`, so the saved JSON reads like
GPT-2's own files.

The encoder produces exactly tiktoken's `gpt2` ids (tests check the whole of TinyShakespeare and
random Unicode). Two details of tiktoken are mirrored for that: a piece that is already a whole
token is emitted directly, and text containing lone surrogates is repaired as tiktoken does. One
difference remains, outside our control: `\p{L}`/`\p{N}` come from each regex engine's Unicode
tables, and the `regex` package may be a Unicode version ahead of tiktoken's Rust regex (today 17 vs
16). Letters assigned in the newest version (e.g. U+18D80, from 2025) can then split differently.

Special tokens (`<|endoftext|>` = 50256 for GPT-2) follow tiktoken's `encode` semantics: by default
text that spells a special token is an error (it usually means untrusted text is trying to inject a
document boundary). Pass `allowed_special='all'` (or a set) to encode it as the special id, or
`disallowed_special=()` to encode it as ordinary text. `encode_ordinary` is the latter, as in tiktoken.
"""

from __future__ import annotations

import collections
import heapq
import json
import os
import re
from typing import AbstractSet, Any, Collection, Iterable, Literal, Sequence

import regex

from gpt_jax.errors import UserError

# GPT-2's pre-tokenization pattern, as released in OpenAI's encoder.py. Contractions first (so "'s"
# is one piece), then letters / numbers / other symbols, each with at most one leading space, then
# whitespace. `\s+(?!\S)` leaves the last space of a run for the next word, so " world" stays one
# piece after several spaces.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

ENDOFTEXT = '<|endoftext|>'
GPT2_ENDOFTEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257
_GPT2_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'

# The per-piece cache is cleared when it reaches this many entries, so memory stays bounded on huge
# corpora (TinyShakespeare has ~25k distinct pieces).
_CACHE_MAX = 1 << 19


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table.

  Bytes that are already visible, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
  themselves; the other 68 (control bytes, space, DEL, NBSP, soft hyphen, ...) are shifted, in order,
  to the characters 256, 257, ... so that no byte becomes whitespace or an invisible character.
  """
  visible = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
             + list(range(ord('®'), ord('ÿ') + 1)))
  table = {b: chr(b) for b in visible}
  shifted = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + shifted)
      shifted += 1
  return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def token_str_to_bytes(s: str) -> bytes:
  """Inverse of `bytes_to_token_str`: a GPT-2 vocabulary string back to the token's bytes."""
  return bytes(_CHAR_TO_BYTE[c] for c in s)


def bytes_to_token_str(b: bytes) -> str:
  """A token's bytes in GPT-2's printable form (as in encoder.json / vocab.bpe)."""
  return ''.join(_BYTE_TO_CHAR[x] for x in b)


def _fix_surrogates(text: str) -> str:
  # Lone surrogates cannot be encoded as UTF-8. tiktoken replaces them (after joining valid pairs)
  # with U+FFFD; we do the same so both encoders agree. Such text cannot round-trip exactly.
  return text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')


class BPETokenizer:
  """Byte-level BPE tokenizer: GPT-2's, or one trained by `train_bpe`.

  Args:
    encoder: token (GPT-2 printable string form, see `bytes_to_unicode`) -> id, for ordinary tokens.
      It must hold all 256 single bytes and the result of every merge.
    merges: (left, right) token pairs in priority order (rank 0 first), as in vocab.bpe. Each side
      must be a single byte or the result of an earlier merge.
    special_tokens: e.g. {'<|endoftext|>': 50256}; never produced by merging.
    name: 'gpt2' for OpenAI's vocabulary (enables `encode_fast`), else e.g. 'custom'.
    pattern: the pre-tokenization regex (for the `regex` package).
  Ordinary and special ids together must be exactly 0 .. vocab_size - 1.
  """

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]],
               special_tokens: dict[str, int] | None = None, name: str = 'custom',
               pattern: str = GPT2_PATTERN):
    self.name = str(name)
    self.pattern = pattern
    self.encoder = dict(encoder)
    self.merges = [(str(a), str(b)) for a, b in merges]
    self.special_tokens = dict(special_tokens or {})
    self._validate()
    try:
      self._pat = regex.compile(pattern)
    except regex.error as e:
      raise UserError(f'invalid BPE pre-tokenization pattern {pattern!r}: {e}') from None

    n = len(self.encoder) + len(self.special_tokens)
    self._id_to_bytes: list[bytes] = [b''] * n
    for s, i in self.encoder.items():
      self._id_to_bytes[i] = token_str_to_bytes(s)
    for s, i in self.special_tokens.items():
      self._id_to_bytes[i] = s.encode('utf-8')
    # Work in ids, not strings: byte value -> id, and (left id, right id) -> (rank, merged id).
    self._bytes_to_id = {token_str_to_bytes(s): i for s, i in self.encoder.items()}
    self._byte_ids = [self.encoder[_BYTE_TO_CHAR[b]] for b in range(256)]
    self._merge_table: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (a, b) in enumerate(self.merges):
      # A pair listed twice (only possible in trained vocabularies) keeps its first, lowest rank.
      self._merge_table.setdefault((self.encoder[a], self.encoder[b]), (rank, self.encoder[a + b]))
    self._cache: dict[str, tuple[int, ...]] = {}
    self._special_re: dict[frozenset[str], re.Pattern[str]] = {}
    self._tiktoken: Any = None  # Built lazily by `encode_fast`.

  def _validate(self) -> None:
    """Checks that the vocabulary is self-consistent, with a message saying what is wrong."""
    def bad(msg: str) -> UserError:
      return UserError(f'invalid BPE vocabulary ({self.name}): {msg}. Rebuild it from GPT-2\'s '
                       'encoder.json/vocab.bpe or re-train it with train_bpe.')
    ids = list(self.encoder.values()) + list(self.special_tokens.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
      raise bad('ids must be integers')
    if sorted(ids) != list(range(len(ids))):
      raise bad(f'the {len(ids)} ids are not exactly 0..{len(ids) - 1} without repeats')
    for s in self.encoder:
      if not s or any(c not in _CHAR_TO_BYTE for c in s):
        raise bad(f'token {s!r} is not in GPT-2\'s byte-as-character form')
    missing = [b for b in range(256) if _BYTE_TO_CHAR[b] not in self.encoder]
    if missing:
      raise bad(f'{len(missing)} single-byte tokens are missing (e.g. byte {missing[0]})')
    if any(not s for s in self.special_tokens):
      raise bad('a special token is empty')
    # Each merge may only use tokens that already exist (single bytes or earlier merge results):
    # that is what makes "merge by lowest rank" well defined.
    available = {_BYTE_TO_CHAR[b] for b in range(256)}
    for rank, (a, b) in enumerate(self.merges):
      if a not in available or b not in available:
        raise bad(f'merge {rank} ({a!r}, {b!r}) uses a token that no earlier merge produced')
      if a + b not in self.encoder:
        raise bad(f'the result {a + b!r} of merge {rank} is not in the vocabulary')
      available.add(a + b)

  # --- interface ---------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids (ordinary + special); ids are 0 .. vocab_size - 1."""
    return len(self._id_to_bytes)

  @property
  def eot_token(self) -> int | None:
    """The id of '<|endoftext|>', or None if this vocabulary has none."""
    return self.special_tokens.get(ENDOFTEXT)

  def encode(self, text: str, *, allowed_special: Literal['all'] | AbstractSet[str] = frozenset(),
             disallowed_special: Literal['all'] | Collection[str] = 'all') -> list[int]:
    """Text -> ids, with tiktoken's special-token rules.

    By default, text that spells a special token (e.g. '<|endoftext|>') raises UserError.
    `allowed_special='all'` (or a set of names) encodes those as their special ids;
    `disallowed_special=()` encodes any special-token text as ordinary text (as `encode_ordinary`).
    """
    allowed = self._check_special(text, allowed_special, disallowed_special)
    if not allowed:
      return self.encode_ordinary(text)
    ids: list[int] = []
    pos = 0
    for m in self._special_regex(allowed).finditer(text):
      ids.extend(self.encode_ordinary(text[pos:m.start()]))
      ids.append(self.special_tokens[m.group()])
      pos = m.end()
    ids.extend(self.encode_ordinary(text[pos:]))
    return ids

  def encode_ordinary(self, text: str) -> list[int]:
    """Text -> ids, treating special-token text as ordinary text. The hand-written reference path."""
    try:
      return self._encode_ordinary(text)
    except UnicodeEncodeError:
      return self._encode_ordinary(_fix_surrogates(text))

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text. Invalid UTF-8 (e.g. half a character) becomes U+FFFD, as in GPT-2."""
    return self.decode_bytes(ids).decode('utf-8', errors='replace')

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """Ids -> the raw bytes they stand for (useful for streaming output)."""
    table = self._id_to_bytes
    ids = [int(i) for i in ids]  # Also accepts numpy / JAX integers.
    try:
      if ids and min(ids) < 0:
        raise IndexError
      return b''.join([table[i] for i in ids])
    except IndexError:
      bad = next(i for i in ids if not 0 <= i < len(table))
      raise UserError(
          f'token id {bad} is outside this tokenizer\'s vocabulary (0..{len(table) - 1}). Was the '
          'model trained with another tokenizer? If its vocabulary is padded, mask the padded '
          'logits before sampling.') from None

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes of one token."""
    return self.decode_bytes([token_id])

  def to_dict(self) -> dict[str, Any]:
    """JSON-able form: everything `from_dict` needs (tokens in GPT-2's printable form)."""
    return {
        'type': 'bpe',
        'name': self.name,
        'pattern': self.pattern,
        'encoder': dict(self.encoder),
        # "left right" strings, as in vocab.bpe (a token never contains a space: it is 'Ġ').
        'merges': [f'{a} {b}' for a, b in self.merges],
        'special_tokens': dict(self.special_tokens),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'BPETokenizer':
    """Rebuilds a tokenizer from `to_dict()`; raises UserError if the data is malformed."""
    if d.get('type') != 'bpe':
      raise UserError(f"expected a saved tokenizer of type 'bpe', got {d.get('type')!r}")
    encoder, special = d['encoder'], d.get('special_tokens', {})
    if (not isinstance(encoder, dict) or not isinstance(special, dict)
        or not isinstance(d['merges'], list)):
      raise UserError('saved BPE tokenizer is malformed (encoder, merges or special_tokens has the '
                      'wrong type); re-create the tokenizer.')
    merges = []
    for line in d['merges']:
      parts = line.split(' ') if isinstance(line, str) else []
      if len(parts) != 2:
        raise UserError(f'invalid BPE merge {line!r} in saved tokenizer (expected "left right"); '
                        'was it edited by hand? Re-create the tokenizer.')
      merges.append((parts[0], parts[1]))
    return cls(encoder, merges, special, name=d.get('name', 'custom'),
               pattern=d.get('pattern', GPT2_PATTERN))

  # --- fast path -------------------------------------------------------------------------------

  def encode_fast(self, text: str, *, allowed_special: Literal['all'] | AbstractSet[str] = frozenset(),
                  disallowed_special: Literal['all'] | Collection[str] = 'all') -> list[int]:
    """Like `encode`, but uses tiktoken's Rust encoder for the GPT-2 vocabulary when available.

    tiktoken is only used for GPT-2's vocabulary with GPT-2's pattern (where its ids are proven equal
    to ours); for any other vocabulary, or if tiktoken is not installed, this is `encode`.
    """
    enc = self._get_tiktoken()
    if enc is None:
      return self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
    allowed = self._check_special(text, allowed_special, disallowed_special)  # Same errors as encode.
    return enc.encode(text, allowed_special=allowed, disallowed_special=())

  def _get_tiktoken(self) -> Any:
    if self._tiktoken is None:
      self._tiktoken = False
      if self._is_gpt2():
        try:
          import tiktoken  # Optional dependency: imported only when the fast path is asked for.
        except ImportError:
          return None
        # tiktoken wants token bytes -> rank, and treats rank as the id; for GPT-2 they coincide.
        self._tiktoken = tiktoken.Encoding(
            name=f'{self.name}_local', pat_str=self.pattern,
            mergeable_ranks={token_str_to_bytes(s): i for s, i in self.encoder.items()},
            special_tokens=self.special_tokens, explicit_n_vocab=self.vocab_size)
    return self._tiktoken or None

  def _is_gpt2(self) -> bool:
    # tiktoken merges by the rank of the merged token, which equals our merge rank only when the ids
    # are GPT-2's layout: merge r produces id 256 + r. Check rather than trust the name.
    return (self.name == 'gpt2' and self.pattern == GPT2_PATTERN
            and len(self.encoder) == 256 + len(self.merges)
            and all(self.encoder[a + b] == 256 + r for r, (a, b) in enumerate(self.merges))
            and all(i >= len(self.encoder) for i in self.special_tokens.values()))

  # --- internals -------------------------------------------------------------------------------

  def _check_special(self, text: str, allowed_special: Any, disallowed_special: Any
                     ) -> frozenset[str]:
    """Raises if `text` holds a disallowed special token; returns the allowed ones."""
    specials = frozenset(self.special_tokens)
    allowed = specials if allowed_special == 'all' else frozenset(allowed_special)
    disallowed = specials - allowed if disallowed_special == 'all' else frozenset(disallowed_special)
    unknown = (allowed | disallowed) - specials
    if unknown:
      raise UserError(f'{sorted(unknown)} are not special tokens of this tokenizer '
                      f'(it has {sorted(specials) or "none"})')
    if disallowed:
      m = self._special_regex(disallowed).search(text)
      if m:
        raise UserError(
            f'the text contains the special token {m.group()!r} at character {m.start()}. Pass '
            f'allowed_special={{{m.group()!r}}} (or \'all\') to encode it as its special id, or '
            'disallowed_special=() to encode it as ordinary text.')
    return allowed

  def _special_regex(self, names: frozenset[str]) -> re.Pattern[str]:
    if names not in self._special_re:
      # Longest first, so a special token that is a prefix of another does not win.
      alts = sorted(names, key=lambda s: (-len(s), s))
      self._special_re[names] = re.compile('|'.join(re.escape(s) for s in alts))
    return self._special_re[names]

  def _encode_ordinary(self, text: str) -> list[int]:
    ids: list[int] = []
    cache = self._cache
    for piece in self._pat.findall(text):
      # Most pieces repeat ("the", " and", "\n"): each distinct piece is merged only once.
      toks = cache.get(piece)
      if toks is None:
        toks = self._encode_piece(piece)
        if len(cache) >= _CACHE_MAX:
          cache.clear()
        cache[piece] = toks
      ids.extend(toks)
    return ids

  def _encode_piece(self, piece: str) -> tuple[int, ...]:
    data = piece.encode('utf-8')
    if not data:
      return ()
    whole = self._bytes_to_id.get(data)
    if whole is not None:
      # tiktoken emits a piece that is itself a token directly. Pure BPE could, in principle, reach
      # a different split; taking the whole token keeps us identical to tiktoken.
      return (whole,)
    return tuple(self._bpe([self._byte_ids[b] for b in data]))

  def _bpe(self, ids: list[int]) -> list[int]:
    """Merges a piece's tokens by rank, with exactly GPT-2's semantics, in O(n log n).

    GPT-2 repeatedly takes the lowest-ranked adjacent pair and merges all its occurrences left to
    right. Rescanning the piece per merge is quadratic on long pieces (e.g. 100k '=' characters), so
    the pieces are kept as a linked list and candidate pairs in a heap keyed by (rank, position).
    Entries go stale when a neighbour is merged; they are checked when popped and skipped.
    """
    table = self._merge_table
    n = len(ids)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
      m = table.get((ids[i], ids[i + 1]))
      if m is not None:
        heap.append((m[0], i))
    heapq.heapify(heap)
    while heap:
      # One GPT-2 round: every occurrence of the lowest-ranked pair, left to right. Pairs created in
      # this round wait for the next round (their ranks are higher in any well-formed merge list).
      rank = heap[0][0]
      positions = []
      while heap and heap[0][0] == rank:
        positions.append(heapq.heappop(heap)[1])
      for i in positions:
        j = nxt[i]
        if ids[i] < 0 or j < 0:
          continue
        m = table.get((ids[i], ids[j]))
        if m is None or m[0] != rank:
          continue  # Stale: a neighbour changed since this entry was pushed.
        ids[i] = m[1]
        ids[j] = -1
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
          prv[k] = i
          m = table.get((ids[i], ids[k]))
          if m is not None:
            heapq.heappush(heap, (m[0], i))
        p = prv[i]
        if p >= 0:
          m = table.get((ids[p], ids[i]))
          if m is not None:
            heapq.heappush(heap, (m[0], p))
    return [t for t in ids if t >= 0]

  def __repr__(self) -> str:
    return f'BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size})'


def load_gpt2_tokenizer(encoder_json_path: str | os.PathLike[str],
                        vocab_bpe_path: str | os.PathLike[str]) -> BPETokenizer:
  """GPT-2's tokenizer from OpenAI's encoder.json and vocab.bpe (ids identical to tiktoken 'gpt2')."""
  encoder_json_path, vocab_bpe_path = os.fspath(encoder_json_path), os.fspath(vocab_bpe_path)
  fix = (f'Download encoder.json and vocab.bpe from {_GPT2_URL} (or point --data_dir at the folder '
         'that holds gpt2/encoder.json and gpt2/vocab.bpe).')
  for path in (encoder_json_path, vocab_bpe_path):
    if not os.path.isfile(path):
      raise UserError(f'GPT-2 tokenizer file not found: {path}. {fix}')
  try:
    with open(encoder_json_path, encoding='utf-8') as f:
      encoder = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{encoder_json_path} is not valid JSON ({e}). {fix}') from None
  if not isinstance(encoder, dict):
    raise UserError(f'{encoder_json_path} should be a JSON object of token -> id. {fix}')
  try:
    with open(vocab_bpe_path, encoding='utf-8') as f:
      lines = f.read().split('\n')
  except UnicodeDecodeError as e:
    raise UserError(f'{vocab_bpe_path} is not UTF-8 text ({e}). {fix}') from None
  merges = []
  for lineno, line in enumerate(lines, 1):
    if not line or (lineno == 1 and line.startswith('#')):  # '#version: 0.2' header, final newline.
      continue
    parts = line.split(' ')
    if len(parts) != 2:
      raise UserError(f'{vocab_bpe_path} line {lineno} is not a merge "left right": {line[:80]!r}. '
                      f'{fix}')
    merges.append((parts[0], parts[1]))
  # encoder.json lists the special tokens alongside ordinary ones; like tiktoken, take them out of
  # the mergeable vocabulary.
  special = {s: encoder.pop(s) for s in (ENDOFTEXT, '<|startoftext|>') if s in encoder}
  try:
    return BPETokenizer(encoder, merges, special, name='gpt2')
  except UserError as e:
    raise UserError(f'{encoder_json_path} and {vocab_bpe_path} do not form a valid GPT-2 vocabulary '
                    f'({e}). {fix}') from None


def train_bpe(text: str, vocab_size: int, *, special_tokens: Sequence[str] = (),
              progress: bool = True, name: str = 'custom') -> BPETokenizer:
  """Trains a byte-level BPE vocabulary of exactly `vocab_size` ids on `text`.

  Ids 0..255 are the bytes; each merge adds the next id; `special_tokens` (if any) take the last ids
  and count towards `vocab_size`. Pieces come from GPT-2's pattern, so merges never cross word
  boundaries. Each step merges the most frequent adjacent pair; ties go to the smallest
  (left id, right id), which makes training deterministic. If a merge reproduces the bytes of an
  existing token (possible via a different split), it is recorded as a merge but reuses that id.

  Raises UserError if vocab_size is too small, or if the text runs out of pairs to merge before
  reaching vocab_size (the message gives the largest size this text supports): a tokenizer with a
  different size than asked for would silently disagree with the model's configuration.
  """
  special_tokens = list(special_tokens)
  if len(set(special_tokens)) != len(special_tokens):
    raise UserError(f'special_tokens has repeats: {special_tokens}')
  n_ordinary = vocab_size - len(special_tokens)
  if n_ordinary < 256:
    raise UserError(f'vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens '
                    f'plus {len(special_tokens)} special token(s); use vocab_size >= '
                    f'{256 + len(special_tokens)}.')
  pat = regex.compile(GPT2_PATTERN)
  try:
    counts = collections.Counter(pat.findall(text))
  except TypeError:
    raise UserError(f'train_bpe needs a str, got {type(text).__name__}') from None
  words: list[list[int]] = []
  freqs: list[int] = []
  for piece, c in counts.items():
    try:
      data = piece.encode('utf-8')
    except UnicodeEncodeError:
      data = _fix_surrogates(piece).encode('utf-8')
    if len(data) >= 2:  # Single bytes have no pairs to contribute.
      words.append(list(data))
      freqs.append(c)
  del counts

  vocab: list[bytes] = [bytes([b]) for b in range(256)]  # id -> bytes
  bytes_to_id = {b: i for i, b in enumerate(vocab)}
  merges: list[tuple[int, int]] = []

  # pair -> weighted count, pair -> words that (may) contain it. `where` is never pruned: a word that
  # no longer holds the pair is skipped when visited.
  pair_counts: dict[tuple[int, int], int] = collections.defaultdict(int)
  where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
  for w, (word, f) in enumerate(zip(words, freqs)):
    for pair in zip(word, word[1:]):
      pair_counts[pair] += f
      where[pair].add(w)
  # Max-heap by count via negation; tuples compare (count, left, right), which is the tie-break.
  # Entries are lazy: one whose count no longer matches `pair_counts` is stale and skipped.
  heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
  heapq.heapify(heap)

  from tqdm.auto import tqdm  # Imported here: encoding does not need it.
  bar = tqdm(total=n_ordinary - 256, desc=f'training BPE ({vocab_size} tokens)', unit='merge',
             disable=not progress)
  while len(vocab) < n_ordinary:
    if not heap:
      bar.close()
      raise UserError(
          f'the training text ({len(text):,} characters) runs out of pairs to merge at '
          f'{len(vocab) + len(special_tokens)} tokens, before reaching vocab_size {vocab_size}. '
          f'Use vocab_size <= {len(vocab) + len(special_tokens)} or more text.')
    neg, a, b = heapq.heappop(heap)
    if pair_counts.get((a, b), 0) != -neg or neg == 0:
      continue  # Stale entry.
    merged = vocab[a] + vocab[b]
    new = bytes_to_id.get(merged)
    if new is None:
      new = len(vocab)
      vocab.append(merged)
      bytes_to_id[merged] = new
      bar.update(1)
    merges.append((a, b))

    changed = set()
    for w in where.pop((a, b)):
      word = words[w]
      if not _contains_pair(word, a, b):
        continue
      f = freqs[w]
      # Re-count this word's pairs: simple, and words are short, so it is cheaper than patching.
      for pair in zip(word, word[1:]):
        pair_counts[pair] -= f
        changed.add(pair)
      word = _merge_pair(word, a, b, new)
      words[w] = word
      for pair in zip(word, word[1:]):
        pair_counts[pair] += f
        where[pair].add(w)
        changed.add(pair)
    for pair in changed:
      c = pair_counts[pair]
      if c > 0:
        heapq.heappush(heap, (-c, pair[0], pair[1]))
      else:
        del pair_counts[pair]
  bar.close()

  encoder = {bytes_to_token_str(tok): i for i, tok in enumerate(vocab)}
  merge_strs = [(bytes_to_token_str(vocab[a]), bytes_to_token_str(vocab[b])) for a, b in merges]
  specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
  return BPETokenizer(encoder, merge_strs, specials, name=name)


def _contains_pair(word: list[int], a: int, b: int) -> bool:
  return any(x == a and y == b for x, y in zip(word, word[1:]))


def _merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
  """Replaces every (a, b) in `word`, left to right without overlaps (so 'aaa' -> 'aa', 'a')."""
  out = []
  i, n = 0, len(word)
  while i < n:
    if i + 1 < n and word[i] == a and word[i + 1] == b:
      out.append(new)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return out

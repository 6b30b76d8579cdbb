"""Tests for the hand-written byte-level BPE (gpt_jax/data/bpe.py).

The GPT-2 files and TinyShakespeare are the copies shipped in gpt_jax/data/assets, so nothing here skips.
"""

from __future__ import annotations

import collections
import json
import sys
import time
import unicodedata

import pytest
import regex
from hypothesis import given, settings, strategies as st

from gpt_jax.data import bpe, tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

from conftest import shipped_file

ENCODER_JSON = shipped_file('gpt2', 'encoder.json')
VOCAB_BPE = shipped_file('gpt2', 'vocab.bpe')
SHAKESPEARE = shipped_file('tinyshakespeare.txt')

# Pieces hypothesis would rarely invent: emoji (incl. ZWJ sequences and flags), combining marks,
# whitespace runs of all kinds, control characters, contractions, non-Latin scripts and digits.
FRAGMENTS = ['😀', '👩\u200d👩\u200d👧', '🇫🇷', 'e\u0301', 'a\u0308\u0323', '\u200d', '\ufeff', '  ',
             '\t\t', '\n\n\n', '\r\n', ' \u00a0 ', '\u3000', '\u2028', '\x00', '\x1b[0m', '\x7f',
             '\x1c', "'s", "'ll", "n't", ' 123', '٣٤', '日本語', 'Ğ', 'Ġ', ' ' * 7, 'ﬁ', '𝔘𝔫𝔦']
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(FRAGMENTS)), max_size=16).map(''.join)

_LETTER_OR_NUMBER = regex.compile(r'[\p{L}\p{N}]')


def without_newly_assigned(text: str) -> str:
  r"""Drops letters/numbers newer than Python's own Unicode tables (14.0 in Python 3.11).

  `regex` and tiktoken's Rust regex follow different Unicode versions (today 17 vs 16), so a letter
  added in Unicode 17 (e.g. U+18D80) is \p{L} for one and punctuation for the other. That is the one
  known way the two encoders can differ; it affects only characters assigned in the newest version.
  """
  return ''.join(c for c in text if unicodedata.category(c) != 'Cn' or not _LETTER_OR_NUMBER.match(c))


@pytest.fixture(scope='module')
def gpt2() -> bpe.BPETokenizer:
  return bpe.load_gpt2_tokenizer(ENCODER_JSON, VOCAB_BPE)


@pytest.fixture(scope='module')
def tiktoken_gpt2():
  """tiktoken's 'gpt2' encoding, built from the same local files (no download)."""
  import tiktoken  # requirements-dev.txt: the independent reference these tests compare against.
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks
  from tiktoken_ext.openai_public import r50k_pat_str
  ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(VOCAB_BPE),
                                          encoder_json_file=str(ENCODER_JSON))
  return tiktoken.Encoding(name='gpt2_local', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope='module')
def shakespeare() -> str:
  return SHAKESPEARE.read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def trained(shakespeare) -> bpe.BPETokenizer:
  # No time limit here (a busy machine would fail every test that uses it): the training speed is
  # scripts/bench_tokenizer.py's to measure.
  return bpe.train_bpe(shakespeare, 1024, progress=False)


# --- byte <-> unicode table ------------------------------------------------------------------------

def test_bytes_to_unicode_is_a_printable_bijection():
  table = bpe.bytes_to_unicode()
  assert sorted(table) == list(range(256))
  chars = list(table.values())
  assert len(set(chars)) == 256
  assert all(c.isprintable() and not c.isspace() for c in chars)
  assert table[ord('A')] == 'A' and table[ord(' ')] == 'Ġ' and table[ord('\n')] == 'Ċ'
  assert bpe.token_str_to_bytes(bpe.bytes_to_token_str(bytes(range(256)))) == bytes(range(256))


# --- GPT-2 vocabulary: exactness against tiktoken ---------------------------------------------------

def test_gpt2_known_ids(gpt2):
  assert gpt2.vocab_size == 50257
  assert gpt2.eot_token == 50256
  assert gpt2.encode('hello world') == [31373, 995]
  assert gpt2.decode([31373, 995]) == 'hello world'
  assert gpt2.decode([50256]) == '<|endoftext|>'


def test_gpt2_matches_tiktoken_on_all_of_tinyshakespeare(gpt2, tiktoken_gpt2, shakespeare):
  assert len(shakespeare) == 1_115_394
  ids = gpt2.encode(shakespeare)
  assert ids == tiktoken_gpt2.encode(shakespeare)
  assert gpt2.decode(ids) == shakespeare
  n = int(0.9 * len(shakespeare))
  assert n == 1_003_854
  assert len(gpt2.encode(shakespeare[:n])) == 301_966
  assert len(gpt2.encode(shakespeare[n:])) == 36_059


def test_encode_fast_matches_reference_on_all_of_tinyshakespeare(gpt2, shakespeare):
  assert gpt2.encode_fast(shakespeare) == gpt2.encode(shakespeare)
  assert gpt2._get_tiktoken() is not None  # The fast path really was tiktoken.


def test_encode_fast_falls_back_without_tiktoken(gpt2, trained, monkeypatch):
  text = "First Citizen:\nWe are accounted poor citizens, the patricians good."
  # Not GPT-2's vocabulary: tiktoken is never used (its merge rule could differ).
  assert trained.encode_fast(text) == trained.encode(text)
  assert trained._get_tiktoken() is None
  # tiktoken not installed: the reference encoder answers.
  monkeypatch.setitem(sys.modules, 'tiktoken', None)
  tok = bpe.BPETokenizer.from_dict(gpt2.to_dict())
  assert tok.encode_fast(text) == gpt2.encode(text)
  assert tok._get_tiktoken() is None


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(TEXT, st.builds(lambda a, b: f'{a}<|endoftext|>{b}', TEXT, TEXT)))
def test_gpt2_matches_tiktoken_and_round_trips_on_arbitrary_unicode(gpt2, tiktoken_gpt2, text):
  ids = gpt2.encode(text, disallowed_special=())
  assert gpt2.decode(ids) == text
  allowed = gpt2.encode(text, allowed_special='all')
  assert gpt2.decode(allowed) == text
  comparable = without_newly_assigned(text)
  assert (gpt2.encode(comparable, disallowed_special=())
          == tiktoken_gpt2.encode(comparable, disallowed_special=()))
  assert (gpt2.encode(comparable, allowed_special='all')
          == tiktoken_gpt2.encode(comparable, allowed_special='all'))


@pytest.mark.slow
def test_long_pieces_are_linear_and_exact(gpt2, tiktoken_gpt2):
  """One regex piece of 200k characters: a per-merge rescan would be quadratic here.

  Timed as a ratio of the best of three runs each (10x the text must take well under 100x the time),
  the two texts in turns, so that a busy spell slows both and one slow run cannot flake it.
  """
  import random
  rng = random.Random(0)

  def piece(n):
    return '=' * n + ' ' + ''.join(rng.choice('abcdefghij') for _ in range(n))

  def seconds(text):
    gpt2._cache.clear()  # Time the merges, not the per-piece cache.
    start = time.perf_counter()
    ids = gpt2.encode(text)
    return time.perf_counter() - start, ids

  small_text, text = piece(10_000), piece(100_000)
  small, big = float('inf'), float('inf')
  for _ in range(3):
    small = min(small, seconds(small_text)[0])
    t, ids = seconds(text)
    big = min(big, t)
  # Linear gives ~10x idle, and up to 34x was seen beside the loaded suite; quadratic gives ~100x.
  assert big < 50 * small, (big, small)
  assert ids == tiktoken_gpt2.encode(text)


def test_lone_surrogates_are_replaced_like_tiktoken(gpt2, tiktoken_gpt2):
  text = 'a\ud800b \udfff'
  assert gpt2.encode(text) == tiktoken_gpt2.encode(text)
  assert gpt2.decode(gpt2.encode(text)) == 'a\ufffdb \ufffd'


# --- special tokens ----------------------------------------------------------------------------------

def test_special_token_semantics_follow_tiktoken(gpt2):
  text = 'a<|endoftext|>b'
  with pytest.raises(UserError, match='allowed_special'):
    gpt2.encode(text)
  with pytest.raises(UserError, match='allowed_special'):
    gpt2.encode_fast(text)
  assert gpt2.encode('<|endoftext|>', allowed_special='all') == [50256]
  assert gpt2.encode('<|endoftext|>', allowed_special={'<|endoftext|>'}) == [50256]
  assert gpt2.encode('<|endoftext|>', disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
  assert gpt2.encode_ordinary('<|endoftext|>') == [27, 91, 437, 1659, 5239, 91, 29]
  assert gpt2.encode(text, allowed_special='all') == gpt2.encode('a') + [50256] + gpt2.encode('b')
  with pytest.raises(UserError, match='not special tokens'):
    gpt2.encode('x', allowed_special={'<|im_start|>'})


def test_decode_collects_bytes_across_tokens(gpt2):
  # A 4-byte emoji is split over several tokens: each alone is invalid UTF-8 (-> U+FFFD, as GPT-2
  # does), but decoding them together rebuilds the character.
  ids = gpt2.encode('🦜')
  assert len(ids) > 1
  assert b''.join(gpt2.token_bytes(i) for i in ids) == '🦜'.encode('utf-8')
  assert gpt2.decode(ids) == '🦜'
  assert '\ufffd' in gpt2.decode(ids[:1])
  assert gpt2.decode(ids[:1]) == '🦜'.encode('utf-8')[:len(gpt2.token_bytes(ids[0]))].decode(
      'utf-8', errors='replace')


def test_decode_rejects_unknown_ids(gpt2):
  with pytest.raises(UserError, match='outside'):
    gpt2.decode([50257])
  with pytest.raises(UserError, match='outside'):
    gpt2.decode([-1])


# --- loading and saving ------------------------------------------------------------------------------

def test_to_dict_round_trips_through_json(gpt2, tmp_path):
  d = gpt2.to_dict()
  assert d['type'] == 'bpe' and d['name'] == 'gpt2'
  assert d['special_tokens'] == {'<|endoftext|>': 50256}
  path = str(tmp_path / 'tokenizer.json')
  tokenizer_lib.save_tokenizer(gpt2, path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert isinstance(tok, bpe.BPETokenizer)
  text = "Hello, world! It's 2024 — naïve café 😀\n\n  <|endoftext|>"
  assert tok.encode(text, allowed_special='all') == gpt2.encode(text, allowed_special='all')
  assert tok.vocab_size == 50257 and tok._is_gpt2()


def test_missing_gpt2_files_raise_user_error(tmp_path):
  missing = tmp_path / 'nope' / 'encoder.json'
  with pytest.raises(UserError, match='encoder.json'):
    bpe.load_gpt2_tokenizer(missing, tmp_path / 'vocab.bpe')


def test_invalid_gpt2_files_raise_user_error(tmp_path):
  enc, merges = tmp_path / 'encoder.json', tmp_path / 'vocab.bpe'
  enc.write_text('{not json', encoding='utf-8')
  merges.write_text('#version: 0.2\n', encoding='utf-8')
  with pytest.raises(UserError, match=str(enc)):
    bpe.load_gpt2_tokenizer(enc, merges)

  base = {bpe.bytes_to_token_str(bytes([b])): b for b in range(256)}
  enc.write_text(json.dumps({**base, 'Ġt': 256}), encoding='utf-8')
  merges.write_text('#version: 0.2\nĠ t x\n', encoding='utf-8')
  with pytest.raises(UserError, match='line 2'):
    bpe.load_gpt2_tokenizer(enc, merges)
  merges.write_text('#version: 0.2\nĠ t\nĠt he\n', encoding='utf-8')  # 'he' was never produced.
  with pytest.raises(UserError, match='do not form a valid GPT-2 vocabulary'):
    bpe.load_gpt2_tokenizer(enc, merges)

  merges.write_text('#version: 0.2\nĠ t\n', encoding='utf-8')
  tok = bpe.load_gpt2_tokenizer(enc, merges)
  assert tok.encode(' t t') == [256, 256]


def test_from_dict_rejects_inconsistent_data():
  base = {bpe.bytes_to_token_str(bytes([b])): b for b in range(256)}
  d = {'type': 'bpe', 'name': 'custom', 'encoder': {**base, 'ab': 300}, 'merges': ['a b'],
       'special_tokens': {}}
  with pytest.raises(UserError, match='not exactly'):
    bpe.BPETokenizer.from_dict(d)
  d['encoder']['ab'] = 256
  d['merges'] = ['a b c']
  with pytest.raises(UserError, match='left right'):
    bpe.BPETokenizer.from_dict(d)


# --- training ----------------------------------------------------------------------------------------

def naive_train(text: str, vocab_size: int):
  """Reference trainer: recounts every pair at every step (slow but obviously right).

  Returns (bytes of each merge's result, vocabulary id -> bytes, final segmentation of each piece),
  or None if the text runs out of pairs first.
  """
  words = [list(w.encode('utf-8')) for w in regex.findall(bpe.GPT2_PATTERN, text)]
  vocab = [bytes([b]) for b in range(256)]
  merged = []
  while len(vocab) < vocab_size:
    counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
    if not counts:
      return None
    best = min(counts, key=lambda p: (-counts[p], p))  # Most frequent, then smallest ids.
    new_bytes = vocab[best[0]] + vocab[best[1]]
    if new_bytes in vocab:
      new = vocab.index(new_bytes)
    else:
      new = len(vocab)
      vocab.append(new_bytes)
    merged.append(new_bytes)
    words = [bpe._merge_pair(w, best[0], best[1], new) for w in words]
  return merged, vocab, words


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet='ab c\nd', min_size=30, max_size=120), extra=st.integers(1, 12))
def test_train_matches_naive_reference(text, extra):
  vocab_size = 256 + extra
  ref = naive_train(text, vocab_size)
  if ref is None:
    with pytest.raises(UserError, match='runs out of pairs'):
      bpe.train_bpe(text, vocab_size, progress=False)
    return
  merged, vocab, words = ref
  tok = bpe.train_bpe(text, vocab_size, progress=False)
  assert [bpe.token_str_to_bytes(a + b) for a, b in tok.merges] == merged
  assert tok.vocab_size == vocab_size
  assert [tok.token_bytes(i) for i in range(vocab_size)] == vocab
  # Encoding with the learned merges reproduces the training segmentation, piece by piece.
  for piece, seg in zip(regex.findall(bpe.GPT2_PATTERN, text), words):
    assert tok.encode(piece) == seg


def test_train_on_tinyshakespeare(trained, shakespeare):
  assert trained.vocab_size == 1024
  assert trained.name == 'custom' and trained.special_tokens == {}
  ids = trained.encode(shakespeare)
  assert max(ids) < 1024
  assert trained.decode(ids) == shakespeare
  assert len(ids) < 0.45 * len(shakespeare)  # 1,024 tokens compress well beyond bytes.
  # Merges never cross GPT-2's pre-tokenization boundaries: every token lies inside some piece.
  pieces = b'\0'.join({p.encode('utf-8') for p in regex.findall(bpe.GPT2_PATTERN, shakespeare)})
  assert b'\0' not in shakespeare.encode('utf-8')
  assert all(trained.token_bytes(i) in pieces for i in range(256, 1024))


def test_train_is_deterministic(shakespeare):
  a = bpe.train_bpe(shakespeare[:100_000], 600, progress=False)
  b = bpe.train_bpe(shakespeare[:100_000], 600, progress=False)
  assert a.to_dict() == b.to_dict()


def test_trained_tokenizer_json_round_trip(trained, tmp_path):
  path = str(tmp_path / 'tok.json')
  tokenizer_lib.save_tokenizer(trained, path)
  tok = tokenizer_lib.load_tokenizer(path)
  text = 'To be, or not to be: that is the question. 😀 ñ'
  assert tok.encode(text) == trained.encode(text)
  assert tok.to_dict() == trained.to_dict()


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_trained_round_trips_arbitrary_unicode(trained, text):
  # Byte-level: characters never seen in training still encode (as bytes) and decode exactly.
  assert trained.decode(trained.encode(text)) == text


def test_train_special_tokens_count_towards_vocab_size():
  tok = bpe.train_bpe('hello hello world ' * 20, 260, special_tokens=['<|endoftext|>'],
                      progress=False)
  assert tok.vocab_size == 260 and tok.eot_token == 259
  assert tok.encode('hi<|endoftext|>', allowed_special='all')[-1] == 259
  assert tok.decode([259]) == '<|endoftext|>'


def test_train_rejects_impossible_sizes():
  with pytest.raises(UserError, match='too small'):
    bpe.train_bpe('some text', 255, progress=False)
  with pytest.raises(UserError, match='runs out of pairs'):
    bpe.train_bpe('ab ab ab', 300, progress=False)
  assert bpe.train_bpe('', 256, progress=False).vocab_size == 256

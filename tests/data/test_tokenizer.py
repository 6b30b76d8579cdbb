"""Character tokenizer and the JSON save/load shared by all tokenizers."""

import json

import pytest

from gpt_jax.data import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError


def test_char_vocab_is_sorted_unique_characters():
  tok = tokenizer_lib.CharTokenizer.from_text('hello world')
  assert tok.chars == sorted(set('hello world'))
  assert tok.vocab_size == 8


def test_char_round_trip():
  text = 'ROMEO:\nBut soft! what light through yonder window breaks?'
  tok = tokenizer_lib.CharTokenizer.from_text(text)
  ids = tok.encode(text)
  assert len(ids) == len(text)
  assert tok.decode(ids) == text


def test_unknown_character_is_named():
  tok = tokenizer_lib.CharTokenizer.from_text('abc')
  with pytest.raises(UserError, match=r"vocabulary of 3: 'z'"):
    tok.encode('abz')


def test_json_round_trip(tmp_path):
  tok = tokenizer_lib.CharTokenizer.from_text('ça va? 🎉\n')
  path = str(tmp_path / 'tok.json')
  tokenizer_lib.save_tokenizer(tok, path)
  assert json.loads((tmp_path / 'tok.json').read_text(encoding='utf-8'))['type'] == 'char'
  again = tokenizer_lib.load_tokenizer(path)
  assert again.to_dict() == tok.to_dict()
  assert again.decode(again.encode('ça va? 🎉')) == 'ça va? 🎉'


def test_bad_tokenizer_files_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='no tokenizer file'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'missing.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"type": "sentencepiece"}')
  with pytest.raises(UserError, match='unknown tokenizer type'):
    tokenizer_lib.load_tokenizer(str(bad))
  bad.write_text('{not json')
  with pytest.raises(UserError, match='not valid'):
    tokenizer_lib.load_tokenizer(str(bad))

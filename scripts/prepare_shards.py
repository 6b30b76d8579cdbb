"""Tokenizes a text file or a folder of *.txt files (any size) into uint16 token shards + index.json.

Streams: memory stays flat however big the corpus (see gpt_jax/data/shards.py).

  python scripts/prepare_shards.py --source corpus/ --out_dir data/corpus_shards
  python scripts/prepare_shards.py --source corpus/ --out_dir data/corpus_bpe \\
      --tokenizer data/shakespeare_bpe/tokenizer.json     # any saved gpt_jax tokenizer
  python scripts/prepare_shards.py --check data/corpus_shards   # verify every shard's SHA-256
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

flags.DEFINE_string('source', '', 'A text file or a folder of *.txt files (searched recursively).')
flags.DEFINE_string('out_dir', '', 'Folder for shard_NNNNNN.bin and index.json.')
flags.DEFINE_string('tokenizer', 'char',
                    "'char' (the corpus's characters), or a tokenizer.json written by gpt_jax.")
flags.DEFINE_integer('shard_tokens', 1 << 24, 'Tokens per shard (16M tokens = 32 MB).')
flags.DEFINE_integer('chunk_chars', 1 << 20, 'Characters read and encoded at a time.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing sharded dataset in --out_dir.')
flags.DEFINE_string('check', '', 'Only verify the sharded dataset in this folder (sizes, SHA-256).')
FLAGS = flags.FLAGS


def _run() -> None:
  from gpt_jax.data import shards, tokenizer
  from gpt_jax.errors import UserError
  if FLAGS.check:
    index = shards.read_index(FLAGS.check)
    shards.check_shards(FLAGS.check, index, verify=True)
    print(f'ok: {len(index["shards"])} shard(s), {index["total_tokens"]:,} tokens in {FLAGS.check}')
    return
  if not FLAGS.source or not FLAGS.out_dir:
    raise UserError('pass --source=FILE_OR_FOLDER and --out_dir=FOLDER (or --check=FOLDER).')
  tok = FLAGS.tokenizer if FLAGS.tokenizer == 'char' else tokenizer.load_tokenizer(FLAGS.tokenizer)
  shards.write_shards(FLAGS.source, FLAGS.out_dir, tok, shard_tokens=FLAGS.shard_tokens,
                      chunk_chars=FLAGS.chunk_chars, overwrite=FLAGS.overwrite)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run_main(_run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

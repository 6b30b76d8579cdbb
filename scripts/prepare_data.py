r"""Tokenizes the training text into train.bin / val.bin / tokenizer.json / meta.json.

scripts/train.py runs the same step when the prepared files are missing or stale, so this is only
needed to prepare ahead of time or to inspect the result. The config's `data` section says what to
prepare: the text (`text_path`: a file, or a folder whose *.txt files are joined in sorted order) and
the tokenizer (`tokenizer`: 'char', 'gpt2' or 'bpe'); see gpt_jax/data/text.py.

  python scripts/prepare_data.py --config configs/shakespeare.py
  python scripts/prepare_data.py --config configs/shakespeare.py --config.data.text_path=input.txt
  python scripts/prepare_data.py --config configs/shakespeare_bpe.py --config.data.gpt2_dir=gpt2/
  python scripts/prepare_data.py --config configs/shakespeare_bpe_compact.py \
      --config.data.bpe_vocab_size=2048 --config.data.text_path=my_corpus/

With `data.shards_dir` set, the text (any size) becomes token shards instead: numbered uint16 files
plus index.json (tokenizer, shard sizes, SHA-256) in shards_dir/train and shards_dir/val, written
with flat memory (gpt_jax/data/shards.py); scripts/train.py with the same setting trains from them.

  python scripts/prepare_data.py --config.data.text_path=my_corpus/ \
      --config.data.shards_dir=data/my_corpus_shards
"""
import os

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

_CONFIG = cli.define_config_file(
    'config', os.path.join(_bootstrap.REPO_ROOT, 'configs', 'shakespeare.py'),
    'Run config whose `data` section says what to prepare.')
flags.DEFINE_bool('force', False, 'Prepare again even if the files are up to date.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax.data import shards, text
  data_cfg = _CONFIG.value.data
  prepare = shards.prepare if data_cfg.get('shards_dir') else text.prepare
  cli.run_main(lambda: prepare(data_cfg, force=flags.FLAGS.force))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

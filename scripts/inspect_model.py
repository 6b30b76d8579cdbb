"""Prints the model's shape flow: every module's input -> output shapes, parameters, FLOPs per token.

  python scripts/inspect_model.py --config configs/shakespeare.py:cpu
  python scripts/inspect_model.py --config configs/shakespeare.py --config.model.bias=True
  python scripts/inspect_model.py --config configs/shakespeare.py --batch_size 1

Nothing is computed: the model is traced with abstract shapes, so even GPT-2 sizes print instantly.
Shapes use B = train.batch_size (or --batch_size) and T = model.block_size.
"""
import os

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

_CONFIG = cli.define_config_file(
    'config', os.path.join(_bootstrap.REPO_ROOT, 'configs', 'shakespeare.py'),
    'Run config: a configs/*.py file, optionally with :preset (e.g. configs/shakespeare.py:cpu).')
flags.DEFINE_integer('batch_size', None, 'Batch size B shown in the shapes (default: train.batch_size).')
FLAGS = flags.FLAGS

# model.vocab_size = 0 means "from the data"; without prepared data, assume the tokenizer's usual size.
_DEFAULT_VOCAB = {'char': 65, 'gpt2': 50257}


def _vocab_size(config) -> tuple[int, str]:
  from gpt_jax import files
  if config.model.vocab_size:
    return config.model.vocab_size, ''
  meta = os.path.join(os.path.expanduser(config.data.data_dir), 'meta.json')
  if os.path.exists(meta):
    vocab = files.read_json(meta, "the prepared data's meta.json", {'vocab_size': int})['vocab_size']
    return vocab, f'vocab_size {{}} from {meta}'
  v = _DEFAULT_VOCAB.get(config.data.tokenizer, 65)
  return v, (f'vocab_size {{}} assumed for tokenizer {config.data.tokenizer!r} (no prepared data in '
             f'{config.data.data_dir}; set --config.model.vocab_size to change it)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax.config import model_config_from
  from gpt_jax.lab import shape_flow  # Imported after flag parsing so --help is instant.

  def run():
    from gpt_jax.errors import UserError
    config = _CONFIG.value
    if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
      raise UserError(f'--batch_size must be >= 1 (got {FLAGS.batch_size}); leave it out to use '
                      'train.batch_size.')
    vocab, note = _vocab_size(config)
    cfg = model_config_from(config, vocab)
    rows = shape_flow.shape_flow(cfg, FLAGS.batch_size or config.train.batch_size)
    print(f'{cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block_size {cfg.block_size}, '
          f'vocab {cfg.vocab_size}, bias {cfg.bias}' + (f'; {note.format(vocab)}' if note else ''))
    print(shape_flow.format_table(rows, cfg))
  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

r"""Scores a checkpoint on the whole validation split: loss per token, perplexity and bits per character.

Bits per character compare models with different tokenizers; see gpt_jax/scoring.py.

  python scripts/evaluate.py --ckpt_dir out/shakespeare_char_cpu
  python scripts/evaluate.py --ckpt_dir out/shakespeare_gpt2_cpu --data_dir data/shakespeare_gpt2 \
      --batch_size 8

Without --data_dir the data settings saved in the checkpoint are used (and the data is prepared again
if it is missing). Results are printed and written to <run dir>/eval.json (or --output).
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

flags.DEFINE_string('ckpt_dir', None, 'A training run\'s out_dir (or its checkpoints/ folder).')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the best one).')
flags.DEFINE_string('data_dir', None, 'Prepared data to evaluate on (default: the data section '
                    'saved in the checkpoint).')
flags.DEFINE_integer('batch_size', 0, 'Windows of block_size per batch (0 = automatic, by vocab size).')
flags.DEFINE_string('output', None, 'Where to write the JSON results (default: <run dir>/eval.json; '
                    '"" = do not write).')
flags.mark_flag_as_required('ckpt_dir')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import os

  from gpt_jax import files, scoring  # Imported after flag parsing so --help is instant.
  from gpt_jax.errors import UserError

  def run():
    output = FLAGS.output
    if output is None:
      output = os.path.join(scoring.run_dir(FLAGS.ckpt_dir), 'eval.json')
      if not os.path.isdir(os.path.dirname(output)):
        output = None  # No such run: evaluate_checkpoint says so.
    if output:  # Before any work: a result that cannot be written is reported now, not after it.
      hint = ' (or pass --output=PATH elsewhere, or --output="" to write none)' if FLAGS.output is None else ''
      try:
        files.check_writable(output, 'the results (--output)')
      except UserError as e:
        raise UserError(f"{e}{hint}") from None
    scoring.evaluate_checkpoint(FLAGS.ckpt_dir, step=FLAGS.step, data_dir=FLAGS.data_dir,
                                batch_size=FLAGS.batch_size, output=output)
  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

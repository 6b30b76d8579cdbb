"""Traces a trained model's predictions through a text, token by token.

  python scripts/trace.py --ckpt_dir out/shakespeare_char_cpu --text "ROMEO: O, she doth teach"
  python scripts/trace.py --ckpt_dir out/shakespeare_char_cpu --text "First Citizen:" --top_k 3

For every position: the token just read, the token that actually comes next, the probability the model
gave it and its rank among all tokens (1 = the model's first choice), and the model's top-k guesses.
Whitespace is escaped ('\\n'); a token with leading or trailing spaces is quoted (' the').
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

flags.DEFINE_string('ckpt_dir', None, 'A training run\'s out_dir (or its checkpoints/ folder).')
flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the best one).')
flags.DEFINE_string('text', None, 'The text to trace (at most block_size + 1 tokens are used).')
flags.DEFINE_integer('top_k', 5, 'How many of the model\'s top guesses to show per position.')
flags.mark_flag_as_required('ckpt_dir')
flags.mark_flag_as_required('text')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax.errors import UserError
  from gpt_jax.lab import probes  # Imported after flag parsing so --help is instant.

  def run():
    if FLAGS.top_k < 1:
      raise UserError(f'--top_k must be >= 1 (got {FLAGS.top_k})')
    cfg, params, tok = probes.load(FLAGS.ckpt_dir, FLAGS.step)
    ids, note = probes.encode_for_model(tok, cfg, FLAGS.text, extra=1)
    if len(ids) < 2:
      raise UserError('--text must be at least two tokens long: one to read, one to predict.')
    if note:
      print(note)
    rows = probes.token_trace(params, cfg, ids, min(FLAGS.top_k, cfg.vocab_size))
    print(probes.format_trace(rows, tok))
  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

"""Draws a trained model's attention: one heatmap per layer and head, for a text you choose.

  python scripts/attention.py --ckpt_dir out/shakespeare_char_cpu --text "ROMEO: O, she doth teach"
  python scripts/attention.py --ckpt_dir out/shakespeare_char_cpu --text "To be, or not" --out att.png

Row t of a heatmap is where the token at position t looks: the probabilities over positions 0..t
(the causal mask leaves the upper triangle at 0). Characters (or BPE pieces) label the axes; each map's
title names the head's strongest pattern on this text (probes.head_scores: previous token, line start,
word start) with its score.
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

flags.DEFINE_string('ckpt_dir', None, 'A training run\'s out_dir (or its checkpoints/ folder).')
flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the best one).')
flags.DEFINE_string('text', None, 'The text the model reads (at most block_size tokens are used).')
flags.DEFINE_string('out', 'attention.png', 'PNG file to write.')
flags.DEFINE_integer('dpi', 80, 'Resolution of the PNG.')
flags.mark_flag_as_required('ckpt_dir')
flags.mark_flag_as_required('text')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax.lab import plots, probes  # Imported after flag parsing so --help is instant.

  def run():
    cfg, params, tok = probes.load(FLAGS.ckpt_dir, FLAGS.step)
    ids, note = probes.encode_for_model(tok, cfg, FLAGS.text)
    if note:
      print(note)
    probs = probes.attention_maps(params, cfg, ids)  # (L, H, T, T)
    labels = [probes.token_text(tok, i) for i in ids]
    shown = FLAGS.text if len(FLAGS.text) <= 60 else FLAGS.text[:57] + '...'
    titles = probes.best_pattern(probes.head_scores(probs, labels))
    plots.attention_grid(probs, labels, FLAGS.out, f'attention on {shown!r} ({len(ids)} tokens; row: '
                         'query position, column: key position)', FLAGS.dpi, head_titles=titles)
    print(f'wrote {FLAGS.out} ({cfg.n_layer} layers x {cfg.n_head} heads, {len(ids)} tokens)')
  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

"""Plots training runs: loss vs step and vs wall-clock time, lr, gradient norms, per-layer statistics.

  python scripts/plot.py out/shakespeare_char_cpu
  python scripts/plot.py out/run_a out/run_b --out compare.png            # runs overlaid
  python scripts/plot.py out/run_a --panels grad_heatmap,update_ratio --out dyn.png

Panels: loss, loss_time, lr, grad_norm (every run overlaid) and, from the records written with
--config.train.layer_stats_interval=N, grad_heatmap (layer x step), update_ratio, act_rms and attn_entropy
(one per run). Default: every panel that has data.
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

flags.DEFINE_string('out', None, 'PNG file to write (default: RUN_DIR/plots.png of the first run).')
flags.DEFINE_list('panels', None, 'Comma-separated panels to draw (default: all with data).')
flags.DEFINE_integer('dpi', 90, 'Resolution of the PNG.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories (a training run\'s out_dir)')
  import os

  from gpt_jax.lab import plots  # Imported after flag parsing so --help is instant.

  def run():
    from gpt_jax import files
    from gpt_jax.errors import UserError
    if FLAGS.dpi < 1:
      raise UserError(f'--dpi must be >= 1 (got {FLAGS.dpi}); e.g. --dpi 90.')
    out = plots.image_path(FLAGS.out or os.path.join(argv[1], 'plots.png'))
    files.check_writable(out, 'the plot')  # Before reading and drawing.
    runs = [plots.read_run(d) for d in argv[1:]]
    names = [r.name for r in runs]
    for r, d in zip(runs, argv[1:]):  # Same basename twice: fall back to the path given.
      if names.count(r.name) > 1:
        r.name = d
    out = plots.overview(runs, out, FLAGS.panels, FLAGS.dpi)
    print(f'wrote {out}')
  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

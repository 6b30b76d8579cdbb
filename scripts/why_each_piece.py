"""Trains the full model and each ablation (one piece of GPT-2 removed) for several seeds; writes the table.

    python scripts/why_each_piece.py                          # seeds 0, 1, 2 -> out/why_each_piece
    python scripts/why_each_piece.py --seeds 0 --steps 100    # one quick seed
    python scripts/why_each_piece.py --figures docs/img       # also one figure per seed there
    python scripts/why_each_piece.py --table_only             # the table again from the saved curves

The model, steps and evals are the walkthrough notebook's section 10 (gpt_jax/lab/ablations.py:
small_config); seed 0 is the notebook's own run. Per seed it writes curves_seed{N}.json (val loss
against steps per variant) and prints a Markdown table of the final val losses of every seed, the
n-gram baselines, and the orderings that held in every seed (the only ones the notebook asserts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import _bootstrap  # noqa: F401  (puts the repository root on sys.path)

# An ordering the notebook asserts must hold in every seed by more than this (nats), so that
# another machine's float rounding cannot flip it.
MARGIN = 0.02


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated training seeds')
  parser.add_argument('--steps', type=int, default=0, help='training steps (0 = the notebook\'s)')
  parser.add_argument('--out_dir', default='out/why_each_piece', help='where the curves and table go')
  parser.add_argument('--data_dir', default='', help='prepared data folder (default: out_dir/data)')
  parser.add_argument('--figures', default='', help='folder for why_each_piece_seed{N}.png ('' = out_dir)')
  parser.add_argument('--table_only', action='store_true',
                      help='train nothing: print the table from out_dir/curves_seed{N}.json')
  args = parser.parse_args()

  from gpt_jax.data import text as text_lib
  from gpt_jax.lab import ablations, ngram, plots

  plt = plots.plt  # matplotlib's pyplot on the file-only Agg backend.

  seeds = [int(s) for s in args.seeds.split(',')]
  os.makedirs(args.out_dir, exist_ok=True)
  figures = args.figures or args.out_dir
  os.makedirs(figures, exist_ok=True)
  base = ablations.small_config()
  base.data.data_dir = args.data_dir or os.path.join(args.out_dir, 'data')
  ds = text_lib.load(base.data, verbose=False)
  baselines = {n: loss for n, (_, loss) in ngram.baselines(ds.train, ds.val, ds.tokenizer.vocab_size).items()}
  print('n-gram val loss: ' + ', '.join(f'{n} {loss:.3f}' for n, loss in baselines.items()), flush=True)

  runs = []
  for seed in seeds if args.table_only else ():
    with open(os.path.join(args.out_dir, f'curves_seed{seed}.json'), encoding='utf-8') as f:
      runs.append({n: ablations.Curve(**c) for n, c in json.load(f).items()})
  for seed in () if args.table_only else seeds:
    config = ablations.small_config(seed, args.steps or ablations.small_config().train.max_steps)
    config.data.data_dir = base.data.data_dir
    t0 = time.time()
    curves = ablations.run(config, ds.train, ds.val, ds.tokenizer.vocab_size,
                           log=lambda line, seed=seed: print(f'seed {seed}: {line}', flush=True))
    runs.append(curves)
    with open(os.path.join(args.out_dir, f'curves_seed{seed}.json'), 'w', encoding='utf-8') as f:
      json.dump({n: dataclasses.asdict(c) for n, c in curves.items()}, f, indent=1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ablations.plot(ax, curves, baselines, f'seed {seed}: val loss without each piece')
    fig.tight_layout()
    fig.savefig(os.path.join(figures, f'why_each_piece_seed{seed}.png'), dpi=100)
    plt.close(fig)
    print(f'seed {seed} done in {time.time() - t0:.0f} s', flush=True)

  names = list(runs[0])
  print('\n| variant | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean |')
  print('|---|' + '---:|' * (len(seeds) + 1))
  for n in names:
    finals = [r[n].final for r in runs]
    label = n if n == ablations.FULL else 'one head' if n == 'heads' else f'no {n}'
    print(f'| {label} | ' + ' | '.join(f'{x:.3f}' for x in finals) + f' | {sum(finals) / len(finals):.3f} |')
  for n, loss in baselines.items():
    print(f'| {n} (counted) | ' + ' | '.join(f'{loss:.3f}' for _ in seeds) + f' | {loss:.3f} |')
  print(f'\nOrderings that held in every seed by more than {MARGIN} nats (a < b: a ends lower):')
  for a, b in ablations.held_in_every(runs, MARGIN):
    print(f'  {a} < {b}')
  print(f'Orderings that held in every seed, but not always by {MARGIN}:')
  for a, b in sorted(set(ablations.held_in_every(runs)) - set(ablations.held_in_every(runs, MARGIN))):
    print(f'  {a} < {b}')
  for n in names:
    below = [b for b, loss in baselines.items() if all(r[n].final < loss for r in runs)]
    print(f'  {n}: below {", ".join(below) or "no baseline"} in every seed')


if __name__ == '__main__':
  main()

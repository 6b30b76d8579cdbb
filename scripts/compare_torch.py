"""Trains the JAX GPT and a PyTorch reference side by side and compares their training dynamics.

Both sides start from identical float32 weights, see identical batches (the project's own get_batch
and keys) and identical learning rates. Writes OUT_DIR/dynamics.jsonl, summary.json, dynamics.png.

  python scripts/compare_torch.py --config configs/shakespeare.py:tiny --steps 100 --out_dir /tmp/cmp
  python scripts/compare_torch.py --config configs/shakespeare.py:cpu --steps 500 --eval_interval 100 \\
      --out_dir /tmp/compare_cpu
  # dropout > 0: several dropout seeds per side, and a verdict on the seed spread
  python scripts/compare_torch.py --config configs/shakespeare.py:tiny --config.model.dropout=0.1 \\
      --seeds 3 --steps 200 --out_dir /tmp/cmp_dropout

Needs PyTorch (a dev requirement): pip install torch==2.13.0
"""
import os

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

_CONFIG = cli.define_config_file(
    'config', os.path.join(_bootstrap.REPO_ROOT, 'configs', 'shakespeare.py') + ':tiny',
    'Run config: a configs/*.py file, optionally with :preset (e.g. configs/shakespeare.py:tiny).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Optimizer steps per side (0 = config.train.max_steps).',
                              lower_bound=0)
_OUT_DIR = flags.DEFINE_string('out_dir', 'out/compare_torch', 'Where the three output files go.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Dropout seeds per side (used only when model.dropout > 0).',
                              lower_bound=1)
_EVAL_INTERVAL = flags.DEFINE_integer('eval_interval', 0,
                                      'Steps between val-loss evals (0 = config.train.eval_interval).',
                                      lower_bound=0)
_F64 = flags.DEFINE_boolean('float64_reference', True,
                            'With dropout 0, also train PyTorch in float64 as the exact-arithmetic '
                            'reference (costs one more, slower, PyTorch run).')
_THREADS = flags.DEFINE_integer('torch_threads', 2, 'torch.set_num_threads (the JAX side uses all cores).',
                                lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def run():
    from gpt_jax.lab import torch_compare, torch_ref  # Imported after flag parsing so --help is instant.
    torch_ref.require_torch().set_num_threads(_THREADS.value)
    torch_compare.run_comparison(_CONFIG.value, _STEPS.value, _OUT_DIR.value, seeds=_SEEDS.value,
                            eval_interval=_EVAL_INTERVAL.value, float64_reference=_F64.value)

  cli.run_main(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

"""Samples text from a trained checkpoint (parameters only; no optimizer state is loaded).

  python scripts/sample.py --ckpt_dir out/shakespeare_char
  python scripts/sample.py --ckpt_dir out/shakespeare_char --prompt "ROMEO:" --num_samples 3 \\
      --max_new_tokens 300 --temperature 0.8 --top_k 200 --seed 7
"""
from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import allocator, cli
from gpt_jax.config import SampleConfig

allocator.preload()  # Re-executes this script once on mimalloc, before jax loads (gpt_jax/allocator.py).

flags.DEFINE_string('ckpt_dir', None, 'A training run\'s out_dir (or its checkpoints/ folder).')
flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the best one).')
# Left out, a setting is the run's own (its config's sample section), else SampleConfig's default.
_S = SampleConfig()
_RUN = " (default: the run's sample.{}, else {!r})"
flags.DEFINE_string('prompt', None, 'Text to continue.' + _RUN.format('prompt', _S.prompt))
flags.DEFINE_string('prompt_file', None, 'Read the prompt from this file instead of --prompt.')
flags.DEFINE_integer('num_samples', None, 'How many samples (generated together as one batch).'
                     + _RUN.format('num_samples', _S.num_samples))
flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per sample.'
                     + _RUN.format('max_new_tokens', _S.max_new_tokens))
flags.DEFINE_float('temperature', None, 'Softmax temperature; 0 = greedy.'
                   + _RUN.format('temperature', _S.temperature))
flags.DEFINE_integer('top_k', None, 'Sample only from the k most likely tokens (0 = all).'
                     + _RUN.format('top_k', _S.top_k))
flags.DEFINE_integer('seed', None, 'PRNG seed.' + _RUN.format('seed', _S.seed))
flags.DEFINE_integer('window_shift', None, 'Past block_size, re-encode every N tokens (0 = auto, 1 = exact '
                     'nanoGPT cropping).' + _RUN.format('window_shift', _S.window_shift))
flags.mark_flag_as_required('ckpt_dir')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from gpt_jax import sample_run  # Imported after flag parsing so --help is instant.
  cli.run_main(lambda: sample_run.sample_from_checkpoint(
      FLAGS.ckpt_dir, step=FLAGS.step, prompt=FLAGS.prompt, prompt_file=FLAGS.prompt_file,
      num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed,
      window_shift=FLAGS.window_shift))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

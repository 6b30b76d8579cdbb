"""Converts GPT-2 weights between a Hugging Face directory and a gpt_jax checkpoint (no downloads).

Import (default): a local HF GPT-2 directory -> a gpt_jax checkpoint that sample.py can use. The
tokenizer comes from the directory's vocab.json + merges.txt, else from --encoder_json/--vocab_bpe.

  python scripts/convert_hf.py --hf_dir ~/models/gpt2 --out_dir out/gpt2
  python scripts/sample.py --ckpt_dir out/gpt2 --prompt "Hello"

Export: a gpt_jax checkpoint -> config.json + model.safetensors (+ vocab.json, merges.txt for BPE
tokenizers) that transformers.GPT2LMHeadModel.from_pretrained loads. Models without biases are
written with zero biases, since GPT-2 always has them.

  python scripts/convert_hf.py --direction export --ckpt_dir out/gpt2 --hf_dir /tmp/gpt2_hf
"""
import os

from absl import app, flags

import _bootstrap  # noqa: F401  (makes `gpt_jax` importable from a checkout)

from gpt_jax import cli

flags.DEFINE_enum('direction', 'import', ['import', 'export'],
                  'import: HF directory -> gpt_jax checkpoint; export: the other way.')
flags.DEFINE_string('hf_dir', None, 'The Hugging Face GPT-2 directory (read on import, written on '
                    'export).')
flags.DEFINE_string('out_dir', None, 'import: where to write the gpt_jax checkpoint (must not hold '
                    'checkpoints yet).')
flags.DEFINE_string('ckpt_dir', None, 'export: a gpt_jax run\'s out_dir (or its checkpoints/ folder).')
flags.DEFINE_integer('step', None, 'export: checkpoint step (default: the best one).')
flags.DEFINE_string('encoder_json', None, 'import: GPT-2\'s encoder.json, if --hf_dir has no '
                    'vocab.json.')
flags.DEFINE_string('vocab_bpe', None, 'import: GPT-2\'s vocab.bpe, if --hf_dir has no merges.txt.')
FLAGS = flags.FLAGS


def _run() -> None:
  from gpt_jax import hf  # Imported after flag parsing so --help is instant.
  from gpt_jax.errors import UserError
  if FLAGS.direction == 'import':
    if not FLAGS.hf_dir or not FLAGS.out_dir:
      raise UserError('import needs --hf_dir (the HF GPT-2 directory) and --out_dir (where the '
                      'checkpoint goes).')
    from gpt_jax.training import runlock
    out = os.path.expanduser(FLAGS.out_dir)
    if os.path.isdir(out) and os.listdir(out) and not runlock.is_run_dir(out):
      raise UserError(f'--out_dir {out} already holds files that are not a gpt_jax run; nothing was '
                      'written there. Pick a new or empty --out_dir.')
    ckpt_dir = hf.convert_to_checkpoint(FLAGS.hf_dir, FLAGS.out_dir, FLAGS.encoder_json,
                                        FLAGS.vocab_bpe)
    print(f'wrote a gpt_jax checkpoint to {ckpt_dir}; sample with:\n'
          f'  python scripts/sample.py --ckpt_dir {FLAGS.out_dir} --prompt "Hello"')
  else:
    if not FLAGS.ckpt_dir or not FLAGS.hf_dir:
      raise UserError('export needs --ckpt_dir (a gpt_jax run) and --hf_dir (where the HF files '
                      'go).')
    files = hf.export_checkpoint(FLAGS.ckpt_dir, FLAGS.hf_dir, FLAGS.step)
    out = os.path.dirname(files[0])
    print(f'wrote {", ".join(os.path.basename(f) for f in files)} to {out}; load with '
          f'transformers.GPT2LMHeadModel.from_pretrained({out!r})')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run_main(_run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

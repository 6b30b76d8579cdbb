"""Times the hand-written GPT-2 BPE against tiktoken on TinyShakespeare, and BPE training.

  python scripts/bench_tokenizer.py                 # the files shipped in gpt_jax/data/assets
  python scripts/bench_tokenizer.py --data_dir DIR

Expects <data_dir>/tinyshakespeare.txt and <data_dir>/gpt2/{encoder.json,vocab.bpe}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Lets `python scripts/bench_tokenizer.py` import gpt_jax from the checkout without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_jax.data import (
  bpe,  # noqa: E402
  text as text_lib,  # noqa: E402
)
from gpt_jax.errors import UserError, exit_on_user_error  # noqa: E402


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main() -> None:
  default_dir = str(text_lib.ASSETS_DIR)
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=os.path.normpath(default_dir),
                      help='folder with tinyshakespeare.txt and gpt2/ (default: %(default)s)')
  parser.add_argument('--vocab_size', type=int, default=1024, help='size of the trained BPE')
  args = parser.parse_args()

  with exit_on_user_error():
    text_path = os.path.join(args.data_dir, 'tinyshakespeare.txt')
    if not os.path.isfile(text_path):
      raise UserError(f'{text_path} not found; pass --data_dir pointing at the data folder')
    with open(text_path, encoding='utf-8') as f:
      text = f.read()
    gpt2, t_load = _timed(lambda: bpe.load_gpt2_tokenizer(
        os.path.join(args.data_dir, 'gpt2', 'encoder.json'),
        os.path.join(args.data_dir, 'gpt2', 'vocab.bpe')))
    print(f'text: {len(text):,} characters; GPT-2 vocabulary loaded in {t_load:.2f} s')

    ids, t_cold = _timed(lambda: gpt2.encode(text))
    _, t_warm = _timed(lambda: gpt2.encode(text))  # Every distinct piece is now cached.
    print(f'hand-written encode: {t_cold:.3f} s (empty cache), {t_warm:.3f} s (warm cache), '
          f'{len(ids):,} tokens')

    try:
      import tiktoken  # noqa: F401
    except ImportError:
      print('tiktoken encode: skipped (tiktoken is not installed)')
    else:
      gpt2.encode_fast('warm up')  # Builds tiktoken's Encoding once; not part of the timing.
      fast_ids, t_fast = _timed(lambda: gpt2.encode_fast(text))
      same = 'identical ids' if fast_ids == ids else 'DIFFERENT ids'
      print(f'tiktoken encode:     {t_fast:.3f} s, {len(fast_ids):,} tokens ({same}); '
            f'hand-written is {t_cold / t_fast:.1f}x slower cold, {t_warm / t_fast:.1f}x warm')

    n = int(0.9 * len(text))
    print(f'90/10 split: {len(gpt2.encode(text[:n])):,} / {len(gpt2.encode(text[n:])):,} tokens')

    trained, t_train = _timed(lambda: bpe.train_bpe(text, args.vocab_size, progress=False))
    n_trained = len(trained.encode(text))
    print(f'train_bpe({args.vocab_size}): {t_train:.2f} s; it encodes the text to {n_trained:,} '
          f'tokens ({len(text) / n_trained:.2f} characters per token)')


if __name__ == '__main__':
  main()

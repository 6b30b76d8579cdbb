"""GPT on TinyShakespeare with GPT-2's BPE tokenizer (the data of nanoGPT's `shakespeare`).

    python scripts/train.py --config configs/shakespeare_bpe.py         # a GPU run
    python scripts/train.py --config configs/shakespeare_bpe.py:cpu     # a few minutes on a 2-core CPU
    python scripts/train.py --config configs/shakespeare_bpe.py:tiny    # seconds, for tests

The text is split 90/10 by characters and each part is encoded with GPT-2's 50,257-token BPE, as in
nanoGPT's data/shakespeare/prepare.py: 301,966 train / 36,059 val tokens. GPT-2's encoder.json and
vocab.bpe come from `data.gpt2_dir` if set, else the cache, else OpenAI's URLs (SHA-256 checked).

The model's vocabulary is padded from 50,257 up to 50,304, a multiple of 64, as nanoGPT does: the
embedding/LM-head matmuls then tile evenly. The 47 padded ids never occur in the data (so they are
never a target), and sampling and evaluation mask their logits (`vocab_limit` = the tokenizer's
vocabulary), so they are never produced.

Presets (everything else as in configs/shakespeare.py):
  (default)  the `shakespeare_char` model (6 layers, 6 heads, 384 wide, dropout 0.2) on GPT-2 tokens,
             block 256 tokens (~1,000 characters), 2000 steps. Sized for a GPU; not measured here.
  cpu        4 layers, 4 heads, 128 wide, block 64, batch 8, 300 steps: a few minutes on a 2-core
             CPU, where the 50,304-way output layer and softmax are most of the cost of a step.
  tiny       a toy model for tests.
"""

import os

import ml_collections

from gpt_jax.config import load_config_file

GPT2_VOCAB_SIZE = 50257
VOCAB_MULTIPLE = 64


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """The smallest multiple of `multiple` that is >= vocab_size (50257 -> 50304)."""
  return -(-vocab_size // multiple) * multiple


def base_config(preset: str) -> ml_collections.ConfigDict:
  """configs/shakespeare.py's config for `preset`."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'),
                          preset)


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """Returns the run config for `preset` ('', 'cpu' or 'tiny')."""
  if preset not in ('', 'cpu', 'tiny'):
    raise ValueError(f"unknown preset {preset!r}: use '', 'cpu' or 'tiny'")
  c = base_config(preset)
  c.out_dir = 'out/shakespeare_gpt2' + (f'_{preset}' if preset else '')
  c.data.update(tokenizer='gpt2', data_dir='data/shakespeare_gpt2')
  c.model.vocab_size = pad_vocab(GPT2_VOCAB_SIZE)  # 50304; 0 would use the unpadded 50257.
  if preset == '':
    c.train.update(max_steps=2000, lr_decay_steps=2000, eval_interval=250)
  elif preset == 'cpu':
    c.model.update(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
    # Each step costs ~0.8 s here, most of it the 50,304-way softmax: a short run, few evals.
    c.train.update(batch_size=8, max_steps=300, lr_decay_steps=300, learning_rate=2e-3,
                   min_learning_rate=2e-4, warmup_steps=30, eval_interval=150, eval_iters=10,
                   log_interval=50)
    c.sample.update(eval_tokens=40)
  return c

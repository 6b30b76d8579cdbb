"""GPT on TinyShakespeare with GPT-2's BPE tokenizer (the data of nanoGPT's `shakespeare`).

    python scripts/train.py --config configs/shakespeare_bpe.py         # a GPU run
    python scripts/train.py --config configs/shakespeare_bpe.py:cpu     # a small model for a 2-core CPU
    python scripts/train.py --config configs/shakespeare_bpe.py:tiny    # seconds, for tests

The text is split 90/10 by characters and each part is encoded with GPT-2's 50,257-token BPE, as in
nanoGPT's data/shakespeare/prepare.py: 301,966 train / 36,059 val tokens. GPT-2's encoder.json and
vocab.bpe come from `data.gpt2_dir` if set, else the cache, else OpenAI's URLs (SHA-256 checked).

The model's vocabulary is padded from 50,257 up to 50,304, a multiple of 64, as nanoGPT does: the
embedding/LM-head matmuls then tile evenly. The 47 padded ids never occur in the data (so they are
never a target), and sampling and evaluation mask their logits (`vocab_limit` = the tokenizer's
vocabulary), so they are never produced.

Presets (everything else as in configs/shakespeare.py's recipe):
  (default)  the `shakespeare_char` model (6 layers, 6 heads, 384 wide, dropout 0.2) on GPT-2 tokens,
             block 256 tokens (~1,000 characters), 2000 steps. Sized for a GPU; not measured here.
  cpu        4 layers, 4 heads, 128 wide, block 64, batch 8, 300 steps, for a 2-core CPU, where the
             50,304-way output layer and softmax are most of the cost of a step.
  tiny       a toy model for tests.
"""

import os

import ml_collections

from gpt_jax.config_files import load_config_file, preset_config, with_overrides

GPT2_VOCAB_SIZE = 50257
VOCAB_MULTIPLE = 64


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """The smallest multiple of `multiple` that is >= vocab_size (50257 -> 50304)."""
  return -(-vocab_size // multiple) * multiple


def base() -> ml_collections.ConfigDict:
  """configs/shakespeare.py's recipe on GPT-2's tokens, 2000 steps."""
  shakespeare = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'))
  return with_overrides(shakespeare, {
      'out_dir': 'out/shakespeare_gpt2',
      'data.tokenizer': 'gpt2', 'data.data_dir': 'data/shakespeare_gpt2',
      'model.vocab_size': pad_vocab(GPT2_VOCAB_SIZE),  # 50304; 0 would use the unpadded 50257.
      'train.max_steps': 2000, 'train.lr_decay_steps': 2000,
  })


PRESETS = {
    '': {},
    # Each step costs ~0.8 s here, most of it the 50,304-way softmax: a short run, few evals.
    'cpu': {
        'out_dir': 'out/shakespeare_gpt2_cpu',
        'model.n_layer': 4, 'model.n_head': 4, 'model.n_embd': 128, 'model.block_size': 64,
        'model.dropout': 0.0,
        'train.batch_size': 8, 'train.learning_rate': 2e-3, 'train.min_learning_rate': 2e-4,
        'train.warmup_steps': 30, 'train.max_steps': 300, 'train.lr_decay_steps': 300,
        'train.eval_interval': 150, 'train.eval_iters': 10, 'train.log_interval': 50,
        'sample.eval_tokens': 40,
    },
    'tiny': {  # configs/shakespeare.py's tiny model on GPT-2's tokens.
        'out_dir': 'out/shakespeare_gpt2_tiny',
        'model.n_layer': 2, 'model.n_head': 2, 'model.n_embd': 32, 'model.block_size': 32,
        'model.dropout': 0.0,
        'train.batch_size': 8, 'train.max_steps': 50, 'train.lr_decay_steps': 50, 'train.warmup_steps': 5,
        'train.eval_interval': 25, 'train.eval_iters': 4,
        'sample.eval_tokens': 32, 'sample.max_new_tokens': 64,
    },
}


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """The run config of `preset` ('', 'cpu' or 'tiny')."""
  return preset_config(base, PRESETS, preset)

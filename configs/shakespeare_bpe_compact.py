r"""GPT on TinyShakespeare with a compact byte-level BPE (1,024 tokens) trained on the training split.

    python scripts/train.py --config configs/shakespeare_bpe_compact.py:cpu     # minutes on a CPU
    python scripts/train.py --config configs/shakespeare_bpe_compact.py:tiny    # seconds, for tests
    python scripts/train.py --config configs/shakespeare_bpe_compact.py:cpu \
        --config.data.bpe_vocab_size=2048

The tokenizer is trained by `gpt_jax.bpe.train_bpe` on the first 90% of the text only (the training
split), so the validation text never influences the vocabulary; it is saved as tokenizer.json beside
the token files (and in every checkpoint). `model.vocab_size` follows `data.bpe_vocab_size`, rounded
up to a multiple of 64 (1024 already is one); padded ids never occur in the data and are masked when
sampling and evaluating. Changing `data.bpe_vocab_size` re-prepares `data_dir`.

Presets (everything else as in configs/shakespeare.py):
  (default)  the `shakespeare_char` model on 1,024 BPE tokens (block 256 tokens, ~600 characters).
  cpu        the char `cpu` preset's model, batch and steps on 1,024 BPE tokens, for a like-for-like
             comparison with the character model.
  tiny       a toy model with a 320-token BPE (synthetic test text supports ~330), for tests.
"""

import os

import ml_collections

from gpt_jax.config_files import load_config_file, preset_config, with_overrides

VOCAB_MULTIPLE = 64


def base() -> ml_collections.ConfigDict:
  """configs/shakespeare.py's recipe on a 1,024-token BPE trained on the training split."""
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'))
  with_overrides(c, {'out_dir': 'out/shakespeare_bpe', 'data.tokenizer': 'bpe',
                     'data.data_dir': 'data/shakespeare_bpe'})
  # A reference, so that --config.data.bpe_vocab_size=N also resizes the model (rounded up to a
  # multiple of 64); --config.model.vocab_size still overrides the model's size directly.
  c.data.bpe_vocab_size = ml_collections.FieldReference(1024)
  c.model.vocab_size = (c.data.get_ref('bpe_vocab_size') + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE
  return c


PRESETS = {
    '': {},
    'cpu': {  # configs/shakespeare.py's cpu model, batch and steps, for a like-for-like comparison.
        'out_dir': 'out/shakespeare_bpe_cpu',
        'model.n_layer': 4, 'model.n_head': 4, 'model.n_embd': 128, 'model.block_size': 64,
        'model.dropout': 0.0,
        'train.batch_size': 12, 'train.learning_rate': 2e-3, 'train.min_learning_rate': 2e-4,
        'train.max_steps': 7000, 'train.lr_decay_steps': 7000,
        'train.eval_interval': 500, 'train.eval_iters': 50, 'train.log_interval': 100,
    },
    'tiny': {  # configs/shakespeare.py's tiny model, with a 320-token BPE (the test text supports ~330).
        'out_dir': 'out/shakespeare_bpe_tiny',
        'model.n_layer': 2, 'model.n_head': 2, 'model.n_embd': 32, 'model.block_size': 32,
        'model.dropout': 0.0,
        'train.batch_size': 8, 'train.max_steps': 50, 'train.lr_decay_steps': 50, 'train.warmup_steps': 5,
        'train.eval_interval': 25, 'train.eval_iters': 4,
        'sample.eval_tokens': 32, 'sample.max_new_tokens': 64,
        'data.bpe_vocab_size': 320,
    },
}


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """The run config of `preset` ('', 'cpu' or 'tiny')."""
  return preset_config(base, PRESETS, preset)

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

from gpt_jax.config import load_config_file

VOCAB_MULTIPLE = 64


def base_config(preset: str) -> ml_collections.ConfigDict:
  """configs/shakespeare.py's config for `preset`."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shakespeare.py'),
                          preset)


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  """Returns the run config for `preset` ('', 'cpu' or 'tiny')."""
  if preset not in ('', 'cpu', 'tiny'):
    raise ValueError(f"unknown preset {preset!r}: use '', 'cpu' or 'tiny'")
  c = base_config(preset)
  c.out_dir = 'out/shakespeare_bpe' + (f'_{preset}' if preset else '')
  c.data.update(tokenizer='bpe', data_dir='data/shakespeare_bpe')
  # A reference, so that --config.data.bpe_vocab_size=N also resizes the model (rounded up to a
  # multiple of 64); --config.model.vocab_size still overrides the model's size directly.
  size = ml_collections.FieldReference(320 if preset == 'tiny' else 1024)
  c.data.bpe_vocab_size = size
  c.model.vocab_size = (size + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE
  return c
